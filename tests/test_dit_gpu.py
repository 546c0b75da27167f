"""DiT pipelines on the GPU (marked `gpu`; skipped without CUDA): bfloat16 by default, Inductor and one CUDA
graph per shape for the transformer with the timestep and guidance as graph inputs, the fidelity rule."""

import pytest
import torch

import diffjet
from diffjet.kernels import flash4
from diffjet.models import load_pipeline
from diffjet.quality import verify

pytestmark = pytest.mark.gpu

STEPS = 3
#: Why FlashAttention-4 does not run here (None: its package installed, a Hopper GPU; the kernel pass names it).
NO_FLASH = flash4.unavailable(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
#: The kernel pass's entry in a tiny DiT's compile report: kernels, counts, and attentions FlashAttention-4 takes.
TINY_DIT_KERNELS = {"tiny-flux": ("qk_norm_rope,gelu_epilogue", "2 attention blocks, 2 gelu projections, "
                                  "1 single blocks", 2),
                    "tiny-sd3": ("gelu_epilogue", "3 gelu projections", 3)}


def dit_kernels(model: str, flash: bool = NO_FLASH is None) -> str:
    """The kernel pass's entry in the compile report of a tiny DiT with the default kernels."""
    names, counts, attentions = TINY_DIT_KERNELS[model]
    if flash:
        names, counts = f"{names},flash_attn_4", f"{counts}, {attentions} flash attentions"
    return f"kernels({names}: {counts})"


def run(pipe, **kwargs):
    return pipe("a photo of a cat", num_inference_steps=STEPS, height=64, width=64, max_sequence_length=32,
                output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
def test_dit_runs_bfloat16_and_every_step_replays_one_graph(model):
    pipe = load_pipeline(model, device="cuda", dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    diffjet.compile(pipe, diffjet.Config(cache=False))
    assert pipe.diffjet.dtype == "bfloat16 (Config.dtype='auto': a DiT pipeline)"
    assert pipe.transformer.dtype == torch.bfloat16
    assert pipe.diffjet.passes["transformer"] == ["precision(bfloat16)", "fused_qkv_sdpa", dit_kernels(model),
                                                  "inductor(default)", "cuda_graphs"]
    for guidance in (3.5, 5.0):  # Flux.1-dev's distilled guidance: a graph input, not a new graph
        run(pipe, guidance_scale=guidance)
    stats = pipe.diffjet.runners["transformer"].stats
    calls = 2 * STEPS  # one transformer call a step (SD3 batches its CFG pair into one)
    assert stats.captures == 1 and stats.eager_calls == 0 and stats.replays == calls


def _fidelity_verdict(model, steps, size, config=None):
    verdict = verify(
        lambda dtype: load_pipeline(model, device="cuda", dtype=dtype),
        device=torch.device("cuda"), prompt="an astronaut riding a horse", steps=steps,
        height=size, width=size, seed=0, compile_pipe=lambda pipe: diffjet.compile(pipe, config),
        half=torch.bfloat16,
    )
    print(verdict.table())
    return verdict


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
def test_dit_fidelity_rule_holds(model):
    assert _fidelity_verdict(model, steps=8, size=64).passed


def test_flux_attention_kernel_alone_runs_in_the_graph_and_holds_the_fidelity_rule():
    config = diffjet.Config(cache=False, kernels=("qk_norm_rope",))
    pipe = load_pipeline("tiny-flux", device="cuda", dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    diffjet.compile(pipe, config)
    assert "kernels(qk_norm_rope: 2 attention blocks)" in pipe.diffjet.passes["transformer"]
    run(pipe, guidance_scale=3.5)
    stats = pipe.diffjet.runners["transformer"].stats
    assert stats.captures == 1 and stats.eager_calls == 0
    assert _fidelity_verdict("tiny-flux", steps=8, size=64, config=config).passed


def test_the_gelu_epilogue_is_the_tanh_gelu_of_the_projection():
    """cuBLASLt's GELU epilogue (CUDA's `_addmm_activation`) computes the tanh GELU, as diffusers' layers do."""
    from diffjet.passes.kernels import linear_gelu

    g = torch.Generator("cuda").manual_seed(0)
    proj = torch.nn.Linear(256, 512, device="cuda")
    x = torch.randn(2, 300, 256, device="cuda", generator=g)
    with torch.no_grad():
        pre = proj(x)
        tanh, exact = torch.nn.functional.gelu(pre, approximate="tanh"), torch.nn.functional.gelu(pre)
        got = linear_gelu(x, proj)
        bf16 = linear_gelu(x.bfloat16(), proj.bfloat16()).float()
    assert got.shape == (2, 300, 512)
    assert (got - tanh).abs().max() < 1e-4 < (got - exact).abs().max()
    assert ((bf16 - tanh).norm() / tanh.norm()) < 1e-2


def test_dit_kernels_run_in_the_graph_and_hold_the_fidelity_rule():
    config = diffjet.Config(cache=False, kernels=("qk_norm_rope", "gelu_epilogue"))
    pipe = load_pipeline("tiny-flux", device="cuda", dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    diffjet.compile(pipe, config)
    assert dit_kernels("tiny-flux", flash=False) in pipe.diffjet.passes["transformer"]
    run(pipe, guidance_scale=3.5)
    stats = pipe.diffjet.runners["transformer"].stats
    assert stats.captures == 1 and stats.eager_calls == 0
    assert _fidelity_verdict("tiny-flux", steps=8, size=64, config=config).passed


needs_flash = pytest.mark.skipif(NO_FLASH is not None, reason=f"FlashAttention-4 does not run here: {NO_FLASH}")


@needs_flash
@pytest.mark.parametrize("shape", [(1, 4608, 24, 128), (2, 4429, 24, 64), (1, 333, 3, 40)], ids=str)
def test_flash_attn_4_matches_sdpa_on_the_processors_layout(shape):
    """The op on the transposed (batch, heads, tokens, head_dim) tensors the processors pass, against cuDNN's or
    the other SDPA backends' error from the float32 attention."""
    g = torch.Generator("cuda").manual_seed(0)
    batch, tokens, heads, dim = shape
    q, k, v = (torch.randn(batch, heads, tokens, dim, device="cuda", generator=g).bfloat16() for _ in range(3))
    reference = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float()).transpose(1, 2)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).float()
    flash = flash4.flash_attn_4(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dim ** -0.5).float()
    error, sdpa_error = ((x - reference).norm() / reference.norm() for x in (flash, sdpa))
    assert flash.shape == reference.shape and error < 1.2 * sdpa_error


@needs_flash
@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
def test_flash_attention_runs_in_the_graph_and_holds_the_fidelity_rule(model):
    config = diffjet.Config(cache=False)
    pipe = load_pipeline(model, device="cuda", dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    diffjet.compile(pipe, config)
    assert dit_kernels(model) in pipe.diffjet.passes["transformer"] and "flash_attn_4" in dit_kernels(model)
    run(pipe, guidance_scale=3.5)
    stats = pipe.diffjet.runners["transformer"].stats
    assert stats.captures == 1 and stats.eager_calls == 0
    assert _fidelity_verdict(model, steps=8, size=64, config=config).passed


@pytest.mark.slow
@pytest.mark.parametrize("model", ["flux-dev", "sd35-medium"])
def test_full_size_dit_fidelity_rule_holds(model):
    assert _fidelity_verdict(model, steps=28, size=1024).passed


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
def test_dit_step_cache_parts_capture_once_and_replay_with_guidance_and_sizes_as_inputs(model):
    from torch._dynamo.utils import counters

    from diffjet import StepCache

    pipe = load_pipeline(model, device="cuda", dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    diffjet.compile(pipe, diffjet.Config(cache=False, step_cache=StepCache(interval=2)))
    parts = sorted(name for name in pipe.diffjet.runners if name.startswith("transformer."))
    assert parts == ["transformer.head", "transformer.rest", "transformer.tail"]
    run(pipe, guidance_scale=3.5)
    assert pipe.diffjet.step_cache.steps == ["full", "cached", "full"]
    captures = {name: r.stats.captures for name, r in pipe.diffjet.runners.items()}
    graphs = counters["stats"]["unique_graphs"]
    run(pipe, guidance_scale=5.0)  # Flux.1-dev's guidance and every timestep are graph inputs
    assert {name: r.stats.captures for name, r in pipe.diffjet.runners.items()} == captures
    assert counters["stats"]["unique_graphs"] == graphs
    assert all(r.stats.eager_calls == 0 for r in pipe.diffjet.runners.values())
