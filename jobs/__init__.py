"""One entry point per pipeline stage.

Each module has `run(ctx, cfg)` (the stage, given a session and its typed config) and
`main(argv)` (parse arguments, load config, open the session, run). Each is runnable as
`python -m jobs.<stage> --conf conf/<env>.yaml`, as `spark-submit jobs/<stage>.py --conf ...`
and as `annomine <stage> ...`.
"""
