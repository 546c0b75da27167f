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
from diffjet.runtime.precompiled import AotiPrecompiler, Precompiler

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


@pytest.mark.slow  # several seconds; CI runs it in its -m slow step
def test_blocks_with_the_kernel_pass_are_saved_and_loaded_too(tmp_path):
    # The pass once patched `forward` onto each block instance: Dynamo's guards on such a method cannot
    # be saved, so every process fell back to tracing (found on the GPU with the tiny preset).
    outer, x, temb = fused_and_inputs()
    function, data = Precompiler(outer).compile((x, temb), {})
    with torch.no_grad():
        torch.testing.assert_close(function(x, temb), outer(x, temb), rtol=1e-5, atol=1e-5)
    _load_in_a_new_process(data, "fused", tmp_path)


@pytest.mark.slow  # several seconds; CI runs it in its -m slow step
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
    # The weights' layout and device are in the entry's key; a guard per weight cost a fake tensor each
    # at every load (0.8 s of the SD1.5 UNet's). The guards on the inputs and on global state stay.
    assert result["unpickled_tensors"] <= 2, "no guard on the module's own tensors (x and temb only)"
    assert result["rejects_other_shape"] and result["rejects_grad_mode"]


def test_cache_entries_keep_and_check_the_function(compiled, tmp_path, caplog):
    *_, data = compiled
    cache = CompileCache(tmp_path, save_artifacts=lambda: None, load_artifacts=lambda b: None)
    parts = {"component": "block", "signature": "x"}
    assert cache.load_entry(parts) is None
    folder = cache.store(parts, {FUNCTION: data})
    assert cache.load_entry(parts).files == {FUNCTION: data}
    damaged = bytearray(data)
    damaged[len(damaged) // 2] ^= 0xFF
    (folder / FUNCTION).write_bytes(bytes(damaged))
    assert cache.load_entry(parts) is None and cache.stats.rejected == 1
    assert "function.bin" in caplog.text and not folder.exists()


def first_convolution(block, x, temb):
    """A function of the block other than its forward, as step caching runs parts of a UNet."""
    return block.conv1(block.nonlinearity(block.norm1(x)))


def test_any_function_of_the_module_can_be_precompiled(compiled):
    block, x, temb, *_ = compiled
    function, data = Precompiler(block, function=first_convolution).compile((x, temb), {})
    loaded = Precompiler(block, function=first_convolution).load(data)
    with torch.no_grad():
        expected = first_convolution(block, x, temb)
        torch.testing.assert_close(function(x, temb), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(x, temb), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(function(x, temb), block(x, temb), atol=1e-2), "not the forward"


def test_only_inductor_is_precompiled():
    assert not precompiled.supported("aot_eager")


# -- AOTInductor packages (`Config(precompile="aoti")`) ----------------------------------------------------
aoti = pytest.mark.skipif(not precompiled.supported("inductor", "aoti"), reason="this torch has no AOTInductor")


@pytest.fixture(scope="module")
def package():
    block, x, temb = block_and_inputs()
    function, data = AotiPrecompiler(block).compile((x,), {"temb": temb})
    return block, x, temb, function, data


@aoti
def test_an_aoti_package_matches_eager_loads_anew_and_sees_in_place_weight_updates(package):
    block, x, temb, compiled_here, data = package
    loaded = AotiPrecompiler(block).load(data)  # as a new process does: the package alone, the module's tensors
    with torch.no_grad():
        for function in (compiled_here, loaded):
            torch.testing.assert_close(function(x, temb=temb), block(x, temb), rtol=1e-5, atol=1e-5)
        before = loaded(x, temb=temb)
        original = block.conv2.weight.clone()
        block.conv2.weight.mul_(1.5)  # what a LoRA merge does: the package reads the module's own tensor
        try:
            after = loaded(x, temb=temb)
            assert not torch.allclose(after, before)
            torch.testing.assert_close(after, block(x, temb), rtol=1e-5, atol=1e-5)
        finally:
            block.conv2.weight.copy_(original)


@aoti
def test_an_aoti_package_follows_tensors_that_were_replaced_and_refuses_ones_that_changed_dtype(package):
    # The package holds raw pointers: after `pipe.to(...)` or a `.data` swap it must read the new tensors,
    # never the freed ones, and a dtype it was not compiled for must raise rather than compute garbage.
    block, x, temb, _, data = package
    loaded = AotiPrecompiler(block).load(data)
    original = block.conv2.weight.data
    try:
        with torch.no_grad():
            torch.testing.assert_close(loaded(x, temb=temb), block(x, temb), rtol=1e-5, atol=1e-5)
            block.conv2.weight.data = original.clone() * 1.5
            torch.testing.assert_close(loaded(x, temb=temb), block(x, temb), rtol=1e-5, atol=1e-5)
            block.conv2.weight.data = original.double()
            with pytest.raises(RuntimeError, match="changed dtype or shape"):
                loaded(x, temb=temb)
    finally:
        block.conv2.weight.data = original


@aoti
def test_an_aoti_package_for_another_module_is_refused_at_load(package):
    *_, data = package
    outer, _, _ = fused_and_inputs()  # the same block one level down: its tensors have other names
    with pytest.raises(ValueError, match="wants tensors the module does not have"):
        AotiPrecompiler(outer).load(data)


@aoti
@pytest.mark.slow  # an AOTInductor compile; CI runs it in its -m slow step
def test_an_aoti_package_runs_diffjets_kernels_through_the_op_registry():
    outer, x, temb = fused_and_inputs()
    function, data = AotiPrecompiler(outer).compile((x, temb), {})
    assert b"diffjet::group_norm_silu" in data or b"diffjet.group_norm_silu" in data, "the op is called, not inlined"
    with torch.no_grad():
        torch.testing.assert_close(AotiPrecompiler(outer).load(data)(x, temb), outer(x, temb), rtol=1e-5, atol=1e-5)
