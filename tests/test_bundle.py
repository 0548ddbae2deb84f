"""The Databricks Asset Bundle (databricks.yml + resources/) and the Databricks notebooks.

Without a workspace the bundle is checked as far as is possible offline:
- every job, schema and volume is loaded into the typed models of `databricks-bundles` (the
  Python package of the Databricks CLI's bundle schema), which refuse unknown fields and wrong
  types, for the default config and every target;
- top-level and target keys, `${...}` references and variables are resolved as the CLI would;
- the tasks are derived-consistent with the stage list (annomine/stages.py, jobs.pipeline.STAGES):
  every stage with a config section is a task running its module, in the stages' order, and the DAG
  respects the stages' data dependencies;
- what tasks share is written once (YAML anchors, `<<:` merges): no `--set` pair is repeated
  literally, every stage task gets the shared arguments, no task restates the task template;
- every task's python file exists, and its `main` accepts the task's parameters: argparse
  parses them and every `--set` key exists in the stage's config class (conf/databricks.yaml);
- clusters: training on a single-node GPU cluster through TorchDistributor, the LLM key only as a
  secret reference on the cluster of the tasks that call the LLM tiers;
- the artifact builds a wheel that holds every task's entry point;
- the notebooks are Databricks source notebooks; the one that runs a stage (`stage` widget) passes the
  same arguments as that stage's workflow task.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from annomine.config import load_job_config
from annomine.docs_gen import view_docs
from annomine.stages import BY_NAME

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks_databricks"

TOP_LEVEL = {"bundle", "include", "artifacts", "variables", "workspace", "resources", "targets", "sync", "permissions",
             "run_as", "presets", "experimental", "scripts", "python", "environments"}
TARGET_KEYS = {"default", "mode", "workspace", "variables", "resources", "artifacts", "bundle", "cluster_id", "compute_id",
               "git", "sync", "permissions", "run_as", "presets"}
KNOWN_REFS = {"workspace.file_path", "workspace.current_user.userName", "workspace.current_user.short_name",
              "workspace.root_path", "bundle.name", "bundle.target"}
REF = re.compile(r"(?<!\$)\$\{([A-Za-z0-9_.\[\]-]+)\}")
WORKFLOW = ROOT / "resources" / "annomine_workflow.yml"
ANCHOR_BLOCK = "x-"  # top-level keys that only hold YAML anchors (as in annomine's config files)


# ---- loading the bundle the way the CLI does ------------------------------------------------------
def _deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def top_level_anchors(text: str) -> dict[str, str | None]:
    """Each top-level key of a YAML document and the anchor of its value (None: not anchored)."""
    out: dict[str, str | None] = {}
    depth, key, expecting_key = 0, None, True
    for event in yaml.parse(text):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            if depth == 1 and not expecting_key:
                out[key], expecting_key = event.anchor, True
            depth += 1
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        elif isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent)) and depth == 1:
            if expecting_key:
                key, expecting_key = event.value, False
            else:
                out[key], expecting_key = getattr(event, "anchor", None), True
    return out


def without_anchor_blocks(path: Path) -> dict:
    """A bundle file as the CLI reads it: YAML anchors, aliases and `<<` merge keys resolved (its YAML
    loader does all three), and the anchored `x-...` blocks, which only hold anchors, left out (the CLI
    raises no "unknown field" warning for an anchored value). Such a block must be anchored."""
    text = path.read_text()
    for key, anchor in top_level_anchors(text).items():
        if key.startswith(ANCHOR_BLOCK):
            assert anchor, f"{path.name}: top-level {key!r} holds no anchor (the CLI would warn: unknown field)"
    return {k: v for k, v in yaml.safe_load(text).items() if not k.startswith(ANCHOR_BLOCK)}


def load_bundle() -> tuple[dict, dict[str, Path]]:
    """databricks.yml with its includes merged; also where each job was defined (for relative paths)."""
    root = without_anchor_blocks(ROOT / "databricks.yml")
    defined_in: dict[str, Path] = {}
    for pattern in root.get("include", []):
        files = sorted(ROOT.glob(pattern))
        assert files, f"include {pattern!r} matches no file"
        for path in files:
            doc = without_anchor_blocks(path)
            assert set(doc) <= {"resources", "targets", "variables"}, f"{path}: unexpected top-level keys {set(doc)}"
            for job in doc.get("resources", {}).get("jobs", {}):
                defined_in[job] = path
            root = _deep_merge(root, {k: v for k, v in doc.items()})
    return root, defined_in


def target_config(bundle: dict, target: str) -> dict:
    """The bundle as deployed to `target`: its resources/variables/workspace overrides merged in."""
    overrides = bundle["targets"][target] or {}
    merged = _deep_merge({k: v for k, v in bundle.items() if k != "targets"},
                         {k: v for k, v in overrides.items() if k in ("resources", "workspace", "permissions", "run_as")})
    values = {name: spec.get("default") for name, spec in bundle["variables"].items()}
    values.update(overrides.get("variables") or {})
    merged["_variables"] = values
    return merged


def resolve(value, cfg: dict, job_params: bool = False):
    """Substitute `${var.x}`, `${resources.schemas.x.name}`, workspace/bundle refs (and job parameters)."""
    if isinstance(value, dict):
        return {k: resolve(v, cfg, job_params) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, cfg, job_params) for v in value]
    if not isinstance(value, str):
        return value

    def sub(match):
        ref = match.group(1)
        if ref.startswith("var."):
            return str(resolve(cfg["_variables"][ref[4:]], cfg))
        if ref.startswith("resources.schemas.") and ref.endswith(".name"):
            return str(resolve(cfg["resources"]["schemas"][ref.split(".")[2]]["name"], cfg))
        return {"workspace.file_path": str(ROOT), "workspace.current_user.userName": "someone@example.com",
                "bundle.name": cfg["bundle"]["name"], "bundle.target": "dev"}[ref]

    out = REF.sub(sub, value)
    if job_params:
        params = {p["name"]: resolve(p["default"], cfg) for p in cfg["resources"]["jobs"]["annomine_pipeline"]["parameters"]}
        out = re.sub(r"\{\{job\.parameters\.([a-z_]+)\}\}", lambda m: params[m.group(1)], out)
    return out


BUNDLE, DEFINED_IN = load_bundle()
JOB = BUNDLE["resources"]["jobs"]["annomine_pipeline"]
ALL_TASKS = {t["task_key"]: t for t in JOB["tasks"]}
TASKS = {k: t for k, t in ALL_TASKS.items() if "spark_python_task" in t}  # the stages


def _stage_of(task: dict) -> str:
    return Path(task["spark_python_task"]["python_file"]).stem


# ---- argv capture: a stage's `main` parses its arguments, then stops ----------------------------
class Parsed(Exception):
    def __init__(self, namespace):
        super().__init__("parsed")
        self.namespace = namespace


@pytest.fixture
def parse_only(monkeypatch):
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)


def check_stage_arguments(stage: str, argv: list[str]) -> argparse.Namespace:
    """`jobs.<stage>.main(argv)` parses argv; the config file with its --set overrides loads."""
    module = importlib.import_module(f"jobs.{stage}")
    assert callable(getattr(module, "main", None)) and hasattr(module, "CONFIG_CLASS"), f"jobs/{stage}.py lacks main/CONFIG_CLASS"
    with pytest.raises(Parsed) as parsed:
        module.main(argv)
    ns = parsed.value.namespace
    assert Path(ns.conf).is_file(), f"{stage}: config file {ns.conf} does not exist"
    project, _cfg = load_job_config(ns.conf, stage, module.CONFIG_CLASS, ns.overrides)  # unknown keys raise
    return ns


# ---- the bundle ---------------------------------------------------------------------------------
def test_top_level_and_target_keys_are_bundle_keys():
    assert set(BUNDLE) <= TOP_LEVEL, set(BUNDLE) - TOP_LEVEL
    assert BUNDLE["bundle"]["name"] == "annomine"
    assert set(BUNDLE["targets"]) == {"dev", "prod"}
    assert BUNDLE["targets"]["dev"]["mode"] == "development" and BUNDLE["targets"]["dev"]["default"] is True
    assert BUNDLE["targets"]["prod"]["mode"] == "production"
    for name, target in BUNDLE["targets"].items():
        assert set(target) <= TARGET_KEYS, f"target {name}: {set(target) - TARGET_KEYS}"
        unknown = set(target.get("variables") or {}) - set(BUNDLE["variables"])
        assert not unknown, f"target {name} sets undeclared variables {unknown}"


def test_every_reference_resolves():
    text = "\n".join(p.read_text() for p in [ROOT / "databricks.yml", *sorted((ROOT / "resources").glob("*.yml"))])
    refs = set(REF.findall(text))
    for ref in refs:
        if ref.startswith("var."):
            assert ref[4:] in BUNDLE["variables"], f"${{{ref}}}: undeclared variable"
        elif ref.startswith("resources."):
            kind, name = ref.split(".")[1:3]
            assert name in BUNDLE["resources"][kind], f"${{{ref}}}: no such resource"
        else:
            assert ref in KNOWN_REFS, f"${{{ref}}}: unknown reference"
    job_params = set(re.findall(r"\{\{job\.parameters\.([a-z_]+)\}\}", text))
    assert job_params == {p["name"] for p in JOB["parameters"]}, "a job parameter is unused or undeclared"


@pytest.mark.parametrize("target", ["default", "dev", "prod"])
def test_resources_load_into_the_databricks_bundles_models(target):
    bundles_jobs = pytest.importorskip("databricks.bundles.jobs")
    from databricks.bundles.schemas import Schema
    from databricks.bundles.volumes import Volume

    cfg = BUNDLE if target == "default" else target_config(BUNDLE, target)
    for name, job in cfg["resources"]["jobs"].items():
        model = bundles_jobs.Job.from_dict(copy.deepcopy(job))  # unknown fields / wrong types raise
        assert [t.task_key for t in model.tasks] == [t["task_key"] for t in job["tasks"]]
    for name, schema in cfg["resources"]["schemas"].items():
        Schema.from_dict(copy.deepcopy(schema))
    for name, volume in cfg["resources"]["volumes"].items():
        Volume.from_dict(copy.deepcopy(volume))


def test_task_dag_follows_the_stage_dependencies():
    from annomine.config import ProjectConfig
    from jobs.pipeline import STAGES

    order = [s.name for s in STAGES]
    parents = {k: [d["task_key"] for d in t.get("depends_on", [])] for k, t in ALL_TASKS.items()}
    for key, deps in parents.items():
        assert set(deps) <= set(ALL_TASKS), f"{key} depends on unknown tasks {set(deps) - set(ALL_TASKS)}"

    def ancestors(key, seen=()):
        assert key not in seen, f"cycle through {key}"
        out = set()
        for p in parents[key]:
            out |= {p} | ancestors(p, seen + (key,))
        return out

    stage_of = {k: _stage_of(t) for k, t in TASKS.items()}
    assert set(stage_of.values()) == set(order), "every pipeline stage is a task, and nothing else"
    for key in TASKS:
        for dep in parents[key]:
            assert order.index(stage_of[dep]) <= order.index(stage_of[key]), f"{dep} -> {key} runs against the stage order"
    # What each stage reads, and which stage writes it: tables and artefact files.
    project = ProjectConfig(warehouse="/wh")
    defaults = {spec.name: importlib.import_module(spec.module).CONFIG_CLASS() for spec in STAGES}
    writers: dict[str, set[str]] = {}
    for spec in STAGES:
        for out in spec.output_tables + [str(p) for p in spec.output_files(project, defaults[spec.name])]:
            writers.setdefault(out, set()).add(spec.name)
    needs = {spec.name: {w for inp in spec.input_tables + [str(p) for p in spec.input_files(project, defaults[spec.name])]
                         for w in writers.get(inp, set()) if w != spec.name} for spec in STAGES}
    needs["train"].add("curriculum")  # the Parquet shards (not a table)
    for key in TASKS:
        ancestor_stages = {stage_of[a] for a in ancestors(key)}
        missing = needs[stage_of[key]] - ancestor_stages
        assert not missing, f"task {key} can start before {missing}, which write what it reads"
    assert order.index("annotate") > order.index("judge") and "judge_calibrate" in ancestors("annotate")
    # The views task runs once every table its views read has been written.
    view_tables = {t for _, _, reads in view_docs() for t in reads if not t.startswith("v_")}
    writers_of_views = {w for t in view_tables for w in writers.get(t, set())} | {"curriculum"}
    assert writers_of_views <= {stage_of[a] for a in ancestors("sql_views")}


def test_tasks_are_derived_from_the_stage_list():
    """annomine/stages.py (the CLI's stages), jobs.pipeline.STAGES (their tables) and the workflow agree:
    every stage with a config section is a task running that stage's module, and nothing else is, and
    the tasks are listed in the stages' order."""
    from annomine.stages import CONFIG_SECTIONS, STAGES
    from jobs.pipeline import STAGES as PIPELINE_STAGES

    with_section = [s.name for s in STAGES if s.has_section]
    assert with_section == [spec.name for spec in PIPELINE_STAGES] == list(CONFIG_SECTIONS[1:])
    assert all(BY_NAME[spec.name].module == spec.module for spec in PIPELINE_STAGES)
    stage_of = {k: _stage_of(t) for k, t in TASKS.items()}
    assert sorted(set(stage_of.values())) == sorted(with_section), "every stage with a section is a task, and nothing else"
    for key, task in TASKS.items():
        python_file = (DEFINED_IN["annomine_pipeline"].parent / task["spark_python_task"]["python_file"]).resolve()
        assert python_file == ROOT / (BY_NAME[stage_of[key]].module.replace(".", "/") + ".py"), key
    positions = [with_section.index(stage_of[k]) for k in ALL_TASKS if k in TASKS]
    assert positions == sorted(positions), "tasks are listed in the stages' order"
    # Two tasks of one stage differ by their action: the judge's, `train` then `calibrate`.
    for stage in with_section:
        keys = [k for k in TASKS if stage_of[k] == stage]
        assert keys == [stage] or all(k.startswith(f"{stage}_") for k in keys), keys
        if len(keys) > 1:
            actions = [TASKS[k]["spark_python_task"]["parameters"][0] for k in keys]
            assert [f"{stage}_{a}" for a in actions] == keys


def _workflow_source() -> tuple[dict, yaml.Node]:
    text = WORKFLOW.read_text()
    return yaml.safe_load(text), yaml.compose(text)


def _child(node: yaml.Node, key: str) -> yaml.Node:
    return next(v for k, v in node.value if k.value == key)


def test_shared_settings_are_written_once():
    """The sharing is real: each `--set` pair, and the config path, is written once in the workflow file
    (YAML aliases carry it to the tasks); every stage task gets the shared arguments, in order; every
    task merges the task template and states only what is its own."""
    doc, tree = _workflow_source()
    literal: dict[str, int] = {}
    for event in yaml.parse(WORKFLOW.read_text()):
        if isinstance(event, yaml.ScalarEvent):
            literal[event.value] = literal.get(event.value, 0) + 1
    values = {argv[i + 1] for argv in (t["spark_python_task"]["parameters"] for t in TASKS.values())
              for i in range(len(argv) - 1) if argv[i] in ("--set", "--conf")}  # the --set pairs' values, the config
    assert len(values) > 5 and all(literal.get(a) for a in values)
    written_twice = {a for a in values if literal[a] > 1}
    assert not written_twice, f"written more than once (use the anchor's alias): {written_twice}"

    shared = doc[f"{ANCHOR_BLOCK}stage-args"]
    assert shared[:2] == ["--conf", "${workspace.file_path}/conf/databricks.yaml"]
    assert {a.split("=")[0] for a in shared[3::2]} == {"project.catalog", "project.schema", "project.warehouse",
                                                      "project.mlflow_experiment"}
    for key, task in TASKS.items():
        argv = task["spark_python_task"]["parameters"]
        starts = [i for i in range(len(argv)) if argv[i:i + len(shared)] == shared]
        assert starts and starts[0] <= 1, f"{key}: the shared arguments are missing or out of order"
        assert argv.count("--conf") == 1, key
    assert ALL_TASKS["sql_views"]["notebook_task"]["base_parameters"]["conf"] == shared[1]

    template = doc[f"{ANCHOR_BLOCK}task"]
    tasks_node = _child(_child(_child(_child(tree, "resources"), "jobs"), "annomine_pipeline"), "tasks")
    for node, task in zip(tasks_node.value, JOB["tasks"]):
        merges = [k for k, _ in node.value if k.tag == "tag:yaml.org,2002:merge"]
        assert len(merges) == 1, f"{task['task_key']}: merge the task template once (`<<: *task`)"
        restated = {k.value for k, _ in node.value if k.value in template and task[k.value] == template[k.value]}
        assert not restated, f"{task['task_key']} restates the template's {restated}"
        assert set(template) <= set(task)
    # Clusters: llm is cpu plus the key; all three share one environment.
    clusters = {c["job_cluster_key"]: c["new_cluster"] for c in JOB["job_clusters"]}
    assert {k: v for k, v in clusters["llm"].items() if k != "spark_env_vars"} == {
        k: v for k, v in clusters["cpu"].items() if k != "spark_env_vars"}
    assert clusters["llm"]["spark_env_vars"].items() > clusters["cpu"]["spark_env_vars"].items()
    assert clusters["gpu"]["spark_env_vars"] == clusters["cpu"]["spark_env_vars"]


def test_sql_views_task_runs_the_exploration_notebook(spark):
    task = ALL_TASKS["sql_views"]
    assert set(ALL_TASKS) - set(TASKS) == {"sql_views"}
    notebook = (DEFINED_IN["annomine_pipeline"].parent / task["notebook_task"]["notebook_path"]).resolve()
    assert notebook == NOTEBOOKS / "explore_curated_tables.py"
    # Job parameters become widgets of the same name; the task only adds the config path.
    w = Widgets({})
    dbutils = type("DBUtils", (), {"widgets": w})()
    exec(compile("\n".join(c for c in notebook_cells(NOTEBOOKS / "_common.py") if not c.startswith("# MAGIC")),
                 "_common", "exec"), {"dbutils": dbutils, "__name__": "x"})
    assert {p["name"] for p in JOB["parameters"]} - {"input"} <= set(w.defined)
    assert set(task["notebook_task"]["base_parameters"]) <= set(w.defined)
    assert resolve(task["notebook_task"]["base_parameters"]["conf"], BUNDLE) == str(ROOT / "conf" / "databricks.yaml")
    assert task["libraries"] == TASKS["ingest"]["libraries"]


@pytest.mark.parametrize("task_key", sorted(TASKS))
def test_every_task_runs_an_existing_entry_point_with_valid_parameters(task_key, parse_only):
    task = TASKS[task_key]
    assert set(task) >= {"task_key", "spark_python_task", "job_cluster_key", "libraries"}
    python_file = (DEFINED_IN["annomine_pipeline"].parent / task["spark_python_task"]["python_file"]).resolve()
    assert python_file.is_file(), f"{task_key}: {python_file} does not exist"
    assert python_file.parent == ROOT / "jobs"
    for target in ("dev", "prod"):
        cfg = target_config(BUNDLE, target)
        argv = resolve(task["spark_python_task"]["parameters"], cfg, job_params=True)
        assert not any("${" in a or "{{" in a for a in argv), argv
        ns = check_stage_arguments(python_file.stem, argv)
        overrides = dict(o.split("=", 1) for o in ns.overrides)
        schema = resolve("${resources.schemas.annomine.name}", cfg)
        assert overrides["project.catalog"] == cfg["_variables"]["catalog"] and overrides["project.schema"] == schema
        assert overrides["project.warehouse"] == f"/Volumes/{cfg['_variables']['catalog']}/{schema}/scratch"
        assert "scratch" in cfg["resources"]["volumes"] and cfg["resources"]["volumes"]["scratch"]["name"] == "scratch"


def test_libraries_come_from_the_bundle_wheel_and_the_requirements_file():
    artifact = BUNDLE["artifacts"]["annomine_wheel"]
    assert artifact["type"] == "whl" and "--wheel-dir dist" in artifact["build"]
    requirements = ROOT / "resources" / "requirements-databricks.txt"
    for key, task in TASKS.items():
        libs = task["libraries"]
        assert {"whl": "../dist/*.whl"} in libs, key
        assert {"requirements": "${workspace.file_path}/resources/requirements-databricks.txt"} in libs, key
    wanted = [line.split(";")[0].strip() for line in requirements.read_text().splitlines() if line.strip() and not line.startswith("#")]
    setup_text = (ROOT / "setup.py").read_text()
    for req in wanted:
        name = re.split(r"[<>=!~ ]", req)[0]
        assert f'"{req}"' in setup_text, f"{req} is not pinned like in setup.py's extras"
        assert name != "torch", "torch must come from the Databricks runtime (its CUDA build)"


def test_clusters_gpu_training_and_secrets():
    clusters = {c["job_cluster_key"]: c["new_cluster"] for c in JOB["job_clusters"]}
    for key, task in TASKS.items():
        assert task["job_cluster_key"] in clusters, key
    for target in ("dev", "prod"):
        cfg = target_config(BUNDLE, target)
        gpu = resolve(clusters[TASKS["train"]["job_cluster_key"]], cfg)
        assert "gpu-ml" in gpu["spark_version"] and gpu["num_workers"] == 0
        assert gpu["spark_conf"]["spark.databricks.cluster.profile"] == "singleNode"
        argv = resolve(TASKS["train"]["spark_python_task"]["parameters"], cfg, job_params=True)
        assert "train.launcher=torch_distributor" in argv and f"train.num_proc={cfg['_variables']['gpus']}" in argv
        for key in ("cpu", "llm"):
            assert "cpu-ml" in resolve(clusters[key], cfg)["spark_version"]
    prod = target_config(BUNDLE, "prod")["_variables"]
    dev = target_config(BUNDLE, "dev")["_variables"]
    assert (prod["gpu_node_type"], prod["gpus"]) != (dev["gpu_node_type"], dev["gpus"])
    # The LLM key: a secret reference on the llm cluster only, and only LLM-calling tasks run there.
    with_secret = {k for k, c in clusters.items() if "{{secrets/" in yaml.safe_dump(c)}
    assert with_secret == {"llm"}
    env = resolve(clusters["llm"]["spark_env_vars"], BUNDLE | {"_variables": {n: s.get("default") for n, s in BUNDLE["variables"].items()}})
    assert env["ANNOMINE_LLM_KEY"] == "{{secrets/annomine/llm_api_key}}"
    assert {k for k, t in TASKS.items() if t["job_cluster_key"] == "llm"} == {"annotate", "judge_calibrate"}
    for path in [ROOT / "databricks.yml", *(ROOT / "resources").glob("*"), ROOT / "conf" / "databricks.yaml"]:
        assert not re.search(r"(sk-[A-Za-z0-9]{16,}|dapi[0-9a-f]{16,})", path.read_text()), f"{path}: looks like a literal key"


def test_schedule_and_parameters():
    schedule = JOB["schedule"]
    assert len(schedule["quartz_cron_expression"].split()) in (6, 7)
    assert target_config(BUNDLE, "prod")["_variables"]["schedule_pause_status"] == "UNPAUSED"
    assert BUNDLE["variables"]["schedule_pause_status"]["default"] == "PAUSED"
    assert [p["name"] for p in JOB["parameters"]] == ["catalog", "schema", "input"]
    assert JOB["max_concurrent_runs"] == 1


def test_artifact_builds_a_wheel_with_every_entry_point(tmp_path):
    """The artifact's build command (offline: without build isolation) gives a wheel holding every
    task's python file and the packages they import."""
    import shutil

    src = tmp_path / "src"  # a copy of what the wheel is built from: the working tree stays untouched
    for name in ("setup.py", "README.md"):
        src.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, src / name)
    for package in ("annomine", "jobs", "spark_udfs", "training"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    cmd = BUNDLE["artifacts"]["annomine_wheel"]["build"].replace("python3", sys.executable).split()
    env = dict(os.environ)
    while "=" in cmd[0]:  # the command's leading VAR=value settings
        name, value = cmd.pop(0).split("=", 1)
        env[name] = value
    cmd[cmd.index("dist")] = str(tmp_path / "dist")
    proc = subprocess.run(cmd + ["--no-build-isolation", "--quiet"], cwd=src, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("annomine-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")  # installs on any cluster, whatever machine built it
    names = set(zipfile.ZipFile(wheel).namelist())
    for task in TASKS.values():
        assert f"jobs/{_stage_of(task)}.py" in names
    for module in ("annomine/sql_runner.py", "annomine/spark.py", "training/launchers.py", "spark_udfs/__init__.py"):
        assert module in names


# ---- notebooks ----------------------------------------------------------------------------------
class Widgets:
    """The part of `dbutils.widgets` the notebooks use; values given up front win over defaults."""

    def __init__(self, values: dict[str, str]):
        self.values, self.defined, self.choices = dict(values), {}, {}

    def text(self, name, default, label=None):
        self.defined[name] = default
        self.values.setdefault(name, default)

    def dropdown(self, name, default, choices, label=None):
        assert default in choices, f"widget {name}: default {default!r} not in {choices}"
        assert self.values.get(name, default) in choices, f"widget {name}: {self.values[name]!r} not in {choices}"
        self.choices[name] = list(choices)
        self.text(name, default, label)

    def get(self, name):
        if name not in self.defined:
            raise ValueError(f"widget {name!r} is read before it is defined")
        return self.values[name]


def notebook_cells(path: Path) -> list[str]:
    text = path.read_text()
    assert text.startswith("# Databricks notebook source\n"), f"{path.name}: not a Databricks source notebook"
    return [c.strip("\n") for c in text[len("# Databricks notebook source\n"):].split("\n# COMMAND ----------\n")]


def run_notebook(path: Path, widgets: dict[str, str] | Widgets, spark, ns: dict | None = None) -> dict:
    """Execute a source notebook as Databricks would, with `dbutils.widgets`, `display` and `spark`:
    %md is skipped, %pip checked (its requirements file must exist), %run executed in the same
    namespace, %sql run with its :catalog / :schema parameters bound."""
    if ns is None:
        dbutils = type("DBUtils", (), {})()
        dbutils.widgets = widgets if isinstance(widgets, Widgets) else Widgets(widgets)
        ns = {"__name__": "__main__", "dbutils": dbutils, "spark": spark, "displayed": []}
        ns["display"] = ns["displayed"].append
        cwd = os.getcwd()
        os.chdir(path.parent)  # Databricks runs a workspace-file notebook in its own folder
        try:
            return run_notebook(path, widgets, spark, ns)
        finally:
            os.chdir(cwd)
    for i, cell in enumerate(notebook_cells(path)):
        lines = [line for line in cell.splitlines() if line.strip()]
        if not lines:
            continue
        if all(line.startswith("# MAGIC") for line in lines):
            body = [line[len("# MAGIC"):].strip() for line in lines]
            magic = body[0].split()[0]
            if magic == "%md":
                continue
            if magic == "%pip":
                req = body[0].split("-r", 1)[1].strip()
                assert (path.parent / req).is_file(), f"{path.name}: %pip requirements {req} not found"
            elif magic == "%run":
                run_notebook((path.parent / body[0].split()[1]).with_suffix(".py"), widgets, spark, ns)
            elif magic == "%sql":
                w = ns["dbutils"].widgets
                namespace = ".".join(x for x in (w.get("catalog"), w.get("schema")) if x)
                sql = re.sub(r"IDENTIFIER\(:catalog \|\| '\.' \|\| :schema \|\| '\.(\w+)'\)", namespace + r".\1", "\n".join(body[1:]))
                ns["display"](spark.sql(sql))
            else:
                raise AssertionError(f"{path.name}: unknown magic {magic}")
            continue
        assert not any(line.startswith("# MAGIC") for line in lines), f"{path.name} cell {i}: mixes code and magic"
        exec(compile(cell, f"{path.name}[cell {i}]", "exec"), ns)  # noqa: S102 - the notebook under test
    return ns


RUN_STAGE = NOTEBOOKS / "run_stage.py"


def test_one_notebook_runs_any_stage_plus_exploration(parse_only, spark):
    from annomine.stages import STAGES

    assert {p.name for p in NOTEBOOKS.glob("*.py")} == {"_common.py", "run_stage.py", "explore_curated_tables.py"}
    for path in NOTEBOOKS.glob("*.py"):
        cells = notebook_cells(path)
        code = "\n".join(c for c in cells if not c.lstrip().startswith("# MAGIC"))
        assert len(code.splitlines()) <= 45, f"{path.name}: notebooks stay thin; logic belongs in the package"
        if path.name != "_common.py":
            assert any(c.strip() == "# MAGIC %run ./_common" for c in cells), path.name
    widgets = Widgets({})
    with pytest.raises(Parsed):
        run_notebook(RUN_STAGE, widgets, spark)
    assert widgets.choices["stage"] == [s.name for s in STAGES if s.has_section] + ["pipeline"]
    assert widgets.defined["stage"] == "ingest"


def _notebook_widgets(cfg: dict, **more: str) -> dict[str, str]:
    """The run_stage widgets a user sets to run a stage as the workflow does on `cfg`'s target."""
    params = {p["name"]: resolve(p["default"], cfg) for p in JOB["parameters"]}
    return {"catalog": params["catalog"], "schema": params["schema"], "input": params["input"],
            "num_proc": str(cfg["_variables"]["gpus"]), **more}


def _parsed_notebook(widgets: dict[str, str], spark) -> argparse.Namespace:
    with pytest.raises(Parsed) as parsed:
        run_notebook(RUN_STAGE, widgets, spark)
    return parsed.value.namespace


@pytest.mark.parametrize("task_key", sorted(TASKS))
def test_run_stage_notebook_passes_the_arguments_of_the_stage_task(task_key, parse_only, spark):
    """The interactive path and the workflow agree: run_stage with a task's stage (and the judge's action)
    parses to the task's arguments, less the MLflow experiment (the notebook keeps the config's)."""
    task = TASKS[task_key]
    stage = _stage_of(task)
    for target in ("dev", "prod"):
        cfg = target_config(BUNDLE, target)
        task_ns = check_stage_arguments(stage, resolve(task["spark_python_task"]["parameters"], cfg, job_params=True))
        more = {"stage": stage, **({"action": task_ns.action} if stage == "judge" else {})}
        ns = _parsed_notebook(_notebook_widgets(cfg, **more), spark)
        assert ns.conf == str(ROOT / "conf" / "databricks.yaml") == task_ns.conf
        assert {k: v for k, v in vars(ns).items() if k != "overrides"} == {
            k: v for k, v in vars(task_ns).items() if k != "overrides"}
        experiment = [o for o in task_ns.overrides if o.startswith("project.mlflow_experiment=")]
        assert sorted(ns.overrides) == sorted(set(task_ns.overrides) - set(experiment)), target
        module = importlib.import_module(BY_NAME[stage].module)
        load_job_config(ns.conf, stage, module.CONFIG_CLASS, ns.overrides)


def test_run_stage_notebook_runs_the_pipeline_with_every_stage_setting(parse_only, spark):
    from jobs.pipeline import stage_configs

    cfg = target_config(BUNDLE, "dev")
    ns = _parsed_notebook(_notebook_widgets(cfg, stage="pipeline", num_proc="2", launcher="torchrun"), spark)
    assert {"project.catalog=main", "project.schema=annomine", "project.warehouse=/Volumes/main/annomine/scratch",
            "ingest.products.path=/Volumes/main/annomine/raw/products.parquet",
            "train.launcher=torchrun", "train.num_proc=2"} <= set(ns.overrides)
    configs = stage_configs(ns.conf, ns.overrides)  # every stage's section loads with them
    assert configs["train"].num_proc == 2 and configs["ingest"].products.path.endswith("/raw/products.parquet")
    # Empty widgets: the config's namespace and input paths, nothing overridden.
    ns = _parsed_notebook({"stage": "ingest", "catalog": "", "schema": "", "input": ""}, spark)
    assert ns.overrides == []


# ---- docs ---------------------------------------------------------------------------------------
def test_config_examples_in_the_docs_load_into_the_config_classes():
    """Every YAML config example in the Databricks, LLM and spark-submit docs is a valid config."""
    from annomine.config import ProjectConfig, from_dict
    from annomine.judges.config import LLMTierConfig
    from jobs.annotate import AnnotateConfig
    from jobs.ingest import IngestConfig
    from jobs.judge import JudgeConfig

    checked = 0
    for name in ("databricks.md", "llm_endpoints.md", "spark_submit.md"):
        text = (ROOT / "docs" / name).read_text()
        for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
            doc = yaml.safe_load(block)
            where = f"docs/{name}"
            if "judge" in doc:
                from_dict(JudgeConfig, doc["judge"], f"{where}:judge")
                from_dict(AnnotateConfig, doc["annotate"], f"{where}:annotate")
            elif "tier2" in doc:
                from_dict(LLMTierConfig, doc["tier2"], f"{where}:tier2")
            elif "project" in doc:
                from_dict(ProjectConfig, doc["project"], f"{where}:project")
                from_dict(IngestConfig, doc["ingest"], f"{where}:ingest")
            else:
                continue
            checked += 1
    assert checked >= 6
