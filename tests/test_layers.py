"""The layering rule (docs/architecture.md): core `annomine` <- `spark_udfs`, `training` <- `jobs` <-
`notebooks_databricks`, and the research `lab` beside the notebooks: it imports the product, nothing in the
product imports it. No module imports from a layer above its own, at module level or inside a
function. Checked on the source with `ast`, so nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"annomine": 0, "spark_udfs": 1, "training": 1, "jobs": 2, "notebooks_databricks": 3, "lab": 3}
CHECKED = ("annomine", "spark_udfs", "training", "jobs", "lab")

# Upward imports that predate this test, (file, imported module); each is to be removed from here when
# its import is fixed (the test fails on a stale entry too). Add nothing.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


def _module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, relative ones resolved against `module`,
    plus `importlib.import_module("...")` / `__import__("...")` calls with a constant name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = package[: len(package) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def upward_imports(path: Path) -> list[tuple[str, int, str]]:
    rel = path.relative_to(ROOT).as_posix()
    own = LAYERS[rel.split("/")[0]]
    out = []
    for line, name in imported_modules(path.read_text(encoding="utf-8"), _module_of(path), path.name == "__init__.py"):
        layer = LAYERS.get(name.split(".")[0])
        if layer is not None and layer > own:
            out.append((rel, line, name))
    return out


def _sources() -> list[Path]:
    return sorted(p for top in CHECKED for p in (ROOT / top).rglob("*.py"))


def test_no_module_imports_from_a_layer_above_its_own():
    files = _sources()
    assert len(files) > 40, "the walk found too few modules"
    found = [v for path in files for v in upward_imports(path)]
    new = [f"{rel}:{line} imports {name}" for rel, line, name in found if (rel, name) not in KNOWN_VIOLATIONS]
    assert not new, ("upward import(s); layers are annomine <- spark_udfs, training <- jobs <- notebooks_databricks, lab:\n"
                     + "\n".join(new))
    stale = KNOWN_VIOLATIONS - {(rel, name) for rel, _, name in found}
    assert not stale, f"fixed, so remove from KNOWN_VIOLATIONS: {sorted(stale)}"


def test_the_checker_sees_every_kind_of_import():
    src = ("import jobs.annotate\nfrom training import model\n"
           "def f():\n    from jobs.fake_llm_server import main\n    import importlib\n    importlib.import_module('jobs.judge')\n"
           "from . import sibling\nfrom ..judges import cascade\n")
    names = sorted(name for _, name in imported_modules(src, "annomine.evaluation.report"))
    assert names == ["annomine.evaluation", "annomine.judges", "importlib", "jobs.annotate",
                     "jobs.fake_llm_server", "jobs.judge", "training"]
    assert [n for _, n in imported_modules("from . import x\n", "annomine.judges", is_package=True)] == ["annomine.judges"]


def test_the_product_does_not_import_the_lab():
    product = [p for top in ("annomine", "spark_udfs", "training", "jobs", "notebooks_databricks")
               for p in (ROOT / top).rglob("*.py")]
    found = [f"{p.relative_to(ROOT)}:{line} imports {name}" for p in product
             for line, name in imported_modules(p.read_text(encoding="utf-8"), _module_of(p), p.name == "__init__.py")
             if name.split(".")[0] == "lab"]
    assert not found, "the product imports the lab:\n" + "\n".join(found)
    assert (ROOT / "lab" / "__init__.py").is_file() and len(product) > 40


def module_graph(tops: tuple[str, ...] = ("annomine", "spark_udfs", "training", "jobs")) -> dict[str, set[str]]:
    """module -> the product modules it imports (at module level or in a function; `from p import m` names the
    module p.m when m is one, else p)."""
    files = {_module_of(p): p for top in tops for p in (ROOT / top).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            graph[module] |= {t for t in targets if t in files and t != module}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_no_circle_of_imports_in_the_product():
    graph = module_graph()
    assert len(graph) > 40 and any(graph.values())
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    circles = import_circles(graph)
    assert not circles, "import circles (a function-level import counts too):\n" + "\n".join(map(" <-> ".join, circles))


def test_the_repository_tracks_no_environment_or_output():
    """A tracked `.venv` link would replace a checkout's own virtual environment on the next merge."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        import pytest

        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "--", ".venv", "venv", "warehouse", "mlruns"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    assert not tracked, f"tracked environment or output paths: {tracked}"
