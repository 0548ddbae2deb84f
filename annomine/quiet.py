"""What a user sees: annomine's own progress lines, not the engine's, loaders' and libraries' logs.

The one place that decides it. Quiet by default; `--verbose` on any job (or ANNOMINE_VERBOSE=1)
brings everything back. `apply(verbose)` sets:

- the embedded Sail server's Rust log level (RUST_LOG, read when the server starts:
  `engine_log_level()`, used by annomine.spark), errors only when quiet;
- environment variables libraries read when they load, so child processes (torchrun workers, the
  loopback LLM server) inherit them: TRANSFORMERS_VERBOSITY (the weight load report),
  HF_HUB_DISABLE_PROGRESS_BARS (the weight loading bar), MLFLOW_LOGGING_LEVEL (MLflow's INFO lines),
  and TQDM_DISABLE when stderr is not a terminal (a log file gets every bar refresh as a line);
- Python loggers of libraries that log at INFO or below (faiss' loader, MLflow, alembic, bm25s)
  and annomine's engine-start line;
- warning filters for warnings that say nothing actionable (pyspark's 'No Partition Defined for
  Window' on a deliberately global window). MLflow's 'Add type hints to the `predict` method',
  raised when a PythonModel subclass is defined, is muted where annomine defines its pyfuncs
  (`pyfunc_definition_muted()`): they take a DataFrame or a list and check it themselves;
- `mlflow_prints_muted()`, for MLflow calls that print instead of logging (model registration).

A variable the user set themselves (RUST_LOG=info, TRANSFORMERS_VERBOSITY=...) is never overridden.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings

VERBOSE_ENV = "ANNOMINE_VERBOSE"

# Library environment read at import / start: value when quiet (unset when verbose).
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' 'Loading weights' bar
    "MLFLOW_LOGGING_LEVEL": "ERROR",  # its INFO lines and the CloudPickle advice on every pyfunc model
}
# Loggers raised to WARNING when quiet (left to the root level when verbose).
QUIET_LOGGERS = ("faiss", "mlflow", "alembic", "bm25s", "annomine.spark", "sentence_transformers", "torch.distributed")
# Loggers that are noise even in verbose mode (debug chatter of HTTP and file-lock clients).
ALWAYS_QUIET_LOGGERS = ("py4j", "urllib3", "httpx", "httpx2", "openai", "filelock", "matplotlib")
# (message regex, category, module regex) of warnings hidden when quiet.
QUIET_WARNINGS = (
    (r".*No Partition Defined for Window operation", UserWarning, ""),
)
_TYPE_HINT_ADVICE = re.compile(r"Add type hints to the `predict` method")
ENGINE_LOG = {"quiet": "error", "verbose": "info"}

_state = {"verbose": False}


class _LibraryFilter(logging.Filter):
    """Drops the quiet loggers' records below WARNING at the handler, for libraries that set their
    own logger's level when imported (bm25s sets DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _state["verbose"] or record.levelno >= logging.WARNING:
            return True
        return not any(record.name == n or record.name.startswith(n + ".") for n in QUIET_LOGGERS)


_FILTER = _LibraryFilter()
_env_set: dict[str, str] = {}  # the variables apply() set (and may unset again)
_filters: list[tuple] = []  # the warning filters apply() added


def env_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def is_verbose() -> bool:
    return _state["verbose"]


def engine_log_level() -> str:
    """RUST_LOG for the embedded Sail server when the user set none."""
    return ENGINE_LOG["verbose" if _state["verbose"] else "quiet"]


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def pyfunc_definition_muted():
    """While quiet, MLflow's advice to add type hints to `predict` is off for the PythonModel classes defined inside
    this block (MLflow warns once per class definition; annomine's pyfuncs check their own input)."""
    if _state["verbose"]:
        yield
        return
    # MLflow raises it under its own catch_warnings + simplefilter("once"), past any filter: the warnings of the block
    # are recorded instead of shown (that inner block keeps the recorder), and every other one is shown afterwards.
    with warnings.catch_warnings(record=True) as caught:
        yield
    for w in caught:
        if not _TYPE_HINT_ADVICE.search(str(w.message)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


@contextlib.contextmanager
def mlflow_prints_muted():
    """MLflow prints some events instead of logging them ('Successfully registered model ...',
    'Created version ...'); while quiet, they are off inside this block (the caller reports them)."""
    if _state["verbose"]:
        yield
        return
    from mlflow.utils.logging_utils import MLFLOW_LOGGING_STREAM

    before = MLFLOW_LOGGING_STREAM.enabled
    MLFLOW_LOGGING_STREAM.enabled = False
    try:
        yield
    finally:
        MLFLOW_LOGGING_STREAM.enabled = before


def apply(verbose: bool) -> None:
    """Quiet (the default) or verbose library output for this process and the ones it starts."""
    _state["verbose"] = verbose
    env = dict(QUIET_ENV)
    if not _is_tty(sys.stderr):
        env["TQDM_DISABLE"] = "1"  # progress bars are for a terminal; in a log file each refresh is a line
    for name in sorted(set(env) | set(_env_set)):
        value = env.get(name)
        if verbose or value is None:
            if name in _env_set and os.environ.get(name) == _env_set[name]:
                del os.environ[name]
            _env_set.pop(name, None)
        elif name not in os.environ:
            os.environ[name] = value
            _env_set[name] = value
    for handler in logging.getLogger().handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
    level = logging.NOTSET if verbose else logging.WARNING
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level)
    for name in ALWAYS_QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if "transformers" in sys.modules:  # already loaded: its verbosity env var was read
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_warning() if verbose else hf_logging.set_verbosity_error()
            hf_logging.enable_progress_bar() if verbose else hf_logging.disable_progress_bar()
        except Exception:  # noqa: BLE001 - cosmetics only
            pass
    if "mlflow" in sys.modules and not verbose:  # MLflow set its own logger's level when imported
        logging.getLogger("mlflow").setLevel(logging.ERROR)
    for entry in _filters:
        if entry in warnings.filters:
            warnings.filters.remove(entry)
    if _filters and hasattr(warnings, "_filters_mutated"):
        warnings._filters_mutated()  # noqa: SLF001 - what filterwarnings itself calls after a change
    _filters.clear()
    if not verbose:
        for message, category, module in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
            _filters.append(warnings.filters[0])
