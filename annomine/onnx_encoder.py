"""BERT towers through ONNX Runtime: export once per weights, cache the .onnx file, run a CPU session.

Inference only (catalog and query encoding); training keeps torch for the gradients. The exported
graph takes `input_ids` and `attention_mask` (int64, dynamic batch and sequence axes) and returns the
attention-masked mean of the last hidden state, L2-normalised (float32): the same vectors as
`annomine.bert.mean_pool` + `torch.nn.functional.normalize`, with ONNX Runtime's fused kernels.

Exporter: torch's TorchScript-based `torch.onnx.export(..., dynamo=False)`, still part of the pinned
torch and five times quicker than the torch.export-based one, which would also need `onnxscript`.

Cache: `<cache>/<model type>-<key>.onnx`, where the key hashes the weights, the config and the
exporter's inputs (torch version, opset, graph format), so the same weights export once wherever they
were loaded from. `<cache>` is `$ANNOMINE_ONNX_CACHE`, else `$XDG_CACHE_HOME/annomine/onnx` (default
`~/.cache/annomine/onnx`). A file is written under a temporary name and renamed into place, so
concurrent processes (Spark workers) never read a half-written model; two that export at once write
identical files and the last rename wins. Next to it, `<key>.onnx.sha256` holds the file's SHA-256, written
after the export; a cached file is used only when it matches (`verified`), so a file damaged in place
(or one whose checksum was never written) is exported again, with one log line. The cache keeps the most recently used files within
`$ANNOMINE_ONNX_CACHE_MAX_MB` (default 2048, ~20 MiniLM-sized towers): each use touches its file, and
an export removes the least recently used others beyond the limit (`prune_cache`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import warnings
import weakref
from pathlib import Path

import numpy as np

from annomine.publish import write_atomically

log = logging.getLogger(__name__)

CACHE_ENV = "ANNOMINE_ONNX_CACHE"
CACHE_MAX_ENV = "ANNOMINE_ONNX_CACHE_MAX_MB"
DEFAULT_CACHE_MAX_MB = 2048
OPSET = 17
# Bump when the exported graph changes (inputs, outputs, pooling): old cache files are then ignored.
GRAPH_FORMAT = "pooled-l2-v1"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embeddings"

# Sessions shared by the encoders of one process while any of them holds one (a session of MiniLM is
# ~100 MB: an evaluation going through several models keeps only those still in use).
_SESSIONS: "weakref.WeakValueDictionary[tuple[str, int], OnnxTower]" = weakref.WeakValueDictionary()
_SESSIONS_LOCK = threading.Lock()
# torch.onnx.export keeps process-global state (one export at a time): Spark partitions running in threads of one
# worker process each ask for the tower at once.
_EXPORT_LOCK = threading.RLock()
# (path, inode, size) of the cache files this process has checked against their checksum.
_VERIFIED: set[tuple] = set()


def runtime_available() -> tuple[bool, str]:
    """(True, version) when onnxruntime imports, else (False, why)."""
    try:
        import onnxruntime
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken native library
        return False, f"{type(exc).__name__}: {exc}"
    return True, f"onnxruntime {onnxruntime.__version__}"


def cache_dir() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "annomine" / "onnx"


def weights_key(model) -> str:
    """A hash of what the exported graph depends on: weights, config, torch version, opset, graph format."""
    import torch

    h = hashlib.sha256(f"{GRAPH_FORMAT}|opset{OPSET}|torch{torch.__version__}|{type(model).__name__}\n".encode())
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"\n{name}|{flat.dtype}|{tuple(tensor.shape)}\n".encode())
        h.update(flat.view(torch.uint8).numpy())
    return f"{getattr(model.config, 'model_type', 'model')}-{h.hexdigest()[:32]}"


def _pooled(model):
    """`model` wrapped so its output is the pooled, L2-normalised embedding (what the graph computes): the
    pooling of the torch path (`annomine.bert.mean_pool`), traced into the graph."""
    import torch

    from annomine.bert import mean_pool

    class PooledEncoder(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
            return torch.nn.functional.normalize(mean_pool(hidden, attention_mask), dim=-1)

    return PooledEncoder(model)


def export(model, path: Path) -> Path:
    """Export `model` (a CPU float32 BertModel-like encoder) to `path`, atomically; its train/eval mode is kept."""
    import torch

    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("ONNX export needs a float32 model on the CPU")
    vocab = int(getattr(model.config, "vocab_size", 1000))
    # Two rows, the second padded: the traced graph then keeps the attention mask for every input.
    input_ids = torch.randint(1, min(vocab, 1000), (2, 8), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    was_training = model.training
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the tracer's notes on data-dependent shortcuts (transformers skips them while tracing) and the
            # exporter's deprecation notice: nothing a user can act on
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _pooled(model).eval(), (input_ids, attention_mask), tmp, dynamo=False,
                input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME], opset_version=OPSET,
                dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                              OUTPUT_NAME: {0: "batch"}})
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from other users sharing the cache
        digest = file_sha256(Path(tmp))
        os.replace(tmp, path)
    finally:
        model.train(was_training)
        if os.path.exists(tmp):
            os.unlink(tmp)
    write_atomically(checksum_path(path), lambda out: out.write_text(f"{digest}  {path.name}\n"))
    _VERIFIED.add(_identity(path))
    return path


def checksum_path(path: Path) -> Path:
    """The sidecar holding the SHA-256 of a cached export."""
    return path.with_name(path.name + ".sha256")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _identity(path: Path) -> tuple:
    st = path.stat()
    return str(path), st.st_ino, st.st_size


def verified(path: Path) -> bool:
    """Whether `path` matches the checksum written with it (checked once per file per process)."""
    try:
        identity = _identity(path)
        if identity in _VERIFIED:
            return True
        expected = checksum_path(path).read_text().split()[0]
    except (OSError, IndexError):
        return False
    if file_sha256(path) != expected:
        return False
    _VERIFIED.add(identity)
    return True


def cache_limit_bytes() -> int:
    value = os.environ.get(CACHE_MAX_ENV, "").strip()
    try:
        mb = float(value) if value else DEFAULT_CACHE_MAX_MB
    except ValueError:
        raise ValueError(f"{CACHE_MAX_ENV}={value!r} is not a number of megabytes") from None
    return int(mb * 1024 * 1024)


def prune_cache(directory: Path, limit_bytes: int, keep: Path) -> list[Path]:
    """Remove the least recently used .onnx files of `directory` (by modification time, which every use sets)
    until the rest fit in `limit_bytes`; `keep` stays whatever its size. The removed paths."""
    files = []
    for f in directory.glob("*.onnx"):
        try:
            st = f.stat()
        except FileNotFoundError:  # removed by another process meanwhile
            continue
        files.append((st.st_mtime, st.st_size, f))
    total = sum(size for _, size, _ in files)
    removed = []
    for _, size, f in sorted(files, key=lambda t: t[0]):
        if total <= limit_bytes:
            break
        if f == keep:
            continue
        for gone in (f, checksum_path(f)):
            try:
                gone.unlink()
            except FileNotFoundError:
                pass
        total -= size
        removed.append(f)
    if removed:
        log.info("ONNX cache %s: removed %d least recently used file(s) beyond %d MB", directory, len(removed),
                 limit_bytes // (1024 * 1024))
    return removed


def cached_export(model) -> Path:
    """The cached .onnx file of `model`'s weights, exported first if there is none (then the cache is pruned)."""
    path = cache_dir() / f"{weights_key(model)}.onnx"
    with _EXPORT_LOCK:  # the threads that waited find the file the first one wrote
        if path.is_file() and verified(path):
            try:
                os.utime(path)  # recently used: the last to be pruned
            except OSError:  # a read-only shared cache: still usable
                pass
        else:
            if path.is_file():
                log.warning("cached ONNX model %s does not match its checksum %s; exporting it again", path,
                            checksum_path(path).name)
            else:
                log.info("exporting %s to ONNX: %s", type(model).__name__, path)
            export(model, path)
            prune_cache(path.parent, cache_limit_bytes(), keep=path)
    return path


class OnnxTower:
    """An ONNX Runtime CPU session of one exported tower: token arrays -> L2-normalised float32 embeddings."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.path = Path(path)
        self.threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                 "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64)}
        return self.session.run([OUTPUT_NAME], feeds)[0]


def onnx_tower(model, threads: int | None = None) -> OnnxTower:
    """An ONNX Runtime session for `model`'s current weights: one per weights and thread count per process.

    threads: ONNX Runtime's intra-op threads; default torch's thread count (what the torch path would use).
    """
    import torch

    threads = int(threads or torch.get_num_threads())
    path = cached_export(model)
    key = (str(path), threads)
    with _SESSIONS_LOCK:
        tower = _SESSIONS.get(key)
        if tower is None:
            try:
                tower = OnnxTower(path, threads)
            except Exception as exc:  # noqa: BLE001 - a damaged cache file: export afresh, once
                log.warning("cached ONNX model %s does not load (%s); exporting it again", path, exc)
                with _EXPORT_LOCK:
                    tower = OnnxTower(export(model, path), threads)
            _SESSIONS[key] = tower
        return tower
