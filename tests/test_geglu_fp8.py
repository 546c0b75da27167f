"""diffjet's GEGLU kernel on e4m3 inputs (`geglu_fp8`) against the unfused fp8 computation, and its place in the
kernel pass (on by default, acting only with `Config(fp8=...)`).

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1). The
products of e4m3 values are exact in float32, so the kernel and `reference_fp8` differ only in the order of
their float32 sums: they must agree to half precision's rounding. Against the float32 GEGLU the fp8 error is
held to DESIGN.md's rule with the unfused fp8 path (`torch._scaled_mm`, then the gate) as the baseline.
"""

import pytest
import torch
from diffusers.models.activations import GEGLU

from diffjet import Config
from diffjet.config import DEFAULT_KERNELS
from diffjet.kernels import geglu as gg
from diffjet.passes import fp8
from diffjet.passes import kernels as kernel_pass

from .conftest import relative_error, tiny_fp8_unets, tiny_unet_outputs

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (rows, in features, inner features): widths no tile divides, one row, SD's 320 → 2·1280 at a few rows.
SHAPES = [(37, 48, 40), (130, 64, 72), (1, 96, 24), (6, 320, 1280)]
BLOCKS = [None, (32, 16, 32, 2, 4, 2)]


def fp8_inputs(rows, k, n, dtype=torch.float16, seed=0):
    """x, W and b in `dtype`, with x and W quantized as the fp8 pass does: (x, b, q, x_scale, w8, w_scale, W)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(DEVICE, dtype)
    weight = (torch.randn(2 * n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    bias = torch.randn(2 * n, generator=g).to(DEVICE, dtype)
    q, x_scale = fp8.quantize_rows(x)
    w8, w_scale = fp8.quantize_rows(weight)
    return x, bias, q, x_scale, w8, w_scale.view(1, -1).contiguous(), weight


@pytest.mark.parametrize("blocks", BLOCKS, ids=["default-tiles", "small-tiles"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_fp8_kernel_against_the_unfused_fp8_computation(shape, blocks):
    rows, k, n = shape
    x, bias, q, xs, w8, ws, weight = fp8_inputs(rows, k, n)
    assert gg.supported_fp8(q, xs, w8, ws, bias, torch.float16)
    out = torch.full((rows, n), float("nan"), device=DEVICE, dtype=torch.float16)  # unwritten stays NaN
    y = gg.launch_fp8(q, xs, w8, ws, bias, torch.float16, out=out, blocks=blocks)
    assert y is out and torch.isfinite(y).all()
    unfused = gg.reference_fp8(q, xs, w8, ws, bias, torch.float16)
    assert relative_error(y.float(), unfused.float()) < 1e-3
    # Against float32: no worse than the unfused fp8 path, and far from right without the scales.
    want = gg.reference(x.float(), weight.float(), bias.float())
    assert relative_error(y.float(), want) <= 1.5 * relative_error(unfused.float(), want) + 1e-6
    assert relative_error(y.float(), want) < 0.1


def test_fp8_gate_holds_from_far_below_to_far_above_zero():
    # The kernel's GELU is its tanh form from exp2: exp2 overflows to inf for gates below about -11, where the
    # gate must give 0 (not NaN), and above, h * g; in between it stays within an fp16 step of the exact GELU.
    x, bias, q, xs, w8, ws, _ = fp8_inputs(64, 32, 24, seed=1)
    for scale in (1.0, 8.0, 40.0):  # sums from a few units to a few hundred
        y = gg.launch_fp8(q, xs * scale, w8, ws, bias, torch.float16).float()
        sums = (q.float() @ w8.float().t()) * (xs * scale).view(-1, 1) * ws.view(1, -1) + bias.float()
        h, g = sums.chunk(2, dim=-1)
        exact = h * torch.nn.functional.gelu(g)
        assert torch.isfinite(y).all()
        # the tanh form's 4.7e-4 times |h|, then half precision's rounding of the result
        assert ((y - exact).abs() <= 5e-4 * h.abs() + 1e-3 * exact.abs() + 1e-6).all()
    assert g.min() < -12 and g.max() > 12, "the last scale reaches where exp2 overflows"


def test_fp8_op_falls_back_to_its_reference_and_has_a_fake():
    x, bias, q, xs, w8, ws, _ = fp8_inputs(5, 36, 16)  # 36-byte rows: no tensor descriptor takes them
    assert not gg.supported_fp8(q, xs, w8, ws, bias, torch.float16)
    torch.testing.assert_close(torch.ops.diffjet.geglu_fp8(q, xs, w8, ws, bias, torch.float16),
                               gg.reference_fp8(q, xs, w8, ws, bias, torch.float16), rtol=0, atol=0)
    x, bias, q, xs, w8, ws, _ = fp8_inputs(5, 32, 16)
    assert not gg.supported_fp8(q, xs, w8, ws, bias.float(), torch.float16)  # bias in another dtype
    for args in ((q, xs, w8, ws, bias, torch.float16), (q, xs, w8, ws, None, torch.float16)):
        # (opcheck's schema test compares results with arithmetic that float8 tensors lack on CPU)
        torch.library.opcheck(torch.ops.diffjet.geglu_fp8.default, args, test_utils=("test_faketensor",))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_fp8_op_traces_with_the_quantization_in_the_graph(backend):
    x, bias, q, xs, w8, ws, _ = fp8_inputs(6, 32, 16)

    def f(x):
        q, scale = fp8.quantize_rows(x * 2)
        return torch.ops.diffjet.geglu_fp8(q, scale, w8, ws, bias, torch.float16) + 1

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)


def _fp8_block(kernels, seed=0):
    torch.manual_seed(seed)
    block = GEGLU(64, 48).to(DEVICE, torch.float16)
    config = Config(kernels=kernels, fp8=True)
    fp8.apply(block, config)
    kernel_pass.apply(block, config)
    return block


def test_fp8_calls_go_through_the_kernel_only_when_it_is_named(monkeypatch):
    calls = []
    real = kernel_pass.geglu_fp8
    monkeypatch.setattr(kernel_pass, "geglu_fp8", lambda *args: calls.append(args[0].shape) or real(*args))
    monkeypatch.setattr(kernel_pass, "geglu", lambda *args: pytest.fail("an fp8 call ran the fp16 kernel"))
    x = torch.randn(2, 7, 64).to(DEVICE, torch.float16)
    unfused = _fp8_block(("geglu",))  # fp8 calls: `_scaled_mm`, then the gate in Inductor's code
    fused = _fp8_block(("geglu", "geglu_fp8"))
    assert type(fused.proj) is fp8.Fp8Linear and fused.fp8_kernel and fused.fp16_kernel
    want = unfused(x)
    assert calls == []
    got = fused(x)
    assert calls == [(14, 64)] and got.shape == want.shape == (2, 7, 48)
    assert relative_error(got.float(), want.float()) < 1e-3
    # Named alone, it leaves fp16 calls to diffusers' forward.
    alone = _fp8_block(("geglu_fp8",))
    assert alone.fp8_kernel and not alone.fp16_kernel


def test_fp8_kernel_sees_a_requantized_weight():
    # A LoRA merge writes the fp16 weight, then requantizes the fp8 buffers in place: the kernel reads them.
    block = _fp8_block(("geglu", "geglu_fp8"))
    x = torch.randn(9, 64).to(DEVICE, torch.float16)
    before = block(x)
    with torch.no_grad():
        block.proj.weight.mul_(-1)
    assert fp8.requantize([block], [block.proj.weight]) == 1
    after = block(x)
    want = gg.reference(x.float(), block.proj.weight.float(), block.proj.bias.float())
    assert not torch.equal(before, after)
    assert relative_error(after.float(), want) < 0.1


def test_tiny_unet_with_the_fp8_geglu_kernel_keeps_the_fp8_error(tiny_path, monkeypatch):
    reference, unfused, fused = tiny_fp8_unets(tiny_path, Config(kernels=(), fp8=True),
                                               Config(kernels=("geglu_fp8",), fp8=True))
    calls = []
    real = kernel_pass.geglu_fp8
    monkeypatch.setattr(kernel_pass, "geglu_fp8", lambda *args: calls.append(args[0].shape) or real(*args))
    want, base, got = tiny_unet_outputs(reference, unfused, fused)
    assert len(calls) == sum(isinstance(m, kernel_pass.FusedGEGLU) for m in fused.modules()) > 0
    assert relative_error(got, want) <= 1.5 * relative_error(base, want) + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8192, 640, 2560), (2048, 1280, 5120)], ids=["sdxl-64x64", "sdxl-32x32"])
def test_fp8_kernel_at_sdxls_shapes_and_under_inductor(shape):
    rows, k, n = shape
    x, bias, q, xs, w8, ws, weight = fp8_inputs(rows, k, n)
    unfused = gg.reference_fp8(q, xs, w8, ws, bias, torch.float16)
    assert relative_error(gg.launch_fp8(q, xs, w8, ws, bias, torch.float16).float(), unfused.float()) < 1e-3

    def f(x):  # the quantization in the graph, as FusedGEGLU writes it
        q, scale = fp8.quantize_rows(x)
        return torch.ops.diffjet.geglu_fp8(q, scale, w8, ws, bias, torch.float16)

    compiled = torch.compile(f, fullgraph=True)
    assert relative_error(compiled(x).float(), unfused.float()) < 1e-3


def test_naming_the_fp8_kernel_without_fp8_is_refused_but_the_default_list_is_not():
    from diffjet.errors import ConfigError

    with pytest.raises(ConfigError, match="geglu_fp8.*fp8 is off"):
        Config(kernels=("geglu", "geglu_fp8"))
    assert Config(kernels=("geglu_fp8",), fp8="auto").kernels == ("geglu_fp8",)
    # On by default: it acts only with fp8, so the lossless default holds it without fp8.
    assert "geglu_fp8" in Config().kernels and "geglu_fp8" in Config(fp8=True).kernels
    assert Config(kernels=DEFAULT_KERNELS).kernels == DEFAULT_KERNELS
    # ... and is named (in the compile report, so in the cache key) only where fp8 is on.
    assert kernel_pass.acting(Config(), fp8_on=False) == ["group_norm_silu", "geglu"]
    assert kernel_pass.acting(Config(fp8="auto"), fp8_on=False) == ["group_norm_silu", "geglu"]
    assert kernel_pass.acting(Config(fp8=True), fp8_on=True) == ["group_norm_silu", "geglu", "geglu_fp8"]
