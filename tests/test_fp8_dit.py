"""fp8 GEMMs on DiT transformers (Flux.1, SD 3.x) on CPU, a CPU standing in for an fp8 GPU: every GEMM that
runs goes fp8, the projections the fused attention replaced do not, the output is off by fp8 rounding, and a
LoRA merge reaches the fused projections' fp8 copies."""

import warnings

import pytest
import torch
from diffusers import DiffusionPipeline

import diffjet
from diffjet import Config
from diffjet.passes import fp8

from .conftest import relative_error
from .test_lora_flux import peft_lora

REPLACED = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def load(path):
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compiled(path, monkeypatch, config):
    monkeypatch.setattr(fp8, "unsupported", lambda device: None)
    pipe = load(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return diffjet.compile(pipe, config)


def latents(pipe):
    return pipe("a red fox in the snow", num_inference_steps=2, height=64, width=64, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
def test_every_transformer_gemm_that_runs_goes_fp8_and_the_replaced_projections_do_not(model, tiny_flux_path,
                                                                                      tiny_sd3_path, monkeypatch):
    path = {"tiny-flux": tiny_flux_path, "tiny-sd3": tiny_sd3_path}[model]
    lossless = latents(load(path))
    pipe = compiled(path, monkeypatch, Config(fp8=True))
    report = pipe.diffjet
    assert report.lossy == ["fp8"] and fp8.describe(pipe.transformer) in report.passes["transformer"]
    assert not any("fp8" in off for off in report.off)
    replaced = [m for name, m in pipe.transformer.named_modules() if name.rsplit(".", 1)[-1] in REPLACED]
    fused = [m for name, m in pipe.transformer.named_modules() if name.rsplit(".", 1)[-1] in ("to_qkv", "to_added_qkv")]
    assert replaced and fused
    assert not any(isinstance(m, fp8.Fp8Linear) for m in replaced)
    assert all(isinstance(m, fp8.Fp8Linear) for m in fused)
    linears = [m for m in pipe.transformer.modules() if isinstance(m, torch.nn.Linear)]
    assert fp8.placements(pipe.transformer)["left_fp16"] == sum(
        not isinstance(m, fp8.Fp8Linear) for m in linears) - len(replaced)
    error = relative_error(latents(pipe), lossless)
    assert 1e-4 < error < 0.2, "fp8 rounding changes the result, by a few percent at most"


def test_a_lora_on_an_fp8_flux_requantizes_the_fused_projection_and_unloads_bit_for_bit(tiny_flux_path, monkeypatch):
    pipe = compiled(tiny_flux_path, monkeypatch, Config(fp8=True))
    qkv = pipe.transformer.transformer_blocks[0].attn.to_qkv
    before = (qkv.weight_fp8.clone(), qkv.weight_scale.clone())
    base = latents(pipe)
    diffjet.load_lora(pipe, peft_lora(pipe, 0), adapter_name="a")
    assert not torch.equal(qkv.weight_fp8, before[0])
    q, scale = fp8.quantize_rows(qkv.weight.detach())
    assert torch.equal(qkv.weight_fp8, q) and torch.equal(qkv.weight_scale, scale.view(1, -1))
    assert relative_error(latents(pipe), base) > 1e-3
    diffjet.unload_lora(pipe)
    assert torch.equal(qkv.weight_fp8, before[0]) and torch.equal(qkv.weight_scale, before[1])
    assert torch.equal(latents(pipe), base)
