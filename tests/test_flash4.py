"""The `flash_attn_4` kernel setting: diffjet's DiT processors with their attention through `diffjet::flash_attn_4`.

On a CPU the op runs its reference (PyTorch's SDPA on the same (batch, tokens, heads, head_dim) layout), so these
tests hold the processors' layouts around the op, and the op's fake implementation, to diffusers' output; the
FlashAttention-4 kernel itself is held to SDPA on a GPU (tests/test_dit_gpu.py)."""

import pytest
import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from diffjet import Config
from diffjet.config import DEFAULT_KERNELS
from diffjet.kernels import flash4
from diffjet.passes import attention
from diffjet.passes import kernels as kernel_pass

from .conftest import relative_error, traced_error
from .test_gelu_epilogue import tiny_sd3
from .test_qk_norm_rope import tiny_flux

FLASH = Config(kernels=("flash_attn_4",))


@pytest.fixture
def flash_calls(monkeypatch) -> list[tuple[int, ...]]:
    """The kernel pass sees FlashAttention-4 as runnable; the (batch, tokens, heads, head_dim) of each call of the
    op from here on."""
    calls = []
    monkeypatch.setattr(flash4, "unavailable", lambda device, dtype=None: None)
    op = flash4.flash_attn_4

    def counted(q, k, v, scale):
        calls.append(tuple(q.shape))
        assert scale == q.shape[-1] ** -0.5
        return op(q, k, v, scale)

    monkeypatch.setattr(flash4, "flash_attn_4", counted)
    return calls


def test_the_op_matches_sdpa_and_its_fake_implementation():
    g = torch.Generator().manual_seed(0)
    # strided inputs: the transposed views of (batch, heads, tokens, head_dim) tensors the processors pass
    q, k, v = (torch.randn(2, 3, 11, 16, generator=g).transpose(1, 2) for _ in range(3))
    out = torch.ops.diffjet.flash_attn_4(q, k, v, 0.25)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=0.25).transpose(1, 2)
    assert out.shape == (2, 11, 3, 16) and out.is_contiguous()
    assert relative_error(out, expected) < 1e-6
    torch.library.opcheck(torch.ops.diffjet.flash_attn_4, (q, k, v, 0.25))


def test_sd3_attention_through_the_op_gives_diffusers_output(flash_calls):
    model, inputs = tiny_sd3()
    with torch.no_grad():
        expected = model(**inputs)[0]
    attention.apply(model, Config())
    kernel_pass.apply(model, FLASH)
    joint = [m for m in model.modules() if isinstance(getattr(m, "processor", None), JointAttnProcessor2_0)]
    assert joint == []
    placed = kernel_pass.placements(model)["flash_attention"]
    with torch.no_grad():
        got = model(**inputs)[0]
    assert placed == len(flash_calls) > 0  # every attention, once a call
    assert {shape[0] for shape in flash_calls} == {2}
    assert relative_error(got, expected) < 1e-5


def test_flux_attention_through_the_op_gives_diffusers_output(flash_calls):
    model, inputs = tiny_flux()
    with torch.no_grad():
        expected = model(**inputs)[0]
    attention.apply(model, Config())
    kernel_pass.apply(model, Config(kernels=("qk_norm_rope", "flash_attn_4")))
    placed = kernel_pass.placements(model)
    with torch.no_grad():
        got = model(**inputs)[0]
    assert placed["flash_attention"] == placed["flux_attention"] == 2 == len(flash_calls)
    assert flash_calls[0][1] == 27  # text and image tokens together
    assert relative_error(got, expected) < 1e-5


def test_flux_without_its_attention_kernel_keeps_diffusers_processor(flash_calls):
    model, _ = tiny_flux()
    attention.apply(model, Config())
    kernel_pass.apply(model, FLASH)
    assert kernel_pass.placements(model)["flash_attention"] == 0
    assert all(type(m.processor) is FluxAttnProcessor for m in model.modules() if hasattr(m, "processor"))


@pytest.mark.parametrize("tiny", [tiny_sd3, tiny_flux], ids=["sd3", "flux"])
def test_the_processors_trace_whole_through_the_op(flash_calls, tiny):
    model, inputs = tiny()
    attention.apply(model, Config())
    kernel_pass.apply(model, Config(kernels=("qk_norm_rope", "flash_attn_4")))
    assert traced_error(model, inputs) < 1e-6
    assert len(flash_calls) == 2 * kernel_pass.placements(model)["flash_attention"] > 0  # eager, then traced


def test_where_it_cannot_run_sdpa_stays_and_a_second_pass_switches_it(monkeypatch):
    model, inputs = tiny_sd3()
    attention.apply(model, Config())
    monkeypatch.setattr(flash4, "unavailable", lambda device, dtype=None: "not here")
    kernel_pass.apply(model, FLASH)
    placed = kernel_pass.placements(model)  # what the compile report's `off` entry reads
    assert placed["dit_attention"] > placed["flash_attention"] == 0
    monkeypatch.setattr(flash4, "unavailable", lambda device, dtype=None: None)
    kernel_pass.apply(model, FLASH)
    on = kernel_pass.placements(model)["flash_attention"]
    kernel_pass.apply(model, Config(kernels=()))
    assert on > 0 and kernel_pass.placements(model)["flash_attention"] == 0


def test_it_is_default_a_dit_kernel_and_needs_a_hopper_gpu_and_the_package():
    assert "flash_attn_4" in DEFAULT_KERNELS and "flash_attn_4" in kernel_pass.DIT_KERNELS
    assert kernel_pass.acting(FLASH, fp8_on=False) == []  # nothing for a UNet
    assert "CUDA" in flash4.unavailable(torch.device("cpu"))


def test_float32_weights_keep_sdpa_and_the_reason_says_so(monkeypatch):
    # The package asserts on float32 inputs: such a transformer (Config(dtype=torch.float32)) keeps SDPA.
    assert flash4.unavailable(torch.device("cuda"), torch.float32) == "takes float16 or bfloat16, not float32"
    asked = []

    def unavailable(device, dtype=None):
        asked.append(dtype)
        return None if dtype in flash4.HALF else "not float32"

    monkeypatch.setattr(flash4, "unavailable", unavailable)
    model, _ = tiny_flux()
    attention.apply(model, Config())
    kernel_pass.apply(model, Config(kernels=("qk_norm_rope", "flash_attn_4")))
    assert asked == [torch.float32] and kernel_pass.placements(model)["flash_attention"] == 0
    kernel_pass.apply(model.to(torch.bfloat16), Config(kernels=("qk_norm_rope", "flash_attn_4")))
    assert asked[-1] == torch.bfloat16 and kernel_pass.placements(model)["flash_attention"] == 2


@pytest.mark.parametrize("error", [ImportError("No module named 'flash_attn'"),
                                   RuntimeError("No CTK flavor installed")], ids=["missing", "broken"])
def test_a_package_that_does_not_import_is_a_reason_not_a_failure(monkeypatch, error):
    def fail():
        raise error

    monkeypatch.setattr(flash4, "_interface", fail)
    why = flash4._import_failure.__wrapped__()
    assert str(error) in why and ("not installed" in why) == isinstance(error, ImportError)


def test_a_model_it_cannot_act_on_never_imports_the_package(monkeypatch):
    """Importing flash-attn-4 takes seconds: a UNet, or Flux without `qk_norm_rope`, must not ask for it."""
    monkeypatch.setattr(flash4, "unavailable", lambda device, dtype=None: pytest.fail("asked for FlashAttention-4"))
    model, _ = tiny_flux()
    attention.apply(model, Config())
    kernel_pass.apply(model, FLASH)
    assert kernel_pass.placements(model)["flash_attention"] == 0


def test_within_a_warm_up_folder_the_packages_forward_cache_persists_there_and_shares_what_is_in_memory(
        monkeypatch, tmp_path):
    # The package's own classes stand in: `cache_utils.JITPersistentCache(path)`, an in-memory cache with a `cache`
    # dict, the forward function's `compile_cache` attribute (flash_attn/cute/{cache_utils,interface}.py).
    import sys
    import types

    class Persistent:
        def __init__(self, path):
            self.path, self.cache = path, {}

    cache_utils = types.SimpleNamespace(JITPersistentCache=Persistent, _compute_source_fingerprint=lambda: "fp")
    cute = types.ModuleType("flash_attn.cute")
    cute.cache_utils = cache_utils
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    monkeypatch.setattr(flash4, "_bound", None)
    monkeypatch.setattr(flash4, "_memory", None)
    memory = types.SimpleNamespace(cache={"compiled before": "kernel"})
    interface = types.SimpleNamespace(_flash_attn_fwd=types.SimpleNamespace(compile_cache=memory))

    flash4._bind(interface)
    assert interface._flash_attn_fwd.compile_cache is memory
    with flash4.compiled_in(tmp_path / "a"):
        flash4._bind(interface)
        bound = interface._flash_attn_fwd.compile_cache
        assert isinstance(bound, Persistent) and bound.path == tmp_path / "a" / "fp" / "fwd"
        assert bound.cache is memory.cache  # a kernel compiled or loaded in the folder stays in use after it
        with flash4.compiled_in(tmp_path / "b"):
            flash4._bind(interface)
            assert interface._flash_attn_fwd.compile_cache.path == tmp_path / "b" / "fp" / "fwd"
        flash4._bind(interface)
        assert interface._flash_attn_fwd.compile_cache.path == tmp_path / "a" / "fp" / "fwd"
    flash4._bind(interface)
    assert interface._flash_attn_fwd.compile_cache is memory
    # A package without these internals keeps its kernels in memory: the op still runs.
    monkeypatch.setattr(flash4, "_bound", None)
    del cute.cache_utils
    monkeypatch.setitem(sys.modules, "flash_attn.cute.cache_utils", None)  # where the real package is imported
    with flash4.compiled_in(tmp_path / "c"):
        flash4._bind(interface)
    assert interface._flash_attn_fwd.compile_cache is memory
