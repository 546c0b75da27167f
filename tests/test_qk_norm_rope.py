"""diffjet's Flux attention kernel (`diffjet::qk_norm_rope`: the queries' and keys' RMS norms, the rotary
embedding and SDPA's layout) against diffusers' own computation, and its processor in a Flux transformer.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1). The
interpreter rounds float32 to bfloat16 by truncation where a GPU rounds to nearest, so bfloat16 results may
differ from diffusers' by one bfloat16 step there; float16 and float32 are held to their own rounding.
"""

import pytest
import torch
from diffusers import FluxTransformer2DModel

from diffjet import Config
from diffjet.config import DEFAULT_KERNELS
from diffjet.kernels import qk_norm_rope as qnr
from diffjet.models.architectures import TINY_FLUX_TRANSFORMER
from diffjet.passes import attention
from diffjet.passes import kernels as kernel_pass

from .conftest import relative_error, traced_error

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The largest relative error of the kernel against diffusers' computation, by dtype (see the docstring).
TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def projections(batch, image, text, heads, dim, dtype, seed=0):
    """Seeded fused projections (image, text or None), norm weights and Flux-style cos/sin tables."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, offset=0.0):
        return (torch.randn(*shape, generator=g) + offset).to(DEVICE, dtype)

    qkv = rand(batch, image, 3 * heads * dim, offset=0.3)
    text_qkv = rand(batch, text, 3 * heads * dim) if text else None
    weights = [rand(dim).abs() + 0.5 for _ in range(4 if text else 2)] + ([None, None] if not text else [])
    angles = torch.randn(image + (text or 0), dim // 2, generator=g).repeat_interleave(2, dim=1).to(DEVICE)
    return qkv, text_qkv, weights, angles.cos(), angles.sin()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("text", [None, 5], ids=["single-block", "double-block"])
def test_the_kernel_gives_diffusers_norms_rotation_and_layout(dtype, text):
    # 37 image tokens: not a multiple of the kernel's token block; 5 text tokens end inside the first block.
    qkv, text_qkv, weights, cos, sin = projections(2, 37, text, 3, 16, dtype)
    expected = qnr.reference(qkv, text_qkv, *weights, cos, sin, 3, 1e-6, 1e-5)
    got = qnr.launch(qkv, text_qkv, *weights, cos, sin, 3, 1e-6, 1e-5)
    for name, e, g in zip("qkv", expected, got):
        assert g.shape == e.shape == (2, 3, 37 + (text or 0), 16) and g.is_contiguous(), name
        assert relative_error(g.float(), e.float()) <= TOLERANCE[dtype], name
    assert torch.equal(got[2], expected[2])  # v is only moved


@pytest.mark.parametrize("block_s,heads_per_program", [(16, 6), (64, 4), (32, 3)])
def test_every_launch_configuration_gives_the_same_result(block_s, heads_per_program):
    # 6 heads: a program does all of them, 2 (4 cut to a divisor) or 3; token blocks smaller and larger than 37.
    qkv, text_qkv, weights, cos, sin = projections(1, 37, 5, 6, 16, torch.float16, seed=1)
    expected = qnr.launch(qkv, text_qkv, *weights, cos, sin, 6, 1e-6, 1e-5, heads_per_program=1)
    assert relative_error(expected[0].float(), qnr.reference(qkv, text_qkv, *weights, cos, sin, 6, 1e-6,
                                                             1e-5)[0].float()) <= TOLERANCE[torch.float16]
    got = qnr.launch(qkv, text_qkv, *weights, cos, sin, 6, 1e-6, 1e-5, block_s=block_s,
                     heads_per_program=heads_per_program, num_warps=2)
    for e, g in zip(expected, got):
        assert torch.equal(g, e)  # the same arithmetic per row, whichever program does it


def test_the_kernel_reads_a_projection_with_padded_rows():
    # A view whose rows are longer than 3·heads·head_dim (the last dimension contiguous, as `supported` asks).
    qkv, _, weights, cos, sin = projections(1, 9, None, 2, 8, torch.float16)
    wide = torch.zeros(1, 9, qkv.shape[-1] + 16, dtype=qkv.dtype, device=DEVICE)
    wide[..., :qkv.shape[-1]] = qkv
    view = wide[..., :qkv.shape[-1]]
    assert qnr.supported(view, None, cos, 2) and not view.is_contiguous()
    for e, g in zip(qnr.reference(qkv, None, *weights, cos, sin, 2, 1e-6, 0.0),
                    qnr.launch(view, None, *weights, cos, sin, 2, 1e-6, 0.0)):
        assert relative_error(g.float(), e.float()) <= TOLERANCE[torch.float16]


def test_inputs_the_kernel_does_not_take_run_the_reference():
    qkv, _, weights, cos, sin = projections(1, 6, None, 2, 12, torch.float32)  # head_dim 12: not a power of two
    assert not qnr.supported(qkv, None, cos, 2)
    assert not qnr.supported(qkv, None, cos.double(), 2)
    for e, g in zip(qnr.reference(qkv, None, *weights, cos, sin, 2, 1e-6, 0.0),
                    qnr.qk_norm_rope(qkv, None, *weights, cos, sin, 2, 1e-6, 0.0)):
        assert torch.equal(g, e)


@pytest.fixture
def launched(monkeypatch) -> list[bool]:
    """Each launch of the Triton kernel from here on, as whether it had text tokens (a double block)."""
    calls = []
    launch = qnr.launch
    monkeypatch.setattr(qnr, "launch", lambda *a: calls.append(a[1] is not None) or launch(*a))
    return calls


def tiny_flux():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**{**TINY_FLUX_TRANSFORMER, "in_channels": 16}).eval().to(DEVICE)
    g = torch.Generator().manual_seed(1)
    image, text = 20, 7
    inputs = {
        "hidden_states": torch.randn(1, image, 16, generator=g),
        "encoder_hidden_states": torch.randn(1, text, 32, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g),
        "timestep": torch.tensor([0.7]),
        "img_ids": torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(5.0),
                                              indexing="ij"), dim=-1).reshape(-1, 3),
        "txt_ids": torch.zeros(text, 3),
        "guidance": torch.tensor([3.5]),
    }
    return model, {**{k: v.to(DEVICE) for k, v in inputs.items()}, "return_dict": False}


def test_the_processor_gives_a_flux_transformer_diffusers_output(launched):
    model, inputs = tiny_flux()
    attention.apply(model, Config())
    with torch.no_grad():
        expected = model(**inputs)[0]
    kernel_pass.apply(model, Config(kernels=("qk_norm_rope",)))
    assert kernel_pass.placements(model)["flux_attention"] == 2  # one double block, one single block
    with torch.no_grad():
        got = model(**inputs)[0]
    assert sorted(launched) == [False, True]  # the kernel ran in both blocks, not the reference
    assert relative_error(got, expected) < 1e-5


def test_the_processor_traces_whole_and_matches_eager():
    model, inputs = tiny_flux()
    attention.apply(model, Config())
    kernel_pass.apply(model, Config(kernels=("qk_norm_rope",)))
    assert traced_error(model, inputs) < 1e-6


def test_calls_the_processor_does_not_cover_run_diffusers_processor(launched):
    model, inputs = tiny_flux()
    attention.apply(model, Config())
    for block in model.transformer_blocks:
        block.attn.norm_added_k.eps = 1e-3  # text norms with two epsilons: not the kernel's case
    with torch.no_grad():
        expected = model(**inputs)[0]
    kernel_pass.apply(model, Config(kernels=("qk_norm_rope",)))
    with torch.no_grad():
        got = model(**inputs)[0]
    assert launched == [False]  # the single block only; the double block ran diffusers' processor
    assert relative_error(got, expected) < 1e-5


def test_the_dit_kernels_are_default_and_named_apart_from_the_unet_kernels():
    config = Config()
    assert config.kernels == DEFAULT_KERNELS and "qk_norm_rope" in DEFAULT_KERNELS
    assert kernel_pass.acting(config, fp8_on=False) == ["group_norm_silu", "geglu"]
    assert kernel_pass.acting(config, fp8_on=False, dit=True) == ["qk_norm_rope", "gelu_epilogue", "flash_attn_4"]
    # the UNet defaults named alone still need no fp8
    unet = Config(kernels=("group_norm_silu", "geglu", "geglu_fp8"))
    assert kernel_pass.acting(unet, fp8_on=True, dit=True) == []
    model, _ = tiny_flux()
    assert not kernel_pass.applies(model, config, dit=True)  # float32: not what the pass is for
    assert kernel_pass.applies(model.to(torch.bfloat16), config, dit=True) == (DEVICE == "cuda")
    assert not kernel_pass.applies(model, unet, dit=True)  # not named
