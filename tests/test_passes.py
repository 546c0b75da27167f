"""Each pass alone, on CPU, against the unmodified module (fp32, tight tolerance), and idempotent."""

import copy
import inspect

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from diffjet.config import Config
from diffjet.passes import attention, inductor, memory_format, precision
from diffjet.passes.attention import FusedQKVAttnProcessor

from .conftest import relative_error

TIGHT = 1e-5


@pytest.fixture
def unet(tiny_path):
    return UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet").eval()


@pytest.fixture
def vae(tiny_sdxl_path):
    return AutoencoderKL.from_pretrained(tiny_sdxl_path, subfolder="vae").eval()


def unet_inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    states = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    return sample, torch.tensor(500.0), states


def run_unet(unet, inputs):
    with torch.no_grad():
        return unet(*inputs, return_dict=False)[0]


def state_of(module):
    """What a second application of a pass could change: the module tree, each parameter object and its
    storage, the attention processors and the forward."""
    return {
        "modules": {name: id(m) for name, m in module.named_modules()},
        "parameters": {name: (id(p), p.data_ptr(), p.stride()) for name, p in module.named_parameters()},
        "processors": {name: id(p) for name, p in module.attn_processors.items()},
        "forward": module.forward,
    }


PASSES = {"attention": attention, "memory_format": memory_format, "inductor": inductor}


@pytest.mark.parametrize("name", PASSES)
def test_pass_matches_unmodified_unet(unet, name):
    reference = copy.deepcopy(unet)
    inputs = unet_inputs(unet)
    expected = run_unet(reference, inputs)
    assert PASSES[name].apply(unet, Config(backend="eager")) is unet
    first = run_unet(unet, inputs)
    assert relative_error(first, expected) < TIGHT
    assert relative_error(run_unet(unet, inputs), first) == 0.0
    other = unet_inputs(unet, seed=1)
    assert relative_error(run_unet(unet, other), run_unet(reference, other)) < TIGHT


@pytest.mark.parametrize("name", PASSES)
def test_pass_applied_twice_changes_nothing_more(unet, name):
    config = Config(backend="eager")
    before = state_of(unet)
    PASSES[name].apply(unet, config)
    once = state_of(unet)
    assert once != before, "the pass changed nothing the first time: the check below would prove nothing"
    PASSES[name].apply(unet, config)
    assert state_of(unet) == once


def test_the_inductor_pass_makes_its_compiled_function_at_the_first_call_only(unet, monkeypatch):
    made = []

    def compile_(fn, **options):
        made.append(options)
        return fn

    monkeypatch.setattr(torch, "compile", compile_)
    original = inspect.signature(unet.forward)
    inductor.apply(unet, Config(backend="eager"))
    assert made == [], "torch.compile was called before the forward was"
    assert inspect.signature(unet.forward) == original
    inputs = unet_inputs(unet)
    first = run_unet(unet, inputs)
    run_unet(unet, inputs)
    assert made == [{"backend": "eager", "dynamic": False, "options": None}]
    assert relative_error(first, run_unet(copy.deepcopy(unet), inputs)) == 0.0


def test_attention_fuses_projections_without_copying_weights(unet):
    attention.apply(unet, Config())
    attns = [m for m in unet.modules() if hasattr(m, "to_q")]
    assert attns and all(isinstance(a.processor, FusedQKVAttnProcessor) for a in attns)
    for attn in attns:
        fused = attn.to_kv if attn.is_cross_attention else attn.to_qkv
        parts = (attn.to_k, attn.to_v) if attn.is_cross_attention else (attn.to_q, attn.to_k, attn.to_v)
        assert all(p.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr() for p in parts)


def test_in_place_weight_update_reaches_fused_attention(unet):
    attention.apply(unet, Config())
    reference = copy.deepcopy(unet)
    attn = next(m for m in unet.modules() if hasattr(m, "to_qkv"))
    with torch.no_grad():
        attn.to_q.weight.mul_(2.0)
    inputs = unet_inputs(unet)
    assert relative_error(run_unet(unet, inputs), run_unet(reference, inputs)) > 1e-3


def test_attention_keep_leaves_processors(unet):
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    attention.apply(unet, Config(attention="keep"))
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


def test_memory_format_makes_conv_weights_channels_last(unet):
    memory_format.apply(unet, Config())
    conv = unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_memory_format_respects_config(unet):
    memory_format.apply(unet, Config(channels_last=False))
    assert unet.conv_in.weight.is_contiguous()


def test_precision_converts_to_half(unet):
    precision.apply(unet, Config(dtype="bfloat16"))
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}
    precision.apply(unet, Config(dtype="bfloat16"))
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}


def test_precision_keep_is_a_no_op(unet):
    precision.apply(unet, Config(dtype="keep"))
    assert {p.dtype for p in unet.parameters()} == {torch.float32}


def test_pinned_float32_vae_stays_float32_and_takes_half_inputs(vae):
    reference = copy.deepcopy(vae)
    assert precision.needs_float32(vae, torch.float16) and not precision.needs_float32(vae, torch.bfloat16)
    precision.pin_float32(vae)
    precision.pin_float32(vae)
    precision.apply(vae, Config(dtype="float16"))
    assert {p.dtype for p in vae.parameters()} == {torch.float32}
    assert not vae.config.force_upcast, "the pipeline must stop converting the VAE back and forth"
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).half()
    with torch.no_grad():
        out = vae.decode(latents, return_dict=False)[0]
        expected = reference.decode(latents.float(), return_dict=False)[0]
    assert out.dtype == torch.float32
    assert relative_error(out, expected) == 0.0


def test_unpinned_vae_is_converted_even_with_force_upcast(vae):
    assert vae.config.force_upcast
    precision.apply(vae, Config(dtype="float16"))
    assert {p.dtype for p in vae.parameters()} == {torch.float16}


def test_vae_in_bfloat16_is_converted(vae):
    precision.apply(vae, Config(dtype="bfloat16"))
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}


def test_vae_attention_and_layout_match_unmodified(vae):
    reference = copy.deepcopy(vae)
    config = Config()
    attention.apply(vae, config)
    memory_format.apply(vae, config)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = vae.decode(latents, return_dict=False)[0]
        expected = reference.decode(latents, return_dict=False)[0]
    assert relative_error(out, expected) < TIGHT
