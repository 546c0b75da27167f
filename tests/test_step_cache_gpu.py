"""Step caching on the GPU (marked `gpu`): every part compiled by Inductor and captured once per shape,
then replayed with no recompile, no new capture and no host sync beyond the pipeline's own."""

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import diffjet
from diffjet import Config, StepCache
from diffjet.models import load_pipeline

from .conftest import relative_error

pytestmark = pytest.mark.gpu
STEPS = 9


def pipeline(name="tiny-sdxl"):
    pipe = load_pipeline(name, device="cuda", dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, size=64):
    return pipe("a photo of a cat", num_inference_steps=STEPS, height=size, width=size, output_type="latent",
                generator=torch.Generator("cpu").manual_seed(0)).images.float()


def syncs(pipe, size=64) -> int:
    """Host synchronisations during one pipeline call (CUDA's sync debug mode warns at each)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            generate(pipe, size)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("settings", [StepCache(interval=3, branch=1), StepCache(interval=3, threshold=0.3)],
                         ids=["uniform", "adaptive"])
def test_compiled_parts_capture_once_per_shape_then_replay(settings):
    torch._dynamo.reset()
    reference = generate(diffjet.compile(pipeline(), Config(step_cache=settings, inductor=(), cuda_graphs=False)))
    pipe = diffjet.compile(pipeline(), Config(step_cache=settings))
    parts = [name for name in pipe.diffjet.runners if name.startswith("unet.")]
    assert sorted(parts) == sorted(f"unet.{p}" for p in pipe.diffjet.step_cache.parts)
    first = generate(pipe)
    assert relative_error(first, reference) < 2e-2  # fp16: the same schedule, Inductor's rounding
    assert "cached" in pipe.diffjet.step_cache.steps
    counters.clear()
    captures = {name: runner.stats.captures for name, runner in pipe.diffjet.runners.items()}
    for size in (64, 64, 96, 64, 96):
        generate(pipe, size)
    after_64 = {name: runner.stats.captures for name, runner in pipe.diffjet.runners.items()}
    # A new size captures each part it uses once more; nothing else recompiles or captures again.
    assert all(after_64[n] - captures[n] <= 1 for n in captures)
    graphs = counters["stats"]["unique_graphs"]
    for size in (64, 96):
        generate(pipe, size)
    assert counters["stats"]["unique_graphs"] == graphs
    assert {n: r.stats.captures for n, r in pipe.diffjet.runners.items()} == after_64
    assert all(r.stats.eager_calls == 0 for r in pipe.diffjet.runners.values())


def _warm_syncs(settings: StepCache | None) -> tuple[int, object]:
    """Host syncs of one call of a pipeline compiled with `settings`, counted after its compile and capture."""
    pipe = diffjet.compile(pipeline(), Config(step_cache=settings))
    generate(pipe)
    return syncs(pipe), pipe


@pytest.fixture(scope="module")
def lossless_syncs() -> int:
    return _warm_syncs(None)[0]


def test_uniform_step_cache_adds_no_host_sync(lossless_syncs):
    with_uniform, _ = _warm_syncs(StepCache(interval=3))
    print(f"host syncs per call: lossless {lossless_syncs}, uniform {with_uniform}")
    # The shallow steps skip diffusers' forward and may sync less than the full UNet; never more.
    assert with_uniform <= lossless_syncs


def test_adaptive_step_cache_reads_one_number_per_decided_step(lossless_syncs):
    with_adaptive, adaptive = _warm_syncs(StepCache(interval=3, threshold=0.3))
    steps = adaptive.diffjet.step_cache.steps
    print(f"host syncs per call: lossless {lossless_syncs}, adaptive {with_adaptive} ({steps})")
    forced = 2 + 1  # first_full and last_full: no reading; every other step reads one number
    assert 0 < with_adaptive - lossless_syncs <= STEPS - forced
