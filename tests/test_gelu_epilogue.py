"""The `gelu_epilogue` kernel setting: a DiT's tanh-GELU projections as one GEMM with a GELU epilogue
(`torch._addmm_activation`) and Flux's single blocks' output projection split over its input's halves, against
diffusers' own forward. On a CPU `linear_gelu` is diffusers' GEMM, then tanh GELU (the CPU's `_addmm_activation`
applies the exact GELU): these tests hold the rewritten blocks to diffusers' computation in float32; the
epilogue on a GPU is tested in tests/test_dit_gpu.py and timed by `bench/flux_mlp_op.py`."""

import copy

import pytest
import torch
from diffusers import SD3Transformer2DModel
from torch import nn

from diffjet import Config
from diffjet.config import DEFAULT_KERNELS
from diffjet.models.architectures import TINY_SD3_TRANSFORMER
from diffjet.passes import attention
from diffjet.passes import kernels as kernel_pass

from .conftest import relative_error, traced_error
from .test_qk_norm_rope import tiny_flux

EPILOGUE = Config(kernels=("gelu_epilogue",))


@pytest.fixture
def epilogues(monkeypatch) -> list[tuple[int, ...]]:
    """(tokens, output width) of each projection run through `linear_gelu` from here on."""
    calls = []
    linear_gelu = kernel_pass.linear_gelu

    def counted(x, proj):
        calls.append((x.shape[-2], proj.out_features))
        return linear_gelu(x, proj)

    monkeypatch.setattr(kernel_pass, "linear_gelu", counted)
    return calls


def tiny_sd3():
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**TINY_SD3_TRANSFORMER).eval()
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(2, 16, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(2, 7, 64, generator=g),
        "pooled_projections": torch.randn(2, 64, generator=g),
        "timestep": torch.tensor([700.0, 700.0]),
    }
    return model, {**inputs, "return_dict": False}


def with_random_biases(model: nn.Module) -> nn.Module:
    """diffusers initializes biases to zero; a bias added twice or lost must show."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("fused_attention", [False, True], ids=["diffusers-attention", "fused-qkv"])
def test_flux_blocks_give_diffusers_output(epilogues, fused_attention):
    model, inputs = tiny_flux()
    with_random_biases(model)
    if fused_attention:
        attention.apply(model, Config())
    with torch.no_grad():
        expected = model(**inputs)[0]
    kernel_pass.apply(model, EPILOGUE)
    placed = kernel_pass.placements(model)
    # one double block (ff and ff_context), one single block
    assert (placed["gelu_epilogue"], placed["flux_single_split"]) == (2, 1)
    with torch.no_grad():
        got = model(**inputs)[0]
    # the double block's image (20 tokens) and text (7) feed-forwards, the single block's 27 tokens
    assert sorted(epilogues) == [(7, 128), (20, 128), (27, 128)]
    assert relative_error(got, expected) < 1e-6


def test_sd3_feed_forwards_give_diffusers_output(epilogues):
    model, inputs = tiny_sd3()
    with_random_biases(model)
    attention.apply(model, Config())
    with torch.no_grad():
        expected = model(**inputs)[0]
    kernel_pass.apply(model, EPILOGUE)
    # two joint blocks with ff and ff_context, but the last one's context is not projected any further
    assert kernel_pass.placements(model)["gelu_epilogue"] == 3
    assert kernel_pass.placements(model)["flux_single_split"] == 0
    with torch.no_grad():
        got = model(**inputs)[0]
    assert len(epilogues) == 3
    assert relative_error(got, expected) < 1e-6


def test_the_blocks_trace_whole_and_match_eager():
    model, inputs = tiny_flux()
    with_random_biases(model)
    attention.apply(model, Config())
    kernel_pass.apply(model, Config(kernels=("qk_norm_rope", "gelu_epilogue")))
    assert traced_error(model, inputs) < 1e-6


def test_the_split_projection_accumulates_into_the_first_gemms_buffer_under_inductor():
    # the single blocks' output projection (`split_projection`) alone: Inductor's code for it is extern calls only
    from torch._inductor.utils import run_and_get_code

    g = torch.Generator().manual_seed(3)
    proj = nn.Linear(32 + 128, 32)
    torch.nn.init.normal_(proj.bias, generator=g)
    attn, mlp = torch.randn(1, 23, 32, generator=g), torch.randn(1, 23, 128, generator=g)
    with torch.no_grad():
        expected = proj(torch.cat([attn, mlp], dim=-1))
        torch._dynamo.reset()
        got, (code,) = run_and_get_code(torch.compile(kernel_pass.split_projection, fullgraph=True), attn, mlp, proj)
    assert relative_error(got, expected) < 1e-6
    # the GEMM over the MLP's half writes `out=bufN`; the attention's half accumulates onto bufN itself, no copy
    lines = code.splitlines()
    into = [i for i, line in enumerate(lines) if "diffjet.addmm_into.default(" in line]
    assert len(into) == 1
    buffer = lines[into[0]].split("addmm_into.default(")[1].split(",")[0]
    assert any(f"out={buffer})" in line for line in lines[:into[0]] if "extern_kernels.addmm(" in line)
    assert not any(f"{buffer}.copy_" in line or f"clone({buffer}" in line for line in lines)


def test_gradients_through_the_split_blocks_are_diffusers_own():
    # the in-place accumulation has no backward: with gradients on, the split block keeps autograd's addmm
    model, inputs = tiny_flux()
    with_random_biases(model)
    attention.apply(model, Config())
    reference = copy.deepcopy(model)
    kernel_pass.apply(model, EPILOGUE)
    assert kernel_pass.placements(model)["flux_single_split"] > 0

    def gradients(m):
        m.zero_grad()
        m(**inputs)[0].square().sum().backward()
        return {name: p.grad for name, p in m.named_parameters() if p.grad is not None}

    expected, got = gradients(reference), gradients(model)
    assert got.keys() == expected.keys()
    assert max(relative_error(got[name], expected[name]) for name in expected) < 1e-5


def test_a_merge_into_the_weights_reaches_the_split_projection():
    """An in-place LoRA merge changes `proj_out.weight` and `proj_mlp.weight`; the split halves are views."""
    model, inputs = tiny_flux()
    reference, _ = tiny_flux()
    for m in (model, reference):
        with_random_biases(m)
    kernel_pass.apply(model, EPILOGUE)
    with torch.no_grad():
        before = model(**inputs)[0]
        for m in (model, reference):
            block = m.single_transformer_blocks[0]
            for layer in (block.proj_out, block.proj_mlp):
                layer.weight.add_(torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(3)))
        expected, got = reference(**inputs)[0], model(**inputs)[0]
    assert relative_error(expected, before) > 1e-2  # the merge changed the output
    assert relative_error(got, expected) < 1e-6


def test_layers_that_are_not_plain_linears_run_diffusers_forward(epilogues):
    """An fp8 GEMM or a PEFT LoRA layer in a projection's place: diffusers' forward, no epilogue."""

    class Wrapped(nn.Linear):
        pass

    model, inputs = tiny_flux()
    with_random_biases(model)
    with torch.no_grad():
        expected = model(**inputs)[0]
    kernel_pass.apply(model, EPILOGUE)
    for block in model.transformer_blocks:
        block.ff.net[0].proj.__class__ = Wrapped
    model.single_transformer_blocks[0].proj_out.__class__ = Wrapped
    with torch.no_grad():
        got = model(**inputs)[0]
    assert epilogues == [(7, 128)]  # the text tokens' feed-forward only
    assert relative_error(got, expected) < 1e-6


def test_the_setting_is_default_and_a_dit_kernel():
    assert "gelu_epilogue" in DEFAULT_KERNELS
    assert kernel_pass.acting(EPILOGUE, fp8_on=False) == []  # nothing for a UNet
    model, _ = tiny_flux()
    kernel_pass.apply(model, Config(kernels=("qk_norm_rope",)))
    assert kernel_pass.placements(model)["gelu_epilogue"] == 0


def test_fp8_projections_keep_their_fp8_gemms():
    """The kernel pass runs after the fp8 pass: a projection that is an fp8 GEMM gets no epilogue class."""
    from diffjet.passes import fp8

    model, _ = tiny_flux()
    fp8.apply(model, Config(fp8=True))
    kernel_pass.apply(model, EPILOGUE)
    placed = kernel_pass.placements(model)
    assert (placed["gelu_epilogue"], placed["flux_single_split"]) == (0, 0)
