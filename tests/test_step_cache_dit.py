"""First-block caching for DiTs (Flux.1, SD 3.x) on CPU: the parts equal diffusers' forward, a cached step
equals a reference built on diffusers' own forward (its later blocks removed, the stored residual added
before the output norm), and the schedules run the steps they promise."""

import warnings

import pytest
import torch
from diffusers import DiffusionPipeline

import diffjet
from diffjet import Config, StepCache
from diffjet.compiler import calls, dit_parts
from diffjet.compiler.step_cache import StepCachedTransformer
from diffjet.errors import ConfigError
from diffjet.quality import audit_reused_steps

from .conftest import relative_error

STEPS = 6


@pytest.fixture(scope="module", params=["tiny-flux", "tiny-sd3"])
def pipe(request, tiny_flux_path, tiny_sd3_path):
    pipe = DiffusionPipeline.from_pretrained({"tiny-flux": tiny_flux_path, "tiny-sd3": tiny_sd3_path}[request.param])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe, steps=STEPS, **kwargs):
    return pipe("a red fox in the snow", num_inference_steps=steps, height=64, width=64, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.fixture
def cached(pipe):
    """Installs a step cache with the settings given on the pipeline's transformer, for the test."""
    transformer = pipe.transformer
    installed = []

    def install(settings: StepCache) -> StepCachedTransformer:
        step_cached = StepCachedTransformer(transformer, settings)
        transformer.forward = step_cached
        calls.serialize(pipe)
        calls.add_hook(pipe, step_cached)
        installed.append(step_cached)
        return step_cached

    yield install
    transformer.__dict__.pop("forward", None)
    for step_cached in installed:
        pipe.__dict__[calls.HOOKS].remove(step_cached)


def test_outside_a_pipeline_call_every_block_runs_and_equals_diffusers_forward(pipe, cached):
    seen = {}
    plain = pipe.transformer.forward

    def record(*args, **kwargs):
        seen.setdefault("call", (args, kwargs))
        return plain(*args, **kwargs)

    pipe.transformer.forward = record
    latents(pipe, steps=1)
    del pipe.transformer.forward
    args, kwargs = seen["call"]
    step_cached = cached(StepCache(interval=2))
    with torch.no_grad():
        assert torch.equal(step_cached(*args, **kwargs)[0], plain(*args, **kwargs)[0])
    assert step_cached.steps == []


def test_a_tiny_threshold_runs_every_step_in_full_and_is_lossless(pipe, cached):
    lossless = latents(pipe)
    step_cached = cached(StepCache(interval=3, threshold=1e-9))
    assert torch.equal(latents(pipe), lossless)
    assert step_cached.steps == ["full"] * STEPS


def test_the_adaptive_schedule_keeps_its_bounds(pipe, cached):
    # A loose threshold reuses whenever allowed: the first two and the last step are full, and at most
    # interval − 1 = 2 steps in a row reuse.
    step_cached = cached(StepCache(interval=3, threshold=9.0, first_full=2, last_full=1))
    latents(pipe, steps=8)
    assert step_cached.steps == ["full", "full", "cached", "cached", "full", "cached", "cached", "full"]


def test_cached_steps_equal_diffusers_forward_with_the_later_blocks_replaced_by_the_stored_residual(pipe, cached):
    reference = _reference_latents(pipe, interval=2)
    step_cached = cached(StepCache(interval=2))
    mine = latents(pipe)
    assert step_cached.steps == ["full", "cached"] * (STEPS // 2)
    lossless = latents_without_cache(pipe, step_cached)
    assert relative_error(mine, lossless) > 1e-4, "the cached steps must change the result"
    assert relative_error(mine, reference) < 1e-7  # the same operations in the same order: 0.0 on CPU


def latents_without_cache(pipe, step_cached):
    step_cached.end()
    forward = pipe.transformer.__dict__.pop("forward")
    try:
        return latents(pipe)
    finally:
        pipe.transformer.forward = forward


def _reference_latents(pipe, interval: int, **call) -> torch.Tensor:
    """First-block caching written on diffusers' forward: a full step keeps the change of the image tokens
    between the first block's output and the output norm's input; a cached step runs the forward with only
    the first block and adds that change before the output norm. Each prompt (Flux's true CFG calls the
    transformer with the negative prompt too) has its own steps and residual."""
    t = pipe.transformer
    blocks, singles = t.transformer_blocks, getattr(t, "single_transformer_blocks", None)
    plain = t.forward
    branches = {}

    def forward(*args, **kwargs):
        state = branches.setdefault(kwargs["encoder_hidden_states"].data_ptr(), {"step": 0, "residual": None})
        full = state["step"] % interval == 0
        state["step"] += 1
        seen = {}
        hooks = []
        if full:
            hooks.append(blocks[0].register_forward_hook(lambda m, a, out: seen.__setitem__("first", out[1])))
            hooks.append(t.norm_out.register_forward_pre_hook(lambda m, a: seen.__setitem__("last", a[0])))
        else:
            t.transformer_blocks = torch.nn.ModuleList(blocks[:1])
            if singles is not None:
                t.single_transformer_blocks = torch.nn.ModuleList()
            hooks.append(t.norm_out.register_forward_pre_hook(lambda m, a: (a[0] + state["residual"], *a[1:])))
        try:
            out = plain(*args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
            t.transformer_blocks = blocks
            if singles is not None:
                t.single_transformer_blocks = singles
        if full:
            state["residual"] = seen["last"] - seen["first"]
        return out

    t.forward = forward
    try:
        return latents(pipe, **call)
    finally:
        del t.forward


def test_flux_true_cfg_keeps_a_residual_per_prompt(tiny_flux_path):
    # With a negative prompt and true_cfg_scale > 1, FluxPipeline calls the transformer twice a step: the
    # negative prompt's call must not reuse the prompt's residual.
    pipe = DiffusionPipeline.from_pretrained(tiny_flux_path)
    pipe.set_progress_bar_config(disable=True)
    true_cfg = {"negative_prompt": "blurry", "true_cfg_scale": 2.0}
    reference = _reference_latents(pipe, interval=2, **true_cfg)
    step_cached = StepCachedTransformer(pipe.transformer, StepCache(interval=2))
    pipe.transformer.forward = step_cached
    calls.serialize(pipe)
    calls.add_hook(pipe, step_cached)
    mine = latents(pipe, **true_cfg)
    assert step_cached.steps == ["full", "full", "cached", "cached"] * (STEPS // 2)
    assert relative_error(mine, reference) < 1e-7


def test_every_reused_step_is_audited_against_the_full_transformer(pipe, cached):
    step_cached = cached(StepCache(interval=3))
    pipe.diffjet = type("Report", (), {"step_cache": step_cached})()
    try:
        reused = audit_reused_steps(pipe)
        latents(pipe)
    finally:
        del pipe.diffjet
    assert [step for step, _ in reused] == [i for i, s in enumerate(step_cached.steps) if s == "cached"] == [1, 2, 4, 5]
    assert all(0 < error < 1 for _, error in reused)


def test_compile_puts_the_step_cache_on_a_dit_and_reports_it_lossy(tiny_flux_path):
    pipe = DiffusionPipeline.from_pretrained(tiny_flux_path)
    pipe.set_progress_bar_config(disable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        diffjet.compile(pipe, Config(step_cache=StepCache()))
    report = pipe.diffjet
    assert isinstance(pipe.transformer.forward, StepCachedTransformer) and report.step_cache is pipe.transformer.forward
    assert report.lossy[0] == StepCache().describe() and StepCache().describe() in report.passes["transformer"]
    assert not any("step cache" in off for off in report.off)
    latents(pipe)
    assert report.step_cache.steps == ["full", "cached", "cached"] * (STEPS // 3)


def test_a_branch_that_leaves_no_block_to_skip_is_refused(tiny_sd3_path):
    transformer = DiffusionPipeline.from_pretrained(tiny_sd3_path).transformer
    double = len(transformer.transformer_blocks)
    with pytest.raises(ConfigError, match=rf"branch must be in 0\.\.{double - 2} .* got {double - 1}"):
        StepCachedTransformer(transformer, StepCache(branch=double - 1))


def test_controlnet_and_ip_adapter_inputs_are_left_to_diffusers_forward():
    assert dit_parts.covers({"joint_attention_kwargs": None})
    assert dit_parts.covers({"joint_attention_kwargs": {"scale": 1.0}})
    assert not dit_parts.covers({"controlnet_block_samples": [torch.zeros(1)]})
    assert not dit_parts.covers({"block_controlnet_hidden_states": [torch.zeros(1)]})
    assert not dit_parts.covers({"joint_attention_kwargs": {"ip_adapter_image_embeds": [torch.zeros(1)]}})

