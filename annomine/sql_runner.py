"""Run the SQL files in `sql/` (curated views and example queries) on annomine's tables.

The files are plain Spark SQL that users can also paste into a Databricks SQL editor. Where the
tables live is written `${namespace}`: the runner replaces it with `<schema>` on the embedded
engine (e.g. `annomine`) or `<catalog>.<schema>` on Unity Catalog (e.g. `main.annomine`). In a
SQL editor, replace it by hand (or with the editor's find/replace).

`00_views.sql` creates the curated `v_*` views; every other file is one example query. A
statement whose tables do not exist yet (the stage that writes them has not run) is skipped with
a message that names the table and the job that writes it, so `annomine sql` works after any
prefix of the pipeline.

    annomine sql --conf conf/local.yaml                      # create the views, run every query
    annomine sql --conf conf/local.yaml difficulty_mix_by_segment tier_disagreement
    annomine sql --conf conf/local.yaml --list
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from annomine.errors import AnnomineError, MissingInputError

log = logging.getLogger("annomine.sql")

VIEWS_FILE = "00_views.sql"
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TABLE_REF = re.compile(r"\$\{namespace\}\.([A-Za-z_][A-Za-z0-9_]*)")
_CREATED_VIEW = re.compile(r"^\s*CREATE\s+(?:OR\s+REPLACE\s+)?VIEW\s+\$\{namespace\}\.([A-Za-z_][A-Za-z0-9_]*)", re.I)


class SqlFileError(AnnomineError, ValueError):
    """A SQL file is malformed (unknown placeholder, no statement); the message names the file."""


class UnknownQueryError(AnnomineError, KeyError):
    """A query name matches no SQL file; the message names it and the folder."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def default_sql_dir() -> Path:
    """`$ANNOMINE_SQL_DIR`, else the repository's `sql/` folder (next to the `annomine` package)."""
    env = os.environ.get("ANNOMINE_SQL_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "sql"


def namespace_of(project) -> str:
    """Where the tables live: `catalog.schema` on Unity Catalog, `schema` on the embedded engine."""
    return f"{project.catalog}.{project.schema}" if project.catalog else project.schema


def split_statements(text: str) -> list[str]:
    """Statements of a SQL script: `--` comments removed, split on `;` outside quotes."""
    statements, current = [], []
    i, quote = 0, None
    while i < len(text):
        ch = text[i]
        if quote:
            current.append(ch)
            if ch == quote:
                quote = None
        elif ch in ("'", '"', "`"):
            quote = ch
            current.append(ch)
        elif ch == "-" and text.startswith("--", i):
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        elif ch == ";":
            statements.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    statements.append("".join(current))
    return [s.strip() for s in statements if s.strip()]


def _description(text: str) -> str:
    """The leading comment block of a file (what the query answers)."""
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("--"):
            lines.append(stripped[2:].strip())
        elif stripped or lines:
            break
    return " ".join(x for x in lines if x)


@dataclass
class SqlFile:
    path: Path
    statements: list[str]
    description: str

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def is_views(self) -> bool:
        return self.path.name == VIEWS_FILE


def load_file(path: str | os.PathLike) -> SqlFile:
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    statements = split_statements(text)
    if not statements:
        raise SqlFileError(f"{path}: no SQL statement")
    for statement in statements:
        unknown = sorted({m.group(1) for m in _PLACEHOLDER.finditer(statement)} - {"namespace"})
        if unknown:
            raise SqlFileError(f"{path}: unknown placeholder(s) {['${' + u + '}' for u in unknown]}; only ${{namespace}} exists")
    return SqlFile(path, statements, _description(text))


def sql_files(sql_dir: str | os.PathLike | None = None) -> list[SqlFile]:
    """Every SQL file of the folder: the views file first, then the queries by name."""
    folder = Path(sql_dir) if sql_dir else default_sql_dir()
    if not folder.is_dir():
        raise MissingInputError(f"SQL folder {folder} not found (set ANNOMINE_SQL_DIR)")
    paths = sorted(folder.glob("*.sql"), key=lambda p: (p.name != VIEWS_FILE, p.name))
    return [load_file(p) for p in paths]


def render(statement: str, namespace: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?", namespace):
        raise ValueError(f"namespace must be 'schema' or 'catalog.schema', got {namespace!r}")
    return statement.replace("${namespace}", namespace)


def referenced_tables(statement: str) -> list[str]:
    """Tables and views a statement reads (`${namespace}.<name>`), not the view it creates."""
    names = [m.group(1) for m in _TABLE_REF.finditer(statement)]
    if _CREATED_VIEW.match(statement):
        names = names[1:]  # the first reference is the view being created
    return list(dict.fromkeys(names))


def _split_union_all(body: str) -> list[str]:
    """Branches of a top-level `UNION ALL` (outside parentheses and quotes)."""
    branches, depth, quote, start = [], 0, None, 0
    i = 0
    while i < len(body):
        ch = body[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in ("'", '"', "`"):
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif depth == 0 and re.match(r"UNION\s+ALL\b", body[i:i + 20], re.I) and (i == 0 or not body[i - 1].isalnum()):
            branches.append(body[start:i])
            i += len(re.match(r"UNION\s+ALL", body[i:], re.I).group(0))
            start = i
            continue
        i += 1
    branches.append(body[start:])
    return [b.strip() for b in branches]


@dataclass
class SqlResult:
    file: str
    statement: str
    dataframe: object | None = None
    skipped: str | None = None

    @property
    def name(self) -> str:
        """The view a statement creates, else the file's name."""
        created = _CREATED_VIEW.match(self.statement)
        return created.group(1) if created else Path(self.file).stem


@dataclass
class SqlRunner:
    """Runs SQL files on a session. `table_exists(name)` says whether a base table exists."""

    spark: object
    namespace: str
    table_exists: Callable[[str], bool]
    written_by: Callable[[str], str] = lambda name: "?"
    views: set[str] = field(default_factory=set)
    skipped_views: dict[str, str] = field(default_factory=dict)

    def _missing(self, statement: str) -> str | None:
        for name in referenced_tables(statement):
            if name.startswith("v_"):
                if name in self.skipped_views:
                    return f"needs view {name}, skipped because it {self.skipped_views[name]}"
                if name not in self.views:
                    return f"needs view {name}, which was not created (run {VIEWS_FILE} first)"
            elif not self.table_exists(name):
                return f"needs table {self.namespace}.{name}, which does not exist yet (written by: {self.written_by(name)})"
        return None

    def _prune_union(self, statement: str) -> str | None:
        """A `CREATE VIEW ... AS a UNION ALL b ...` without the branches whose tables are missing."""
        created = _CREATED_VIEW.match(statement)
        if not created:
            return None
        head = re.match(r"^(.*?\bAS\b)(.*)$", statement[created.end():], re.S | re.I)
        if not head:
            return None
        branches = _split_union_all(head.group(2))
        kept = [b for b in branches if self._missing(b) is None]
        if len(branches) < 2 or not kept:
            return None
        return statement[:created.end()] + head.group(1) + "\n" + "\nUNION ALL\n".join(kept)

    def run_statement(self, statement: str, file: str = "<sql>") -> SqlResult:
        missing = self._missing(statement)
        if missing:
            pruned = self._prune_union(statement)
            if pruned is None:
                created = _CREATED_VIEW.match(statement)
                if created:
                    self.skipped_views[created.group(1)] = missing
                return SqlResult(file, statement, skipped=missing)
            log.info("%s: %s; the view unions the other branches", file, missing)
            statement = pruned
        sql = render(statement, self.namespace)
        created = _CREATED_VIEW.match(statement)
        try:
            df = self.spark.sql(sql)
        except Exception as exc:  # noqa: BLE001 - re-raised with the file named
            raise RuntimeError(f"{file}: statement failed: {exc}\n{sql}") from exc
        if created:
            df.collect()  # DDL: make sure it ran
            self.views.add(created.group(1))
            return SqlResult(file, statement)
        return SqlResult(file, statement, dataframe=df)

    def run_file(self, sql_file: SqlFile) -> list[SqlResult]:
        return [self.run_statement(s, str(sql_file.path)) for s in sql_file.statements]

    def create_views(self, sql_dir: str | os.PathLike | None = None) -> list[SqlResult]:
        views = [f for f in sql_files(sql_dir) if f.is_views]
        return [r for f in views for r in self.run_file(f)]

    def query(self, name: str, sql_dir: str | os.PathLike | None = None):
        """The DataFrame of one example query by file name (views must exist: `create_views`)."""
        matches = [f for f in sql_files(sql_dir) if f.name == name or f.path.name == name]
        if not matches:
            raise UnknownQueryError(f"no SQL file named {name!r} in {sql_dir or default_sql_dir()}")
        results = self.run_file(matches[0])
        last = results[-1]
        if last.skipped:
            raise LookupError(f"{name}: {last.skipped}")
        return last.dataframe


def runner_for(ctx) -> SqlRunner:
    """A runner on a job context (`annomine.runtime.open_context`)."""
    from annomine.schemas import TABLES

    def exists(name: str) -> bool:
        return name in TABLES and ctx.tables.exists(name)

    def written_by(name: str) -> str:
        return TABLES[name].written_by if name in TABLES else "not an annomine table"

    return SqlRunner(ctx.spark, namespace_of(ctx.project), exists, written_by)


def check_names(names: Iterable[str] | None, sql_dir: str | os.PathLike | None = None) -> list[SqlFile]:
    """The SQL files of `sql_dir`; an error naming every one of `names` that matches none of them."""
    files = sql_files(sql_dir)
    known = {f.name for f in files} | {f.path.name for f in files}
    unknown = sorted(set(names or []) - known)
    if unknown:
        raise UnknownQueryError(f"no SQL file(s) {unknown} in {sql_dir or default_sql_dir()}; "
                                f"available: {sorted(f.name for f in files)}")
    return files


def run_all(ctx, names: Iterable[str] | None = None, sql_dir: str | os.PathLike | None = None) -> list[SqlResult]:
    """Create the views, then run the named queries (all when `names` is empty)."""
    runner = runner_for(ctx)
    files = check_names(names, sql_dir)
    wanted = set(names or [])
    results = runner.create_views(sql_dir)
    for f in files:
        if f.is_views or (wanted and f.name not in wanted and f.path.name not in wanted):
            continue
        results.extend(runner.run_file(f))
    return results


def main(argv: list[str] | None = None) -> int:
    from annomine.config import load_project_config
    from annomine.runtime import job_parser, open_context, setup_logging

    setup_logging()
    parser = job_parser("annomine sql", __doc__.split("\n\n")[0])
    parser.add_argument("queries", nargs="*", help="query file names (default: all)")
    parser.add_argument("--sql-dir", default=None, help="folder of SQL files (default: the repository's sql/)")
    parser.add_argument("--limit", type=int, default=50, help="rows to print per query")
    parser.add_argument("--list", action="store_true", help="list the SQL files and exit")
    args = parser.parse_args(argv)
    if args.list:
        for f in sql_files(args.sql_dir):
            print(f"{f.name:34s} {f.description}")
        return 0
    project = load_project_config(args.conf, args.overrides)
    check_names(args.queries, args.sql_dir)
    ctx = open_context(project)
    for result in run_all(ctx, args.queries, args.sql_dir):
        if result.skipped:
            print(f"-- {result.name}: skipped, {result.skipped}")
        elif result.dataframe is None:
            print(f"-- {result.name}: view created in {namespace_of(project)}")
        else:
            print(f"\n-- {result.name}")
            pdf = result.dataframe.limit(args.limit).toPandas()
            print(pdf.to_string(index=False) if len(pdf) else "(no rows)")
    return 0


if __name__ == "__main__":
    from annomine.cli import guarded

    sys.exit(guarded("annomine sql", main))
