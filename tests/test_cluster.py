"""The pipeline on a Spark standalone cluster: executors are separate processes.

A master and two one-core workers on 127.0.0.1 (tests/cluster.py) give the application two executor
JVMs, each with its own Python workers. `spark-submit --master spark://127.0.0.1:<port> jobs/pipeline.py`
runs ingest, channels, mine and annotate (tier 1 from the judge folder, tier 2 the fake LLM served by
`annomine fake-llm-server` in its own process) with an LLM budget, then, in a second submit, annotate
without a budget (the deferred pairs escalate across both executors at once) and the curriculum, on
Parquet tables (no Delta jars offline). What only a cluster exercises: the retrievers and the cascade
pickled into closures and shipped to other processes, the judge folder and the encoder read by the
executors, the job-wide LLM concurrency cap split over tasks in two processes, and the driver
collecting each graded chunk before its MERGE.

The same two steps run on the embedded engine (Sail, Delta) from the same inputs, and every output
table is compared row for row (floats to 1e-5 relative: batches of different make-up pad the encoders'
inputs differently). The fake servers count the requests and the most in flight at once; Spark's event
log records which executor ran each grading task. Every process the test starts is stopped, and
checked gone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.cluster import StandaloneCluster, group_members

ROOT = Path(__file__).resolve().parents[1]
SPARK_SUBMIT = str(Path(sys.executable).with_name("spark-submit"))
GRADES = [1, 2, 3, 4]
CAP = 4            # cascade.max_concurrency_total in the unbudgeted run: 2 partitions x 2 requests each
BUDGET = 6         # annotate.llm_budget of the first run
LATENCY_MS = 250   # the fake LLM's answer time: long enough for the two executors' requests to overlap
CHUNK = 25         # annotate.chunk_size: the most graded rows the driver may collect at once
VOLATILE = {"ingested_at", "quarantined_at", "mined_at", "logged_at", "annotated_at", "latency_ms", "tier_outputs"}
TABLES = ["products", "queries", "human_labels", "quarantine", "retrieval_logs", "mined_candidates", "annotations"]


def _java() -> bool:
    try:
        return subprocess.run(["java", "-version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = pytest.mark.skipif(not (_java() and Path(SPARK_SUBMIT).is_file()),
                                reason="a standalone cluster needs Java 17 and pyspark's spark-submit")


def _daemons(master_port: int) -> list[str]:
    """Command lines of standalone masters and workers of the master on `master_port` (pgrep)."""
    found = subprocess.run(["pgrep", "-af", rf"deploy\.(master\.Master|worker\.Worker) .*:?{master_port}\b"],
                           capture_output=True, text=True).stdout
    return [line for line in found.splitlines() if "pgrep" not in line]


def assert_all_gone(groups: list[int], master_port: int, timeout_s: float = 60.0) -> None:
    """No process of the daemons' groups (executors and Python workers included) and no master or worker of
    this cluster runs any more (waits up to `timeout_s` for them to exit)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = [pid for g in groups for pid in group_members(g)]
        daemons = _daemons(master_port)
        if not left and not daemons:
            return
        assert time.monotonic() < deadline, f"processes of the cluster left running: {left} {daemons}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster():
    started = StandaloneCluster.start(workers=2, cores=1, memory="2g")
    try:
        yield started
    finally:
        started.stop()
        assert_all_gone(started.groups, started.master_port, timeout_s=5)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_killed_launcher_leaves_no_spark_process(how, tmp_path):
    """`python -m tests.cluster` killed by SIGTERM (its handler stops the cluster) or SIGKILL (the kernel's
    parent-death signal reaches every daemon): nothing of the cluster is left."""
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "tests.cluster", "--workers", "1"], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("{"), f"the launcher did not start a cluster: {line}{proc.stderr.read()}"
        started = json.loads(line)
        port = int(started["master"].rsplit(":", 1)[1])
        assert len(_daemons(port)) == 2   # the master and the worker run
        proc.send_signal(getattr(signal, how))
        proc.wait(timeout=60)
        assert_all_gone(started["groups"], port)
        if how == "SIGTERM":
            assert not Path(started["root"]).exists()   # its folder is removed too
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(started["root"], ignore_errors=True) if "started" in dir() else None


def test_job_modules_import_in_a_classic_driver_before_its_session():
    """spark-submit runs a job file before any SparkContext exists: no module builds a Column at import."""
    from annomine.stages import STAGES

    modules = [s.module for s in STAGES] + ["spark_udfs.annotation", "spark_udfs.retrieval"]
    env = _env() | {"ANNOMINE_SPARK_MODE": "classic"}
    code = f"import importlib\nfor m in {modules!r}:\n    importlib.import_module(m)\nprint('imported')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "imported" in proc.stdout, proc.stderr[-3000:]


def test_annotate_chunks_are_bounded_and_fixed(ctx):
    """Chunks of at most `size` rows that cover every row once and keep their rows while rows leave the
    source between evaluations (as committed pairs leave the pairs to grade)."""
    from annomine.chunks import chunks
    from annomine.schemas import TABLES as SPECS

    key = ["query_id", "product_id"]
    rows = [(f"q{i % 5}", f"p{i}") for i in range(41)]

    def write(keep):
        full = [tuple({"query_id": q, "product_id": p, "query": q, "level": 1}.get(c) for c in SPECS["mined_candidates"].columns)
                for q, p in keep]
        ctx.tables.overwrite("mined_candidates", ctx.spark.createDataFrame(full, SPECS["mined_candidates"].schema))

    def collect(df):
        return sorted(map(tuple, df.toPandas().values.tolist()))

    write(rows)
    source = ctx.tables.read("mined_candidates").select(*key)
    expected = [collect(c) for c in chunks(source, key, 7)]
    assert [len(c) for c in expected] == [7, 7, 7, 7, 7, 6] and sorted(r for c in expected for r in c) == sorted(rows)
    lazy = chunks(source, key, 7)
    assert collect(next(lazy)) == expected[0]
    write([r for r in rows if r not in expected[0]])   # the first chunk is done: it leaves the source
    assert [collect(c) for c in lazy] == expected[1:]   # renumbering the rest would have shifted every chunk
    assert list(chunks(source.limit(0), key, 7)) == []


class FakeLLM:
    """`annomine fake-llm-server` in its own process (its own process group), on a free port."""

    def __init__(self, latency_ms: float):
        self.proc = subprocess.Popen([sys.executable, "-m", "annomine", "fake-llm-server", "--port", "0",
                                      "--latency-ms", str(latency_ms)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        line = self.proc.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+/v1)", line)
        assert match, f"fake-llm-server did not start: {line}{self.proc.stdout.read() if self.proc.poll() is not None else ''}"
        self.base_url = match.group(1)

    def stats(self) -> dict:
        import urllib.request

        with urllib.request.urlopen(self.base_url.removesuffix("/v1") + "/stats", timeout=10) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=30)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYSPARK_", "SPARK_")) and k != "ANNOMINE_SPARK_MODE"}
    env.update(PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable, HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


# ---- the inputs: a tiny shop, a tiny encoder, a tiny judge -------------------------------------------
def _tiny_bert(folder: Path) -> str:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from annomine.encoders import minilm_path

    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128), add_pooling_layer=False).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return str(folder)


def _tiny_judge(folder: Path, shop: Path) -> str:
    """A random tiny cross-encoder whose escalation threshold is its median confidence on the shop's pairs."""
    import torch

    from annomine.judges.calibration import Calibrator
    from annomine.judges.cross_encoder import CrossEncoderModel, build_encoder

    torch.manual_seed(0)
    model = CrossEncoderModel(*build_encoder("tiny"), GRADES, max_length=32, version="ce-cluster")
    model.save(folder)
    products = pd.read_csv(shop / "products.tsv", sep="\t", dtype=str).fillna("")
    queries = pd.read_csv(shop / "queries.tsv", sep="\t", dtype=str)
    pairs = [(q, t) for q in queries["query"].head(6) for t in products["title"].head(20)]
    conf = model.predict_proba([q for q, _ in pairs], [t for _, t in pairs]).max(axis=1)
    Calibrator.uncalibrated(GRADES, float(np.median(conf))).save(folder / "calibration_tier1.json")
    return str(folder)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    from annomine.demo_shop import write_demo_shop

    root = tmp_path_factory.mktemp("cluster_inputs")
    write_demo_shop(root / "shop", n_products=60, n_queries=12, n_labelled=6, seed=7)
    return {"shop": root / "shop", "encoder": _tiny_bert(root / "tiny_bert"),
            "judge": _tiny_judge(root / "judge", root / "shop")}


def _conf(folder: Path, inputs: dict, table_format: str, llm_url: str, budget: int | None, cap: int) -> Path:
    import yaml

    shop = inputs["shop"]
    tier = {"model": "rule-small", "base_url": llm_url, "timeout_s": 20, "max_attempts": 3, "backoff_base_s": 0.05}
    doc = {"project": {"name": "cluster", "warehouse": str(folder / "warehouse"), "schema": "cluster",
                       "table_format": table_format, "mlflow_experiment": "annomine-cluster",
                       "mlflow_tracking_uri": (folder / "mlruns").as_uri()},
           "ingest": {"products": {"path": str(shop / "products.tsv")}, "queries": {"path": str(shop / "queries.tsv")},
                      "labels": {"path": str(shop / "labels.tsv")}, "queries_origin": "log"},
           "channels": {"top_k": 8, "n_built_queries": 4, "encoder": inputs["encoder"], "max_length": 32, "mlflow": False,
                        "report_k": 8, "report_dir": str(folder / "reports"), "query_partitions": 2},
           "mine": {"max_rank": 8, "easy_top_k": 3, "hard_positive_top_k": 6, "hard_negative_top_k": 8, "max_positives": 6,
                    "max_negatives": 6, "log_mlflow": False},
           "judge": {"pilot_in_pipeline": False},  # the LLM requests counted here are annotate's alone
           "annotate": {"cascade": {"judge": inputs["judge"], "tier1": True, "tier2": tier, "tier3": None,
                                    "max_concurrency_total": cap},
                        "chunk_size": CHUNK, "partitions": 2, "llm_budget": budget, "log_mlflow": False},
           "curriculum": {"variants": {"curriculum": ["easy", "hard"]}, "num_files": 2, "row_group_size": 8,
                          "dev_pool_size": 20}}
    path = folder / f"conf_{'budget' if budget is not None else 'open'}.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


# Small plans: one shuffle partition per executor; the event log plain JSON in one file.
SUBMIT_CONF = {"spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "2", "spark.default.parallelism": "2",
               "spark.sql.adaptive.enabled": "false", "spark.eventLog.enabled": "true", "spark.eventLog.compress": "false",
               "spark.eventLog.rolling.enabled": "false"}
STEPS = [("budget", ["ingest", "channels", "mine", "annotate"]), ("open", ["annotate", "curriculum"])]


# ---- running the steps -------------------------------------------------------------------------------
def spark_submit(cluster: StandaloneCluster, args: list[str], settings: dict, executor_env: tuple[str, ...]) -> str:
    """`spark-submit --master <cluster> ... <args>` from the repository root with the test environment (and
    `executor_env` of it on the executors); its stdout. The submit's process group is killed if it outlives us."""
    env = _env()
    settings = {**SUBMIT_CONF, **settings, **{f"spark.executorEnv.{k}": env[k] for k in executor_env}}
    cmd = [SPARK_SUBMIT, "--master", cluster.master_url, "--executor-memory", "1g",
           *[a for k, v in settings.items() for a in ("--conf", f"{k}={v}")], *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-3000:]}\n{err[-5000:]}"
    return out


def _submit(cluster: StandaloneCluster, conf: Path, only: list[str], events: Path) -> str:
    settings = {"spark.eventLog.dir": events.as_uri(), "spark.sql.warehouse.dir": str(events.parent / "spark-warehouse")}
    return spark_submit(cluster, ["jobs/pipeline.py", "--conf", str(conf), "--only", *only], settings,
                        ("PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM"))


def _run_embedded(conf: Path, only: list[str]) -> None:
    from jobs.pipeline import run_pipeline

    run_pipeline(str(conf), [], only=only)


def _dump(conf: Path, out: Path, spark) -> None:
    """Every output table (read on the embedded engine: Parquet versions or Delta) as a Parquet file under
    `out`, and the shards in file and row order."""
    import yaml

    doc = yaml.safe_load(conf.read_text())["project"]
    from annomine.config import ProjectConfig
    from annomine.tables import TableStore

    project = ProjectConfig(name=doc["name"], warehouse=doc["warehouse"], schema=doc["schema"],
                            table_format=doc["table_format"])
    tables = TableStore(spark, project)
    out.mkdir(parents=True, exist_ok=True)
    names = TABLES + ["train_set_curriculum"]
    for name in names:
        df = tables.read(name)
        df.drop(*[c for c in df.columns if c in VOLATILE]).toPandas().to_parquet(out / f"{name}.parquet")
    root = project.warehouse_path / "shards"
    shards = []
    for path in sorted(root.glob("*/run-*/stage*/part-*.parquet")):
        rows = pd.read_parquet(path)
        rows.insert(0, "_file", str(path.relative_to(root)).replace(f"{path.parent.parent.name}/", ""))
        shards.append(rows)
    pd.concat(shards, ignore_index=True).to_parquet(out / "shards.parquet")


def _same_rows(a: Path, b: Path, name: str, ordered: bool = False) -> int:
    from tests.test_engine_parity import assert_same_rows

    return assert_same_rows(a, b, name, ordered, rtol=1e-5, atol=1e-7, engines=("the embedded engine", "the cluster"))


def _executors_by_stage(events: Path) -> dict[str, set[str]]:
    """Per stage (its name, the driver's call site: `toPandas at .../jobs/annotate.py:<line>`), the executor
    ids that ran its tasks, read from Spark's event logs."""
    names, executors = {}, {}
    for log in (p for p in events.rglob("*") if p.is_file()):
        for line in log.read_text().splitlines():
            event = json.loads(line)
            kind = event.get("Event")
            if kind == "SparkListenerStageSubmitted":
                info = event["Stage Info"]
                names[log.parent.name, info["Stage ID"]] = f"{info['Stage ID']}: {info.get('Stage Name', '')}"
            elif kind == "SparkListenerTaskEnd":
                executors.setdefault((log.parent.name, event["Stage ID"]), set()).add(event["Task Info"]["Executor ID"])
    return {names.get(k, str(k)): v for k, v in executors.items()}


def test_pipeline_on_a_standalone_cluster_matches_the_embedded_engine(cluster, inputs, spark, tmp_path):
    started = time.time()
    servers, stats, outs, seconds = {}, {}, {}, {}
    try:
        for engine in ("cluster", "embedded"):
            for step, only in STEPS:
                begun = time.time()
                servers[engine, step] = server = FakeLLM(LATENCY_MS)
                budget, cap = (BUDGET, 2) if step == "budget" else (None, CAP)
                conf = _conf(tmp_path / engine, inputs, "parquet" if engine == "cluster" else "delta", server.base_url,
                             budget, cap)
                if engine == "cluster":
                    events = tmp_path / "events" / step
                    events.mkdir(parents=True)
                    out = _submit(cluster, conf, only, events)
                    assert "[pipeline] annotate: done" in out, out[-3000:]
                    # annotate's whole summary is a file (annomine/run_summary.py), rewritten by every run
                    outs[step] = (tmp_path / engine / "warehouse" / "runs" / "annotate_summary.json").read_text()
                else:
                    _run_embedded(conf, only)
                stats[engine, step] = server.stats()
                seconds[engine, step] = round(time.time() - begun)
            _dump(conf, tmp_path / "out" / engine, spark)
    finally:
        for server in servers.values():
            server.stop()
    print(f"cluster test: seconds per step {seconds}, {time.time() - started:.0f} s in all")

    # the same rows on both engines
    a, b = tmp_path / "out" / "embedded", tmp_path / "out" / "cluster"
    counts = {n: _same_rows(a, b, f"{n}.parquet") for n in TABLES + ["train_set_curriculum"]}
    counts["shards"] = _same_rows(a, b, "shards.parquet", ordered=True)
    assert min(counts.values()) > 0, counts
    ann = pd.read_parquet(b / "annotations.parquet")
    assert ann["grade"].notna().all() and (ann["escalation"] == "escalated").sum() > BUDGET, ann["escalation"].value_counts()

    # the driver collected one chunk at a time, never more than chunk_size graded rows
    held = [int(n) for out in outs.values() for n in re.findall(r'"max_chunk_rows": (\d+)', out)]
    chunks = [int(n) for out in outs.values() for n in re.findall(r'"chunks": (\d+)', out)]
    assert len(held) == 2 and 0 < max(held) <= CHUNK and sum(chunks) > 2, (held, chunks)

    # the LLM budget and the job-wide cap hold across executors, measured at the servers
    budget_run, open_run = stats["cluster", "budget"], stats["cluster", "open"]
    assert 0 < budget_run["requests"] <= BUDGET, budget_run
    assert 2 < open_run["in_flight_max"] <= CAP, open_run  # more than one task's share: two processes at once
    assert open_run["requests"] == (ann["escalation"] == "escalated").sum() - budget_run["requests"], open_run
    for step, _ in STEPS:  # the embedded engine asked the same questions
        assert stats["embedded", step]["requests"] == stats["cluster", step]["requests"], step

    # grading ran in both executor processes
    stages = _executors_by_stage(tmp_path / "events" / "open")
    grade_line = next(n for n, line in enumerate((ROOT / "jobs" / "annotate.py").read_text().splitlines(), 1)
                      if "mapInPandas(annotator" in line)
    grading = {k: v for k, v in stages.items() if k.endswith(f"annotate.py:{grade_line}")}
    assert any(len(v) == 2 for v in grading.values()), stages   # one grading stage's tasks on both executors
    print(f"cluster test: rows compared {counts}")
