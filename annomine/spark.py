"""One Spark session factory for every place annomine runs.

Order of preference:
1. an active session (spark-submit, a Databricks cluster, a notebook);
2. a Spark Connect endpoint from the config (`project.spark_remote`) or `SPARK_REMOTE`
   (Databricks Connect sets this too);
3. an embedded Sail server started in this process (the local default: no JVM), or, with
   `project.engine: local_jvm`, a classic local PySpark session (`project.spark_master`, a JVM in this
   process; what clusters run, without a cluster). A process is either classic or Spark Connect, never
   both: PySpark decides per call from the environment (`annomine/__init__.py`), so a local_jvm process
   sets ANNOMINE_SPARK_MODE=classic before annomine is imported.

Job code only uses the Spark Connect-compatible API (DataFrames, SQL, pandas UDFs,
`mapInPandas`, Delta by `format("delta")`, SQL MERGE), so the same code runs on all three.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading

from annomine.config import ConfigError, ProjectConfig

log = logging.getLogger(__name__)

_lock = threading.Lock()
_embedded_server = None
_embedded_url = None
_session = None
_own_jvm = False  # the session is a local JVM annomine started (stop_embedded stops it)


def _active_session():
    try:
        from pyspark.sql import SparkSession

        return SparkSession.getActiveSession()
    except Exception:  # noqa: BLE001 - no classic pyspark or no JVM: nothing active
        return None


# Sail ends a Spark Connect session left idle this long. A stage that trains for half an hour issues no
# Spark request meanwhile, so the embedded server keeps idle sessions for a day unless the user's own
# SAIL_SPARK__SESSION_TIMEOUT_SECS says otherwise; a session lost anyway is replaced (`get_spark`).
SESSION_TIMEOUT_ENV = "SAIL_SPARK__SESSION_TIMEOUT_SECS"
EMBEDDED_SESSION_TIMEOUT_S = 86_400


def _start_embedded_server() -> str:
    """Start Sail's Spark Connect server in-process; return its sc:// URL."""
    global _embedded_server
    from pysail.spark import SparkConnectServer

    os.environ.setdefault(SESSION_TIMEOUT_ENV, str(EMBEDDED_SESSION_TIMEOUT_S))  # read when the server starts
    from annomine.quiet import engine_log_level
    os.environ.setdefault("RUST_LOG", engine_log_level())  # Sail's own logs: errors only, unless --verbose
    server = SparkConnectServer(ip="127.0.0.1", port=0)
    server.start(background=True)
    _, port = server.listening_address
    _embedded_server = server
    global _embedded_url
    _embedded_url = f"sc://127.0.0.1:{port}"
    atexit.register(stop_embedded)
    log.info("embedded Sail Spark Connect server on 127.0.0.1:%s", port)
    return f"sc://127.0.0.1:{port}"


def _submit_remote() -> str | None:
    """The `--remote sc://...` URL spark-submit hands to the Python driver, if any."""
    import json

    for i in range(int(os.environ.get("PYSPARK_REMOTE_INIT_CONF_LEN", "0") or 0)):
        try:
            url = json.loads(os.environ.get(f"PYSPARK_REMOTE_INIT_CONF_{i}", "{}")).get("spark.remote")
        except ValueError:
            continue
        if url:
            return url
    return None


def _classic_driver() -> bool:
    """A JVM driver runs this process (spark-submit without --remote, a Databricks cluster); the same
    rule `annomine/__init__.py` applied when it chose the UDF flavour."""
    return "SPARK_CONNECT_MODE_ENABLED" not in os.environ and (
        os.environ.get("ANNOMINE_SPARK_MODE") == "classic"
        or "PYSPARK_GATEWAY_PORT" in os.environ
        or "DATABRICKS_RUNTIME_VERSION" in os.environ
    )


def _alive(session) -> bool:
    """False when the embedded server dropped this session (it ends sessions left idle too long,
    e.g. during a long training step with no Spark work)."""
    try:
        session.sql("SELECT 1").collect()
        return True
    except Exception:  # noqa: BLE001 - any failure means: make a new session
        log.warning("the Spark Connect session ended (idle timeout or engine restart); opening a new one")
        return False


def _discard(session) -> None:
    """Forget a dead Connect session, so that neither `getActiveSession` nor `getOrCreate` hands it back."""
    try:
        session.stop()
    except Exception:  # noqa: BLE001 - stopping a session the server already dropped may fail
        pass
    from pyspark.sql.connect.session import SparkSession as ConnectSession

    if ConnectSession._default_session is session:
        ConnectSession._default_session = None
    if getattr(ConnectSession._active_session, "session", None) is session:
        ConnectSession._active_session.session = None


def _server_alive() -> bool:
    return bool(getattr(_embedded_server, "running", True))


def _connect(remote: str):
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.remote(remote)
    session = builder.create() if hasattr(builder, "create") else builder.getOrCreate()
    session.conf.set("spark.sql.session.timeZone", "UTC")
    return session


# A local JVM session's defaults: small plans need few shuffle partitions (200 would be 200 tasks per
# shuffle on 2 cores), no UI port, UTC like every other session. `project.spark_conf` overrides them.
LOCAL_JVM_CONF = {
    "spark.sql.shuffle.partitions": "4",
    "spark.default.parallelism": "4",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
}


def _start_local_jvm(project: ProjectConfig):
    """A classic `local[N]` session with a JVM in this process (project.engine: local_jvm)."""
    global _own_jvm
    if "SPARK_CONNECT_MODE_ENABLED" in os.environ:
        raise ConfigError("project.engine is 'local_jvm', but this process was started in Spark Connect mode; "
                          "set ANNOMINE_SPARK_MODE=classic in the environment before annomine is imported")
    # the Python workers of pandas UDFs: this interpreter (its venv has annomine), unless the user chose one
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.master(project.spark_master).appName(f"annomine-{project.name}")
    for key, value in {**LOCAL_JVM_CONF, **project.spark_conf}.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    from annomine.quiet import env_verbose
    session.sparkContext.setLogLevel("INFO" if env_verbose() else "ERROR")  # classic only: the JVM's own logs
    _own_jvm = True
    log.info("local JVM Spark %s session (%s)", session.version, project.spark_master)
    return session


def get_spark(project: ProjectConfig | None = None):
    """The session for this process (created once and reused)."""
    global _session
    with _lock:
        if _session is not None:
            if _embedded_server is None or _alive(_session):
                return _session
            _discard(_session)  # the embedded server ended it: a new session on the same server
            _session = None
        if _embedded_server is None:  # the embedded engine's sessions are ours: never adopt a stale one
            active = _active_session()
            if active is not None:
                _session = active
                return _session
        from pyspark.sql import SparkSession

        if project is not None and project.engine == "local_jvm":
            _session = _start_local_jvm(project)
            return _session
        remote = (project.spark_remote if project else None) or os.environ.get("SPARK_REMOTE") or _submit_remote()
        if not remote and _classic_driver():
            # spark-submit / Databricks: the session of the cluster the driver was started on.
            _session = SparkSession.builder.getOrCreate()
            _session.conf.set("spark.sql.session.timeZone", "UTC")
            return _session
        if not remote and _embedded_server is not None:
            if _server_alive():
                remote = _embedded_url
            else:
                log.warning("the embedded Spark Connect server stopped; starting a new one")
                _stop_server()
        if not remote:
            remote = _start_embedded_server()
        _session = _connect(remote)
        return _session


def is_embedded() -> bool:
    """Whether this process runs the embedded Sail server (its Python UDFs then run in this process)."""
    return _embedded_server is not None


def stop_embedded() -> None:
    """Stop the session and the embedded server, or the local JVM annomine started (tests and CLI exit
    call this). A session annomine joined (spark-submit, Databricks) is left alone."""
    global _embedded_server, _session, _own_jvm
    with _lock:
        if _session is not None and _own_jvm:
            try:
                _session.stop()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
            _session, _own_jvm = None, False
        if _session is not None and _embedded_server is not None:
            try:
                _session.stop()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
            _session = None
        _stop_server()


def _stop_server() -> None:
    global _embedded_server
    if _embedded_server is not None:
        try:
            _embedded_server.stop()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass
        _embedded_server = None
