"""Precompiled forwards (`runtime/precompiled.py`) and their entries in the compile cache, on CPU."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from diffjet.runtime import precompiled
from diffjet.runtime.compile_cache import FUNCTION, CompileCache
from diffjet.runtime.precompiled import Precompiler

from .precompiled_blocks import block_and_inputs, fused_and_inputs

ROOT = pathlib.Path(__file__).parents[1]
pytestmark = pytest.mark.skipif(not precompiled.supported("inductor"),
                                reason="this torch cannot save compiled functions")


@pytest.fixture(scope="module")
def compiled():
    block, x, temb = block_and_inputs()
    function, data = Precompiler(block).compile((x, temb), {})
    return block, x, temb, function, data


def test_compiled_function_matches_eager_and_sees_in_place_weight_updates(compiled):
    block, x, temb, function, _ = compiled
    with torch.no_grad():
        torch.testing.assert_close(function(x, temb), block(x, temb), rtol=1e-5, atol=1e-5)
        before = function(x, temb)
        original = block.conv2.weight.clone()
        block.conv2.weight.mul_(1.5)  # what a LoRA merge does
        try:
            after = function(x, temb)
            assert not torch.allclose(after, before)
            torch.testing.assert_close(after, block(x, temb), rtol=1e-5, atol=1e-5)
        finally:
            block.conv2.weight.copy_(original)


def test_a_new_process_loads_it_without_tracing(compiled, tmp_path):
    *_, data = compiled
    _load_in_a_new_process(data, "plain", tmp_path)


def test_blocks_with_the_kernel_pass_are_saved_and_loaded_too(tmp_path):
    # The pass once patched `forward` onto each block instance: Dynamo's guards on such a method cannot
    # be saved, so every process fell back to tracing (found on the GPU with the tiny preset).
    outer, x, temb = fused_and_inputs()
    function, data = Precompiler(outer).compile((x, temb), {})
    with torch.no_grad():
        torch.testing.assert_close(function(x, temb), outer(x, temb), rtol=1e-5, atol=1e-5)
    _load_in_a_new_process(data, "fused", tmp_path)


def test_a_module_whose_instance_forward_cannot_be_saved_is_precompiled_all_the_same(tmp_path):
    # diffjet's CUDA-graph runner sits in `module.forward`; once it holds a captured graph it cannot be
    # pickled, and Dynamo saves the module's attributes with the guards: every later signature failed
    # to precompile (SDXL on the H100). A lock stands in for the graph here.
    import threading

    block, x, temb = block_and_inputs()

    class Runner:
        def __init__(self, fn):
            self.fn, self.graph = fn, threading.Lock()

        def __call__(self, *args, **kwargs):
            return self.fn(*args, **kwargs)

    runner = Runner(block.forward)
    block.forward = runner
    function, data = Precompiler(block).compile((x[..., :8, :8], temb), {})
    assert block.forward is runner, "the runner is back in place"
    with torch.no_grad():
        torch.testing.assert_close(function(x[..., :8, :8], temb), runner(x[..., :8, :8], temb), rtol=1e-5, atol=1e-5)
    block.forward = type(block).forward.__get__(block)
    _load_in_a_new_process(data, "plain-small", tmp_path)


def _load_in_a_new_process(data: bytes, which: str, tmp_path) -> None:
    path = tmp_path / FUNCTION
    path.write_bytes(data)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "tests.precompiled_blocks", str(path), which], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["error"] < 1e-5
    assert result["dynamo_frames"] == 0, "the loaded function must not be traced again"


def test_cache_entries_keep_and_check_the_function(compiled, tmp_path, caplog):
    *_, data = compiled
    cache = CompileCache(tmp_path, save_artifacts=lambda: None, load_artifacts=lambda b: None)
    parts = {"component": "block", "signature": "x"}
    assert cache.load_entry(parts) is None
    folder = cache.store(parts, extra={FUNCTION: data})
    assert cache.load_entry(parts) == {FUNCTION: data}
    damaged = bytearray(data)
    damaged[len(damaged) // 2] ^= 0xFF
    (folder / FUNCTION).write_bytes(bytes(damaged))
    assert cache.load_entry(parts) is None and cache.stats.rejected == 1
    assert "function.bin" in caplog.text and not folder.exists()


def test_only_inductor_is_precompiled():
    assert not precompiled.supported("aot_eager")


class _FakePrecompiler:
    def __init__(self, fail=False):
        self.fail, self.compiled, self.loaded = fail, 0, []

    def compile(self, args, kwargs):
        if self.fail:
            raise RuntimeError("cannot trace this whole")
        self.compiled += 1
        return (lambda *a, **k: "precompiled"), b"function-bytes"

    def load(self, data):
        self.loaded.append(data)
        return lambda *a, **k: "loaded"


def _runner_policy(cache, precompile):
    """A CUDA-graph runner's choice of function per signature, without a GPU (no capture happens)."""
    from diffjet.runtime.cuda_graph import CudaGraphRunner

    runner = object.__new__(CudaGraphRunner)
    runner.fn, runner.name, runner.cache, runner.precompile, runner._functions = (
        lambda *a, **k: "jit", "unet", cache, precompile, {})
    return runner


def test_runner_compiles_once_stores_the_function_and_a_new_process_loads_it(tmp_path):
    parts = {"component": "unet", "signature": "s1"}
    fake = _FakePrecompiler()
    cache = CompileCache(tmp_path, save_artifacts=lambda: None, load_artifacts=lambda b: None)
    runner = _runner_policy(cache, fake)
    source = runner._function_for(parts, (), {}, "s1", tmp_path / "inductor")
    assert source.fn() == "precompiled" and not source.missing and fake.compiled == 1
    assert source.files == {FUNCTION: b"function-bytes"}
    assert runner._function_for(parts, (), {}, "s1", tmp_path / "inductor").fn() == "precompiled" and fake.compiled == 1
    assert cache.stats.stored == 1

    later = _FakePrecompiler()  # another process, same cache
    runner = _runner_policy(CompileCache(tmp_path, save_artifacts=lambda: None, load_artifacts=lambda b: None), later)
    source = runner._function_for(parts, (), {}, "s1", tmp_path / "inductor")
    assert source.fn() == "loaded" and later.loaded == [b"function-bytes"] and later.compiled == 0


def test_runner_falls_back_to_compiling_in_process_when_precompiling_fails(tmp_path, caplog):
    parts = {"component": "unet", "signature": "s1"}
    cache = CompileCache(tmp_path, save_artifacts=lambda: None, load_artifacts=lambda b: None)
    runner = _runner_policy(cache, _FakePrecompiler(fail=True))
    source = runner._function_for(parts, (), {}, "s1", tmp_path / "inductor")
    assert source.fn() == "jit" and source.missing, "the in-process compile's artifacts still go to the cache"
    assert runner.precompile is None and "cannot trace this whole" in caplog.text


def test_an_entry_stored_without_a_function_gets_one_when_precompiling_works_again(tmp_path):
    parts = {"component": "unet", "signature": "s1"}

    def cache():
        return CompileCache(tmp_path, save_artifacts=lambda: (b"kernels", None), load_artifacts=lambda b: None)

    first = _runner_policy(cache(), _FakePrecompiler(fail=True))
    inductor = tmp_path / "inductor"
    assert first._function_for(parts, (), {}, "s1", inductor).missing  # fell back: the capture will store the kernels
    first.cache.store(parts)
    assert cache().load_entry(parts) == {}

    fake = _FakePrecompiler()
    assert _runner_policy(cache(), fake)._function_for(parts, (), {}, "s1", inductor).fn() == "precompiled"
    assert cache().load_entry(parts) == {FUNCTION: b"function-bytes"}
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".")]
    assert leftovers == []

    later = _FakePrecompiler()
    source = _runner_policy(cache(), later)._function_for(parts, (), {}, "s1", inductor)
    assert source.fn() == "loaded" and later.compiled == 0
