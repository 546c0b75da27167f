"""LoRA on the Flux transformer: `diffjet.load_lora` merges in place what diffusers' own loader (PEFT layers,
then `fuse_lora`) computes, for diffusers/ai-toolkit keys and for kohya's BFL-named keys (-m slow; the
default run checks a load and an exact unload, in test_dit.py)."""

import warnings

import pytest
import torch
from diffusers import DiffusionPipeline

import diffjet

from .conftest import relative_error

TOL = 1e-4
RANK = 4
# Every kind of Linear a Flux LoRA trains: joint attention (image and text streams), feed-forwards,
# modulation, and the single-stream blocks' projections.
FLUX_LAYERS = [
    *(f"transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0",
                                                  "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")),
    "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff_context.net.2", "transformer_blocks.0.norm1.linear",
    *(f"single_transformer_blocks.0.{p}" for p in ("attn.to_q", "attn.to_v", "proj_mlp", "proj_out", "norm.linear")),
]


def peft_lora(pipe, seed, layers=FLUX_LAYERS):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for path in layers:
        weight = pipe.transformer.get_submodule(path).weight
        state[f"transformer.{path}.lora_A.weight"] = torch.randn(RANK, weight.shape[1], generator=g) / weight.shape[1] ** 0.5
        state[f"transformer.{path}.lora_B.weight"] = torch.randn(weight.shape[0], RANK, generator=g) * 0.5
    return state


def kohya_lora(pipe, seed):
    """BFL's names, as kohya's sd-scripts write Flux LoRAs: the fused image qkv, split by diffusers into
    to_q/k/v. Not `single_blocks_*_linear1`: diffusers splits it at Flux.1's full-size widths (3 × 3072 +
    12288), so no tiny model can take one."""
    inner = pipe.transformer.inner_dim
    mlp = pipe.transformer.single_transformer_blocks[0].proj_mlp.out_features
    shapes = {"double_blocks_0_img_attn_qkv": (3 * inner, inner), "double_blocks_0_txt_attn_proj": (inner, inner),
              "double_blocks_0_img_mlp_0": (pipe.transformer.transformer_blocks[0].ff.net[0].proj.out_features, inner),
              "single_blocks_0_linear2": (inner, inner + mlp)}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (out_features, in_features) in shapes.items():
        state[f"lora_unet_{name}.lora_down.weight"] = torch.randn(RANK, in_features, generator=g) / in_features**0.5
        state[f"lora_unet_{name}.lora_up.weight"] = torch.randn(out_features, RANK, generator=g) * 0.5
        state[f"lora_unet_{name}.alpha"] = torch.tensor(RANK / 2)
    return state


def load(path):
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe):
    return pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, max_sequence_length=32,
                output_type="latent", generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module")
def compiled_flux(tiny_flux_path):
    pipe = load(tiny_flux_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return diffjet.compile(pipe), latents(pipe)


@pytest.mark.slow
@pytest.mark.parametrize("make", [peft_lora, kohya_lora], ids=["diffusers-keys", "kohya-keys"])
def test_flux_lora_merged_in_place_equals_diffusers_own_loader(compiled_flux, tiny_flux_path, make):
    pipe, base = compiled_flux
    lora = make(pipe, 1)
    reference = load(tiny_flux_path)
    reference.load_lora_weights(dict(lora), adapter_name="ref")
    reference.fuse_lora(lora_scale=0.8)
    expected = latents(reference)
    diffjet.load_lora(pipe, lora, scale=0.8)
    try:
        got = latents(pipe)
    finally:
        diffjet.unload_lora(pipe)
    assert relative_error(expected, base) > 1e-2  # the LoRA does something
    assert relative_error(got, expected) < TOL
