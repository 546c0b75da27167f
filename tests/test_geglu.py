"""diffjet's GEGLU projection kernel against diffusers' GEGLU, and the pass that puts it in.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1).
Held to DESIGN.md's rule: error against a float32 reference at most 1.5 × that of the unfused half-precision
modules. bfloat16 in the interpreter is the exception: it rounds float32 → bfloat16 toward zero (the GPU
rounds to nearest), four times here, so there the kernel is checked against the same roundings done toward
zero in PyTorch instead, which it must match to float32 summation order.
"""

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.activations import GEGLU

from diffjet import Config
from diffjet.kernels import geglu as gg
from diffjet.passes import kernels as kernel_pass

from .conftest import relative_error

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (leading shape of x, in features, inner features): odd token counts, widths that no tile divides, one
# token, and SD's 320 → 2·1280 at a few tokens.
SHAPES = [((37,), 48, 40), ((2, 77, 64), 64, 80), ((1,), 96, 24), ((130,), 200, 72), ((2, 3), 320, 1280)]
BLOCKS = [None, (32, 16, 32, 2, 4, 2)]  # the default tiles, and small ones: many programs, ragged edges


def inputs(lead, k, n, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g)
    weight = torch.randn(2 * n, k, generator=g) / k**0.5
    b = torch.randn(2 * n, generator=g) if bias else None
    to = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    return to(x), to(weight), to(b)


def toward_zero(t: torch.Tensor) -> torch.Tensor:
    """float32 → bfloat16 → float32, rounding toward zero as Triton's interpreter does."""
    return (t.float().contiguous().view(torch.int32) & -65536).view(torch.float32)


def _cases():
    """Every shape × dtype × bias × tiles; the 154-token shape with small tiles (15–20 s each under the
    interpreter) runs once in the default run (fp16, bias), with fp16 without bias and bf16 with bias under
    -m slow, and in its fourth form (bf16 without bias: the dtype and the bias each covered already) on a GPU
    only."""
    for shape in SHAPES:
        for dtype, dtype_id in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
            for bias, bias_id in ((True, "bias"), (False, "no-bias")):
                for blocks, blocks_id in zip(BLOCKS, ("default-tiles", "small-tiles")):
                    heavy = shape == SHAPES[1] and blocks is not None and (dtype_id, bias) != ("fp16", True)
                    if heavy and (dtype_id, bias) == ("bf16", False) and DEVICE != "cuda":
                        continue
                    yield pytest.param(shape, dtype, bias, blocks, marks=[pytest.mark.slow] if heavy else [],
                                       id="-".join(("x".join(map(str, (*shape[0], shape[1], shape[2]))),
                                                    dtype_id, bias_id, blocks_id)))


@pytest.mark.parametrize("shape, dtype, bias, blocks", list(_cases()))
def test_geglu_kernel_against_reference(shape, dtype, bias, blocks):
    lead, k, n = shape
    x, weight, b = inputs(lead, k, n, dtype, bias)
    out = torch.full((*lead, n), float("nan"), device=DEVICE, dtype=dtype)  # poisoned: unwritten stays NaN
    y = gg.launch(x, weight, b, out=out, blocks=blocks)
    assert y is out and y.shape == (*lead, n) and torch.isfinite(y).all()
    ref = gg.reference(x.float(), weight.float(), None if b is None else b.float()).cpu()
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        acc = F.linear(x.float(), weight.float(), None if b is None else b.float())
        h, g = toward_zero(acc).chunk(2, dim=-1)
        emulated = toward_zero(h * toward_zero(F.gelu(g)))
        assert relative_error(y.float(), emulated) < 1e-5
        return
    baseline = relative_error(gg.reference(x, weight, b).float().cpu(), ref)
    assert relative_error(y.float().cpu(), ref) <= 1.5 * baseline + 1e-6


def test_fresh_inputs_give_fresh_results():
    a, b = inputs((9,), 32, 16, torch.float16, seed=1), inputs((9,), 32, 16, torch.float16, seed=2)
    ya, yb = gg.launch(*a), gg.launch(*b)
    assert not torch.equal(ya, yb)
    torch.testing.assert_close(ya.float(), gg.reference(*a).float(), atol=2e-3, rtol=2e-3)


def test_op_runs_the_reference_where_the_kernel_does_not_apply():
    x, weight, b = inputs((5,), 32, 16, torch.float32)
    assert not gg.supported(x, weight, b)  # float32
    torch.testing.assert_close(torch.ops.diffjet.geglu(x, weight, b), gg.reference(x, weight, b), rtol=0, atol=0)
    x16, w16, b16 = inputs((5,), 32, 16, torch.float16)
    assert gg.supported(x16, w16, b16) == (triton is not None)
    assert not gg.supported(x16, w16[:-1], b16)  # an odd projection does not split into h and g
    assert not gg.supported(x16, w16.float(), b16)  # mixed dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["kernel", "reference"])
def test_fake_implementation_matches_the_real_op(dtype):
    x, weight, b = inputs((2, 7), 32, 24, dtype)
    for args in ((x, weight, b), (x, weight, None)):
        torch.library.opcheck(torch.ops.diffjet.geglu.default, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_op_traces_under_torch_compile(backend):
    x, weight, b = inputs((2, 5), 32, 24, torch.float16)

    def f(x):
        return torch.ops.diffjet.geglu(x * 2, weight, b) + 1

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)


# --- the pass ------------------------------------------------------------------------------------


def _unet_inputs(unet, dtype):
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    states = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).to(dtype)
    return sample, states


def test_pass_fuses_every_geglu_and_keeps_the_lossless_rule(tiny_path, monkeypatch):
    # float16 on CPU: the kernel runs in Triton's interpreter inside every transformer block's feed-forward.
    reference = UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet").eval()
    plain = UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet", torch_dtype=torch.float16).eval()
    fused = UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet", torch_dtype=torch.float16).eval()
    gegl = sum(type(m) is GEGLU for m in fused.modules())
    assert gegl > 0
    kernel_pass.apply(fused, Config(kernels=("geglu",)))
    assert kernel_pass.placements(fused)["geglu"] == gegl and kernel_pass.placements(fused)["resnet_blocks"] == 0
    kernel_pass.apply(fused, Config(kernels=("geglu",)))
    assert kernel_pass.placements(fused)["geglu"] == gegl  # idempotent
    calls = []
    real = kernel_pass.geglu

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(kernel_pass, "geglu", counting)
    with torch.no_grad():
        sample, states = _unet_inputs(reference, torch.float32)
        want = reference(sample, 500, states).sample
        got = fused(sample.half(), 500, states.half()).sample.float()
        base = plain(sample.half(), 500, states.half()).sample.float()
    assert len(calls) == gegl
    assert relative_error(got, want) <= 1.5 * relative_error(base, want) + 1e-6


def test_a_projection_that_is_not_a_plain_linear_runs_diffusers_forward():
    class Wrapped(torch.nn.Linear):  # what a LoRA layer looks like to the pass: not exactly nn.Linear
        pass

    block = GEGLU(16, 8)
    x = torch.randn(3, 16)
    want = block(x)
    kernel_pass.apply(block, Config(kernels=("geglu",)))
    assert type(block) is kernel_pass.FusedGEGLU
    wrapped = Wrapped(16, 16)
    wrapped.load_state_dict(block.proj.state_dict())
    block.proj = wrapped
    torch.testing.assert_close(block(x), want, rtol=0, atol=0)


def test_the_kernel_pays_only_for_outputs_of_four_waves_of_tiles():
    # The H100 (132 SMs) measurements behind the rule: SDXL's two shapes and SD1.5's 8192 × 1280 won, SD1.5's
    # smaller ones lost to cuBLAS plus Inductor's kernel.
    wins = [(2048, 5120), (8192, 2560), (8192, 1280)]
    losses = [(128, 5120), (512, 5120), (2048, 2560)]
    assert all(gg.pays(rows, features, 132) for rows, features in wins)
    assert not any(gg.pays(rows, features, 132) for rows, features in losses)
    assert gg.pays(1, 8, None)  # no GPU to weigh (the interpreter): always


def test_sizes_where_the_kernel_does_not_pay_run_diffusers_forward(monkeypatch):
    block = GEGLU(32, 16).to(DEVICE, torch.float16)
    kernel_pass.apply(block, Config(kernels=("geglu",)))
    assert type(block) is kernel_pass.FusedGEGLU
    calls = []
    monkeypatch.setattr(kernel_pass, "geglu", lambda *args: calls.append(args) or gg.reference(*args))
    x = torch.randn(4, 32).to(DEVICE, torch.float16)
    block.sms = 132  # a GPU's worth of SMs: 4 rows make one tile, far from four waves
    torch.testing.assert_close(block(x), gg.reference(x, block.proj.weight, block.proj.bias), rtol=0, atol=0)
    assert calls == []
    block.sms = None
    block(x)
    assert len(calls) == 1


def test_gpus_before_hopper_keep_diffusers_geglu(monkeypatch, caplog):
    block = torch.nn.Sequential(GEGLU(32, 16))
    monkeypatch.setattr(gg, "runs_on", lambda device: False)  # no tensor descriptors there
    with caplog.at_level("INFO", logger="diffjet.passes.kernels"):
        kernel_pass.apply(block, Config(kernels=("geglu",)))
    assert type(block[0]) is GEGLU and kernel_pass.placements(block)["geglu"] == 0
    assert "needs a Hopper or later GPU" in caplog.text


def test_rows_that_do_not_start_on_16_bytes_go_to_the_reference():
    x, weight, b = inputs((5,), 36, 16, torch.float16)  # 72-byte rows: no tensor descriptor takes them
    assert not gg.supported(x, weight, b)
    torch.testing.assert_close(torch.ops.diffjet.geglu(x, weight, b), gg.reference(x, weight, b), rtol=0, atol=0)
    x, weight, b = inputs((5,), 48, 16, torch.float16)
    assert gg.supported(x, weight, b) and not gg.supported(x[:, 8:], weight[:, 1:41], b)  # W's rows off 16 bytes
    # x's rows off 16 bytes (a view 2 bytes in) are copied to aligned ones: same result as contiguous x.
    torch.testing.assert_close(gg.launch(x[:, 1:33], weight[:, :32], b), gg.launch(x[:, 1:33].contiguous(),
                               weight[:, :32], b), rtol=0, atol=0)


def test_fused_geglu_reads_its_projection_at_every_call():
    # LoRA merges change the projection's weight in place; the fused module must see that, as diffusers' does.
    block = GEGLU(32, 16).to(DEVICE, torch.float16)
    kernel_pass.apply(block, Config(kernels=("geglu",)))
    x = torch.randn(4, 32).to(DEVICE, torch.float16)
    before = block(x)
    with torch.no_grad():
        block.proj.weight.mul_(-1)
    after = block(x)
    want = gg.reference(x, block.proj.weight, block.proj.bias)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after.float(), want.float(), atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
def test_inductor_compiles_the_op_into_its_graph():
    x, weight, b = inputs((2, 77), 320, 1280, torch.float16)

    def f(x):
        return torch.ops.diffjet.geglu(x * 1.5, weight, b) + 1

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x), atol=1e-2, rtol=1e-2)
