"""ONNX Runtime encoding (`annomine.onnx_encoder`): the same vectors as torch, batches back in order,
the torch fallback, and one export per weights (cached on disk and per process).

MiniLM's export lands in the default cache (`annomine.onnx_encoder.cache_dir`), so it is paid once per
machine; the cache tests point ANNOMINE_ONNX_CACHE at a temporary folder and use a tiny random BERT.
"""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from annomine import encoders, onnx_encoder  # noqa: E402
from annomine.encoders import TextEncoder, encode_sorted, length_sorted_batches, resolve_backend  # noqa: E402
from annomine.two_tower import TwoTower, _tiny_bert  # noqa: E402

MIN_COSINE = 0.9999


def varied_texts(n: int = 50) -> list[str]:
    """Empty, one word, product-like lines, and texts far past 64 tokens, in mixed order."""
    words = "red running shoe lamp oak table usb-c charger 65w waterproof hiking boots size 10 ceramic mug".split()
    texts = ["", "lamp", "Ürün açıklaması: kırmızı ayakkabı", "wireless noise cancelling headphones " * 40]
    for i in range(n - len(texts)):
        texts.append(" ".join(words[(i * 7 + j) % len(words)] for j in range(1 + (i * 13) % 90)))
    rng = np.random.default_rng(0)
    return [texts[i] for i in rng.permutation(len(texts))]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture
def tiny_folder(tmp_path):
    """A tiny random BERT saved in Hugging Face layout (what TextEncoder loads)."""
    tokenizer, model = _tiny_bert(hidden=32, layers=1, seed=5)
    folder = tmp_path / "tiny_bert"
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(onnx_encoder.CACHE_ENV, str(tmp_path / "onnx_cache"))
    monkeypatch.setattr(onnx_encoder, "_SESSIONS", {})
    monkeypatch.setattr(onnx_encoder, "_VERIFIED", set(), raising=False)
    monkeypatch.setattr(encoders, "_WARNED", set())
    return tmp_path / "onnx_cache"


def test_minilm_onnx_matches_torch_on_every_text():
    texts = varied_texts(50)
    onnx = TextEncoder("minilm", max_length=64, batch_size=8, backend="onnx")
    torch_ = TextEncoder("minilm", max_length=64, batch_size=8, backend="torch")
    assert onnx.backend == "onnx" and torch_.backend == "torch"
    got, want = onnx.encode(texts), torch_.encode(texts)
    assert got.shape == want.shape == (50, 384) and got.dtype == np.float32
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert cosines(got, want).min() >= MIN_COSINE
    # query length (16 tokens) through the same exported graph: the sequence axis is dynamic
    onnx.max_length = torch_.max_length = 16
    assert cosines(onnx.encode(texts), torch_.encode(texts)).min() >= MIN_COSINE


def test_two_tower_separate_towers_match_torch_and_follow_weight_changes(tmp_cache):
    import torch

    model = TwoTower.tiny(shared=False, hidden=32, layers=2, seed=1)
    texts = varied_texts(30)
    want_q, want_i = model.encode_queries(texts, batch_size=7), model.encode_items(texts, batch_size=7)
    model.backend = "onnx"
    got_q, got_i = model.encode_queries(texts, batch_size=7), model.encode_items(texts, batch_size=7)
    assert cosines(got_q, want_q).min() >= MIN_COSINE and cosines(got_i, want_i).min() >= MIN_COSINE
    assert len(list(tmp_cache.glob("*.onnx"))) == 2  # one export per tower
    assert cosines(got_q, got_i).max() < 0.99  # the towers really are separate
    copy = pickle.loads(pickle.dumps(model))  # MLflow pickles the pyfunc: sessions are left out, rebuilt
    assert copy._onnx_towers == {} and np.allclose(copy.encode_queries(texts, batch_size=7), got_q, atol=1e-6)
    # weights changed in place (an optimizer step would): the stale export is not used
    with torch.no_grad():
        for p in model.item_encoder.parameters():
            p.mul_(1.5)
    moved = model.encode_items(texts)
    model.backend = "torch"
    assert cosines(moved, model.encode_items(texts)).min() >= MIN_COSINE
    assert len(list(tmp_cache.glob("*.onnx"))) == 3


def test_loaded_two_tower_for_inference_uses_onnx(tmp_cache, tmp_path):
    TwoTower.tiny(shared=True, seed=2).save(tmp_path / "tt")
    trained = TwoTower.load(tmp_path / "tt")
    served = TwoTower.load(tmp_path / "tt", backend="auto")
    assert trained.backend == "torch"
    texts = varied_texts(12)
    assert cosines(served.encode_items(texts), trained.encode_items(texts)).min() >= MIN_COSINE
    assert len(list(tmp_cache.glob("*.onnx"))) == 1


def test_length_sorted_batches_cover_every_text_and_restore_order(tiny_folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_folder, local_files_only=True)
    texts = varied_texts(40)
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=24)["input_ids"]]
    seen = []
    for positions, input_ids, mask in length_sorted_batches(tokenizer, texts, max_length=24, batch_size=6):
        assert input_ids.shape == mask.shape and input_ids.shape[1] == max(lengths[p] for p in positions) <= 24
        assert mask.sum(axis=1).tolist() == [lengths[p] for p in positions]
        seen.extend(positions.tolist())
    assert sorted(seen) == list(range(len(texts))) and seen != list(range(len(texts)))
    # a batch function that returns each row's token count: the output rows are back in input order
    out = encode_sorted(tokenizer, lambda ids, mask: mask.sum(axis=1, keepdims=True).astype(np.float32), texts,
                        dim=1, max_length=24, batch_size=6)
    assert out[:, 0].astype(int).tolist() == lengths
    # and real vectors: sorted batches give each text what it gets when encoded alone
    encoder = TextEncoder(tiny_folder, max_length=24, batch_size=6, backend="torch")
    alone = np.concatenate([encoder.encode([t]) for t in texts])
    assert cosines(encoder.encode(texts), alone).min() >= MIN_COSINE


def test_falls_back_to_torch_with_one_warning(tiny_folder, tmp_cache, monkeypatch, caplog):
    monkeypatch.setattr(onnx_encoder, "runtime_available", lambda: (False, "ImportError: no onnxruntime"))
    with caplog.at_level(logging.WARNING, logger="annomine.encoders"):
        first = TextEncoder(tiny_folder, backend="auto")
        TextEncoder(tiny_folder, backend="onnx")
    assert first.backend == "torch" and first.encode(["red shoe"]).shape == (1, 32)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "onnxruntime is not usable" in warnings[0] and "torch" in warnings[0]
    assert not list(tmp_cache.glob("*.onnx"))


def test_export_failure_falls_back_to_torch(tiny_folder, tmp_cache, monkeypatch, caplog):
    def broken(model, path):
        raise RuntimeError("exporter broke")

    monkeypatch.setattr(onnx_encoder, "export", broken)
    with caplog.at_level(logging.WARNING, logger="annomine.encoders"):
        encoder = TextEncoder(tiny_folder, backend="onnx")
    assert encoder.backend == "torch" and "exporter broke" in caplog.text


def test_backend_choice(monkeypatch):
    monkeypatch.delenv(encoders.BACKEND_ENV, raising=False)
    assert resolve_backend("torch", "cpu") == "torch"
    assert resolve_backend("auto", "cpu") == "onnx"
    assert resolve_backend("auto", "cuda") == "torch"  # GPU inference stays in torch
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("tensorrt", "cpu")
    monkeypatch.setenv(encoders.BACKEND_ENV, "torch")  # a process-wide override of 'auto' only
    assert resolve_backend("auto", "cpu") == "torch" and resolve_backend("onnx", "cpu") == "onnx"


def test_export_is_cached_on_disk_and_per_process(tiny_folder, tmp_cache, monkeypatch):
    exports = []
    real_export = onnx_encoder.export
    monkeypatch.setattr(onnx_encoder, "export", lambda model, path: exports.append(path) or real_export(model, path))
    first = TextEncoder(tiny_folder, backend="onnx")
    second = TextEncoder(tiny_folder, backend="onnx")
    assert len(exports) == 1 and second.onnx is first.onnx  # same process: the session is shared
    monkeypatch.setattr(onnx_encoder, "_SESSIONS", {})  # as a new process (a Spark worker) would start
    third = TextEncoder(tiny_folder, backend="onnx")
    assert len(exports) == 1 and third.onnx is not first.onnx
    files = sorted(tmp_cache.iterdir())
    assert [f.suffix for f in files] == [".onnx", ".sha256"]  # the export and its checksum; no temporary file
    texts = varied_texts(10)
    assert np.allclose(third.encode(texts), first.encode(texts), atol=1e-6)


def test_a_cached_export_damaged_in_place_is_exported_again(tiny_folder, tmp_cache, monkeypatch, caplog):
    """Zeros written into a cached .onnx file that still loads: its checksum no longer matches, so it is exported
    again (one log line) and encodes as a clean export does, instead of being used silently."""
    exports = []
    real_export = onnx_encoder.export
    monkeypatch.setattr(onnx_encoder, "export", lambda model, path: exports.append(path) or real_export(model, path))
    texts = varied_texts(10)
    clean = TextEncoder(tiny_folder, backend="onnx").encode(texts)
    path = exports[0]
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 2048] = bytes(2048)  # inside the weights: the graph still parses
    path.write_bytes(bytes(data))
    damaged = onnx_encoder.OnnxTower(path, threads=1)  # it loads ...
    ids, mask = np.ones((1, 4), dtype=np.int64), np.ones((1, 4), dtype=np.int64)
    assert damaged(ids, mask).shape[0] == 1
    monkeypatch.setattr(onnx_encoder, "_SESSIONS", {})  # as a new process would start
    monkeypatch.setattr(onnx_encoder, "_VERIFIED", set(), raising=False)
    with caplog.at_level("WARNING", logger="annomine.onnx_encoder"):
        again = TextEncoder(tiny_folder, backend="onnx")
    assert len(exports) == 2, "the damaged file is exported again"
    assert [r.message for r in caplog.records if "checksum" in r.message] == [
        f"cached ONNX model {path} does not match its checksum {path.name}.sha256; exporting it again"]
    assert np.allclose(again.encode(texts), clean, atol=1e-6)
    assert onnx_encoder.verified(path)


def test_threads_asking_for_the_same_tower_at_once_share_one_export(tmp_cache, monkeypatch):
    """Spark partitions in threads of one worker process: torch.onnx.export is one-at-a-time per process."""
    from concurrent.futures import ThreadPoolExecutor

    exports = []
    real_export = onnx_encoder.export
    monkeypatch.setattr(onnx_encoder, "export", lambda model, path: exports.append(path) or real_export(model, path))
    _, model = _tiny_bert(hidden=32, layers=1, seed=9)
    with ThreadPoolExecutor(max_workers=4) as pool:
        towers = list(pool.map(lambda _: onnx_encoder.onnx_tower(model, threads=1), range(4)))
    assert len(exports) == 1 and all(t is towers[0] for t in towers)


def test_the_cache_keeps_the_most_recently_used_exports_within_its_limit(tmp_cache, monkeypatch):
    """Each export prunes the least recently used other files beyond ANNOMINE_ONNX_CACHE_MAX_MB; a use
    refreshes a file, so the model in use survives, and the file just written always stays."""
    import os
    import time

    models = [_tiny_bert(hidden=32, layers=1, seed=s)[1] for s in (21, 22, 23)]
    paths = []
    for m in models[:2]:
        paths.append(onnx_encoder.cached_export(m))
    size_mb = paths[0].stat().st_size / (1024 * 1024)
    old = time.time() - 100
    os.utime(paths[0], (old, old))
    os.utime(paths[1], (old + 10, old + 10))
    onnx_encoder.cached_export(models[0])  # a use: models[0] is now the most recently used
    monkeypatch.setenv(onnx_encoder.CACHE_MAX_ENV, str(2.5 * size_mb))
    third = onnx_encoder.cached_export(models[2])
    assert sorted(p.name for p in tmp_cache.glob("*.onnx")) == sorted([paths[0].name, third.name])
    monkeypatch.setenv(onnx_encoder.CACHE_MAX_ENV, "0")  # below one file: only the new one stays
    fourth = onnx_encoder.cached_export(models[1])
    assert [p.name for p in tmp_cache.glob("*.onnx")] == [fourth.name]
    monkeypatch.setenv(onnx_encoder.CACHE_MAX_ENV, "lots")
    with pytest.raises(ValueError, match="ANNOMINE_ONNX_CACHE_MAX_MB"):
        onnx_encoder.cache_limit_bytes()
