"""Step caching (`Config(step_cache=...)`): the UNet cut into layers computes what diffusers computes;
the uniform schedule gives the `DeepCache` package's latents; the adaptive schedule reuses only small
changes; the parts compile without graph breaks or recompiles; a direct UNet call is never cached."""

import threading
import warnings

import pytest
import torch
from DeepCache import DeepCacheSDHelper
from diffusers import DiffusionPipeline, UNet2DConditionModel
from torch._dynamo.utils import counters

import diffjet
from diffjet import Config, StepCache
from diffjet.compiler import calls, step_cache, unet_parts
from diffjet.errors import ConfigError
from diffjet.models import build, control_image

from .conftest import relative_error

STEPS = 7
# fp32 on CPU: diffjet's fused attention and channels-last reorder sums (~1e-6 relative); caching a
# step changes the tiny models' latents by 2-6 %, so 1e-4 tells "the same schedule" from any other.
SAME = 1e-4


def load(path):
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compile_quietly(pipe, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # CPU: only the device-independent passes
        return diffjet.compile(pipe, config)


def two_layer_unet(pipe):
    """The tiny pipeline with a UNet of two layers per down block, as SD's (branch % 3 = 1 cuts inside one)."""
    config = {**pipe.unet.config, "layers_per_block": 2}
    torch.manual_seed(1)
    return UNet2DConditionModel.from_config(config).eval()


@pytest.fixture(scope="module")
def paths(tiny_path, tiny_sdxl_path, tmp_path_factory):
    controlnet = build("tiny-controlnet", tmp_path_factory.mktemp("step-cache") / "tiny-controlnet")
    return {"tiny": tiny_path, "tiny-sdxl": tiny_sdxl_path, "tiny-controlnet": controlnet}


def pipeline(paths, name):
    if name == "tiny-2-layers":
        pipe = load(paths["tiny"])
        pipe.unet = two_layer_unet(pipe)
        return pipe
    return load(paths[name])


def generate(pipe, **kwargs):
    if hasattr(pipe, "controlnet"):
        kwargs["image"] = control_image(64, 64)
    return pipe("a photo of a cat", num_inference_steps=STEPS, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def unet_inputs(unet, sdxl: bool, controlnet: bool = False):
    g = torch.Generator().manual_seed(3)
    args = (torch.randn(2, unet.config.in_channels, 8, 8, generator=g), torch.tensor(500.0),
            torch.randn(2, 7, unet.config.cross_attention_dim, generator=g))
    kwargs = {}
    if sdxl:
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g),
                                       "time_ids": torch.randn(2, 6, generator=g)}
    if controlnet:
        probe = unet_parts.prologue(unet, *args, **kwargs)
        unet_parts.run(unet, [layer for layer in unet_parts.layers(unet) if layer.kind in ("down", "downsample", "mid")], probe)
        kwargs["down_block_additional_residuals"] = tuple(torch.randn(t.shape, generator=g) for _, t in probe.stack)
        kwargs["mid_block_additional_residual"] = torch.randn(probe.h.shape, generator=g)
    return args, kwargs


# --- the UNet as layers -------------------------------------------------------------------------


@pytest.mark.parametrize("name, controlnet", [("tiny", False), ("tiny-sdxl", False), ("tiny-2-layers", False),
                                              ("tiny", True)])
def test_the_unet_run_as_layers_equals_diffusers_forward(paths, name, controlnet):
    unet = pipeline(paths, name).unet
    args, kwargs = unet_inputs(unet, sdxl=name == "tiny-sdxl", controlnet=controlnet)
    with torch.no_grad():
        expected = unet(*args, **kwargs).sample
        assert torch.equal(unet_parts.forward(unet, *args, **kwargs), expected)


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl", "tiny-2-layers"])
def test_full_part_is_the_whole_unet_at_every_branch(paths, name):
    unet = pipeline(paths, name).unet
    args, kwargs = unet_inputs(unet, sdxl=name == "tiny-sdxl")
    with torch.no_grad():
        expected = unet(*args, **kwargs).sample
        for branch in range(unet_parts.branches(unet)):
            try:
                plan = unet_parts.plan(unet, branch)
            except ConfigError:  # the tiny UNets' up blocks have two layers: branch % 3 == 2 does not exist
                continue
            noise, feature = step_cache.full(unet, plan, *args, **kwargs)
            assert torch.equal(noise, expected)
            # With its own feature, the shallow part recomputes the same output.
            shallow = step_cache.shallow(unet, plan, *args, feature=feature, **kwargs)
            assert relative_error(shallow, expected) < 1e-6


# --- the uniform schedule against the DeepCache package ------------------------------------------


@pytest.mark.parametrize(
    "name, branch, interval",
    # DeepCache's default setting on each architecture (and two layers per block) in the default run; other
    # branches and intervals under -m slow (they add about 25 s).
    [("tiny", 0, 3), ("tiny-sdxl", 0, 3), ("tiny-controlnet", 0, 3), ("tiny-2-layers", 1, 3),
     pytest.param("tiny", 1, 2, marks=pytest.mark.slow), pytest.param("tiny", 3, 3, marks=pytest.mark.slow),
     pytest.param("tiny-sdxl", 4, 4, marks=pytest.mark.slow),
     pytest.param("tiny-2-layers", 3, 2, marks=pytest.mark.slow)],
)
def test_uniform_step_cache_gives_the_deepcache_packages_latents(paths, name, branch, interval):
    reference = pipeline(paths, name)
    lossless = generate(reference)
    helper = DeepCacheSDHelper(pipe=reference)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    expected = generate(reference)
    helper.disable()
    assert relative_error(expected, lossless) > 100 * SAME  # caching changes the result: the test can tell

    pipe = pipeline(paths, name)
    if name == "tiny-2-layers":
        pipe.unet.load_state_dict(reference.unet.state_dict())
    compile_quietly(pipe, Config(step_cache=StepCache(interval=interval, branch=branch)))
    assert relative_error(generate(pipe), expected) < SAME
    cached = pipe.diffjet.step_cache
    assert cached.steps == ["full" if i % interval == 0 else "cached" for i in range(STEPS)]


def test_every_pipeline_call_starts_with_a_full_step(paths):
    pipe = compile_quietly(pipeline(paths, "tiny"), Config(step_cache=StepCache(interval=3)))
    first, second = generate(pipe), generate(pipe)
    assert torch.equal(first, second)
    assert pipe.diffjet.step_cache.steps[0] == "full"


def test_a_direct_unet_call_runs_the_whole_unet(paths):
    pipe = compile_quietly(pipeline(paths, "tiny"), Config(step_cache=StepCache(interval=3)))
    plain = pipeline(paths, "tiny").unet
    args, kwargs = unet_inputs(plain, sdxl=False)
    generate(pipe)  # leaves a feature behind: a direct call must not use it
    with torch.no_grad():
        expected = plain(*args, **kwargs).sample
        for _ in range(3):
            got = pipe.unet(*args, **kwargs)
            assert relative_error(got.sample, expected) < SAME
        assert relative_error(pipe.unet(*args, **kwargs, return_dict=False)[0], expected) < SAME


# --- the adaptive schedule ------------------------------------------------------------------------


def test_adaptive_reuses_only_steps_whose_probe_changed_less_than_the_threshold(paths, monkeypatch):
    seen = []
    measure = step_cache.relative_l1
    monkeypatch.setattr(step_cache, "relative_l1", lambda x, ref: seen.append(measure(x, ref)) or seen[-1])
    settings = StepCache(interval=4, threshold=0.3, first_full=2, last_full=1)
    pipe = compile_quietly(pipeline(paths, "tiny"), Config(step_cache=settings))
    pipe("a photo of a cat", num_inference_steps=20, output_type="latent", generator=torch.Generator().manual_seed(0))
    steps = pipe.diffjet.step_cache.steps
    assert steps[:2] == ["full", "full"] and steps[-1] == "full"
    assert 0 < steps.count("cached") < 17
    # Every step that measured a change reused the cache exactly when the change was below the threshold.
    decided = [s for i, s in enumerate(steps) if i >= 2 and i < 19 and _run_of_cached_before(steps, i) < 3]
    assert [s == "cached" for s in decided] == [change < 0.3 for change in seen]
    assert max(_run_of_cached_before(steps, i) for i in range(len(steps))) <= 3  # interval caps the reuse


def _run_of_cached_before(steps, i):
    n = 0
    while i - 1 - n >= 0 and steps[i - 1 - n] == "cached":
        n += 1
    return n


def test_adaptive_with_a_tiny_threshold_is_the_lossless_pipeline(paths):
    lossless = generate(compile_quietly(pipeline(paths, "tiny"), Config()))
    pipe = compile_quietly(pipeline(paths, "tiny"), Config(step_cache=StepCache(interval=3, threshold=1e-9)))
    assert relative_error(generate(pipe), lossless) < SAME
    assert pipe.diffjet.step_cache.steps == ["full"] * STEPS


def test_audit_compares_every_reused_step_with_the_full_unet(paths):
    pipe = compile_quietly(pipeline(paths, "tiny"), Config(step_cache=StepCache(interval=3)))
    errors = []
    pipe.diffjet.step_cache.audit = lambda step, noise, full: errors.append((step, relative_error(noise, full)))
    generate(pipe)
    assert [step for step, _ in errors] == [1, 2, 4, 5]
    assert all(0.001 < error < 1 for _, error in errors)


# --- compiled parts -------------------------------------------------------------------------------


@pytest.mark.slow  # 8 s each: Inductor compiles every part (CI's slow step runs it)
@pytest.mark.parametrize("settings", [StepCache(interval=3, branch=1), StepCache(interval=3, threshold=0.3)],
                         ids=["uniform", "adaptive"])
def test_parts_compile_whole_and_never_recompile(paths, settings):
    expected = generate(compile_quietly(pipeline(paths, "tiny-sdxl"), Config(step_cache=settings)))
    pipe = compile_quietly(pipeline(paths, "tiny-sdxl"), Config())
    torch._dynamo.reset()
    counters.clear()
    compile_part = lambda fn: torch.compile(fn, backend="aot_eager", dynamic=False, fullgraph=True)  # noqa: E731
    cached = step_cache.StepCachedUNet(pipe.unet, settings, compile=compile_part)
    pipe.unet.forward = cached
    calls.add_hook(pipe, cached)
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert relative_error(generate(pipe), expected) < SAME
        graphs = counters["stats"]["unique_graphs"]
        generate(pipe)
    assert graphs == (3 if settings.adaptive else 2)  # one graph per part a run uses (head, deep, tail), no break
    assert counters["stats"]["unique_graphs"] == graphs


# --- configuration and report ----------------------------------------------------------------------


def test_report_lists_the_step_cache_as_lossy(paths):
    pipe = compile_quietly(pipeline(paths, "tiny"), Config(step_cache=StepCache(interval=3, branch=1)))
    assert pipe.diffjet.lossy == ["step_cache(full every 3 steps, branch 1)"]
    assert "LOSSY: step_cache(full every 3 steps, branch 1)" in pipe.diffjet.summary()
    assert compile_quietly(pipeline(paths, "tiny"), Config()).diffjet.lossy == []


@pytest.mark.parametrize("bad", [dict(interval=0), dict(interval=1), dict(branch=-1), dict(interval=2.0),
                                 dict(threshold=0), dict(threshold="0.1"), dict(first_full=True)])
def test_invalid_step_cache_settings_are_refused(bad):
    with pytest.raises(ConfigError):
        StepCache(**bad)


def test_a_branch_the_unet_does_not_have_is_refused_at_compile(paths):
    with pytest.raises(ConfigError, match="branch"):
        compile_quietly(pipeline(paths, "tiny"), Config(step_cache=StepCache(branch=5)))


def test_step_cache_must_be_a_step_cache_value():
    with pytest.raises(ConfigError):
        Config(step_cache=3)


# --- calls from several threads -------------------------------------------------------------------


def test_concurrent_calls_give_what_sequential_calls_give(paths):
    pipe = compile_quietly(pipeline(paths, "tiny"), Config(step_cache=StepCache(interval=3)))
    seeds = list(range(6))

    def one(seed):
        return pipe("a photo of a cat", num_inference_steps=4, output_type="latent",
                    generator=torch.Generator().manual_seed(seed)).images

    expected = {seed: one(seed) for seed in seeds}
    got = {}
    threads = [threading.Thread(target=lambda s=s: got.__setitem__(s, one(s))) for s in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(got[seed], expected[seed]) for seed in seeds)


def test_the_pipeline_keeps_its_class_name_and_type(paths):
    pipe = pipeline(paths, "tiny")
    base = type(pipe)
    compile_quietly(pipe, Config())
    assert isinstance(pipe, base) and type(pipe).__name__ == base.__name__
    assert type(pipe) is type(compile_quietly(pipeline(paths, "tiny"), Config()))  # one subclass per class


def test_a_size_the_layers_cannot_upsample_to_runs_diffusers_forward(paths):
    # 72 px: 9 latent rows, not a multiple of the tiny UNet's upsampling factor (2); diffusers passes explicit
    # upsample sizes there, which the cached parts do not.
    pipe = compile_quietly(pipeline(paths, "tiny"), Config(step_cache=StepCache(interval=3)))
    expected = compile_quietly(pipeline(paths, "tiny"), Config())
    kwargs = dict(num_inference_steps=4, output_type="latent", height=72, width=72)
    got = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    want = expected("a photo of a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert relative_error(got, want) < SAME and pipe.diffjet.step_cache.steps == []
