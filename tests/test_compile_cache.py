"""The persistent compile cache on CPU: keys, integrity checks, atomic and concurrent writes."""

import copy
import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffjet.runtime import compile_cache
from diffjet.runtime.compile_cache import ARTIFACTS, META, CompileCache, entry_key, module_key


class FakeCompiler:
    """Stands in for torch.compiler's artifact save/load, which need a compiled model."""

    def __init__(self, payload=b"compiled kernels"):
        self.payload = payload
        self.loaded = []

    def cache(self, directory):
        return CompileCache(directory, save_artifacts=lambda: (self.payload, None), load_artifacts=self.loaded.append)


@pytest.fixture
def unet(tiny_path):
    return UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet")


def parts_for(module, **overrides):
    parts = {"component": "unet", "module": module_key(module), "environment": compile_cache.environment_key(torch.device("cpu")),
             "passes": ["precision(float16)", "channels_last"], "compile": {"mode": "default"}, "signature": "(2, 4, 64, 64)"}
    parts.update(overrides)
    return parts


def test_round_trip_preloads_the_stored_artifacts(tmp_path, unet):
    fake = FakeCompiler()
    cache = fake.cache(tmp_path)
    parts = parts_for(unet)
    assert cache.load(parts) is False and cache.stats.misses == 1
    folder = cache.store(parts)
    assert folder.is_dir() and (folder / ARTIFACTS).read_bytes() == fake.payload
    assert fake.cache(tmp_path).load(parts) is True
    assert fake.loaded == [fake.payload]


def test_key_changes_with_every_part(unet):
    base = parts_for(unet)
    changed = copy.deepcopy(unet)
    changed.register_to_config(cross_attention_dim=99)
    variants = {
        "architecture": parts_for(changed),
        "dtype": parts_for(copy.deepcopy(unet).half()),
        "layout": parts_for(copy.deepcopy(unet).to(memory_format=torch.channels_last)),
        "signature": {**base, "signature": "(2, 4, 96, 96)"},
        "passes": {**base, "passes": ["channels_last"]},
        "compile mode": {**base, "compile": {"mode": "max-autotune-no-cudagraphs"}},
        "torch version": {**base, "environment": {**base["environment"], "torch": "0.0"}},
        "gpu": {**base, "environment": {**base["environment"], "gpu": {"name": "H100", "capability": [9, 0]}}},
    }
    keys = {name: entry_key(p) for name, p in variants.items()}
    assert entry_key(base) == entry_key(parts_for(unet)), "the key must be stable"
    assert len(set(keys.values()) | {entry_key(base)}) == len(keys) + 1


def test_weight_values_do_not_change_the_key(unet):
    other = copy.deepcopy(unet)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    assert entry_key(parts_for(other)) == entry_key(parts_for(unet))


def _stored(tmp_path, unet):
    fake = FakeCompiler(payload=os.urandom(4096))
    parts = parts_for(unet)
    folder = fake.cache(tmp_path).store(parts)
    return fake, parts, folder


@pytest.mark.parametrize("damage", ["flip", "truncate", "no-meta", "bad-meta", "foreign"])
def test_broken_entries_are_rejected_and_rebuilt(tmp_path, unet, caplog, damage):
    fake, parts, folder = _stored(tmp_path, unet)
    artifacts, meta = folder / ARTIFACTS, folder / META
    if damage == "flip":
        data = bytearray(artifacts.read_bytes())
        data[100] ^= 0xFF
        artifacts.write_bytes(bytes(data))
    elif damage == "truncate":
        artifacts.write_bytes(artifacts.read_bytes()[:1000])
    elif damage == "no-meta":
        meta.unlink()
    elif damage == "bad-meta":
        meta.write_text("{not json")
    elif damage == "foreign":
        other = {**parts, "signature": "something else"}
        record = json.loads(meta.read_text())
        record["key"] = entry_key(other)
        meta.write_text(json.dumps(record))
    cache = fake.cache(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert cache.load(parts) is False
    assert fake.loaded == [], "a broken entry must never be handed to the compiler"
    assert cache.stats.rejected == 1 and "rebuilding" in caplog.text
    assert not folder.exists()
    cache.store(parts)
    assert fake.cache(tmp_path).load(parts) is True


def test_a_failed_write_leaves_no_entry(tmp_path, unet):
    cache = CompileCache(tmp_path, save_artifacts=lambda: (object(), None), load_artifacts=lambda b: None)
    with pytest.raises(TypeError):
        cache.store(parts_for(unet))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_nothing_compiled_stores_nothing(tmp_path, unet):
    cache = CompileCache(tmp_path, save_artifacts=lambda: None, load_artifacts=lambda b: None)
    assert cache.store(parts_for(unet)) is None and not any(tmp_path.iterdir())


WRITER = textwrap.dedent(
    """
    import os, sys
    from diffjet.runtime.compile_cache import CompileCache
    cache = CompileCache(sys.argv[1], save_artifacts=lambda: (os.urandom(1 << 20), None), load_artifacts=lambda b: None)
    for round in range(20):
        for key in range(4):
            cache.store({"key": key, "round": round % 2})
    """
)


def test_two_processes_filling_one_cache_leave_it_valid(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], env=env) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    entries = [m.parent for m in tmp_path.rglob(META)]
    assert len(entries) == 8
    for folder in entries:
        meta = json.loads((folder / META).read_text())
        assert hashlib.sha256((folder / ARTIFACTS).read_bytes()).hexdigest() == meta["files"][ARTIFACTS]["sha256"]
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".")]
    assert leftovers == []


def test_default_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFJET_CACHE_DIR", str(tmp_path))
    assert compile_cache.default_cache_dir() == tmp_path / "compile"
