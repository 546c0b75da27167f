"""`diffjet.compile` on CPU: the same pipeline object, every call argument still working, output equal
to eager (fp32, tight tolerance: on CPU only device-independent passes run)."""

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
)

import diffjet
from diffjet import Config
from diffjet.errors import ConfigError

from .conftest import relative_error

TOL = 1e-4


def load(path):
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipes(tiny_path):
    eager = load(tiny_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        compiled = diffjet.compile(load(tiny_path))
    return eager, compiled


def generate(pipe, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("output_type", "np")
    return pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), **kwargs)


def test_compile_returns_the_same_pipeline_object(tiny_path):
    pipe = load(tiny_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert diffjet.compile(pipe) is pipe
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert isinstance(pipe.diffjet, diffjet.CompileReport)


def test_report_says_what_was_done_and_what_is_off(pipes):
    _, compiled = pipes
    report = compiled.diffjet
    assert report.device == "cpu"
    assert set(report.passes) == {"unet", "vae", "text_encoder"}
    assert "fused_qkv_sdpa" in report.passes["unet"] and "channels_last" in report.passes["unet"]
    assert any("CUDA graphs" in item for item in report.off)
    assert "unet" in report.summary()


def test_left_alone_components_are_named(tiny_path):
    pipe = load(tiny_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        diffjet.compile(pipe, Config(components=("unet",)))
    assert pipe.diffjet.left_alone == {"vae": "excluded by Config.components",
                                       "text_encoder": "excluded by Config.components"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"negative_prompt": "blurry"},
        {"num_images_per_prompt": 2},
        {"guidance_scale": 1.0},
        {"num_inference_steps": 3, "guidance_scale": 3.0},
        {"height": 48, "width": 80},
    ],
    ids=["default", "negative-prompt", "two-images", "no-guidance", "three-steps", "other-size"],
)
def test_call_arguments_match_eager(pipes, kwargs):
    eager, compiled = pipes
    expected = generate(eager, **kwargs).images
    got = generate(compiled, **kwargs).images
    assert got.shape == expected.shape
    assert relative_error(got, expected) < TOL


@pytest.mark.parametrize("output_type", ["latent", "pt", "np", "pil"])
def test_output_types_match_eager(pipes, output_type):
    eager, compiled = pipes
    expected = generate(eager, output_type=output_type).images
    got = generate(compiled, output_type=output_type).images
    if output_type == "pil":
        expected, got = np.asarray(expected[0], dtype=np.float64), np.asarray(got[0], dtype=np.float64)
        assert np.abs(got - expected).max() <= 1
    else:
        assert relative_error(got, expected) < TOL


def test_callbacks_see_every_step(pipes):
    _, compiled = pipes
    seen = []

    def on_step_end(pipe, i, t, kwargs):
        seen.append((i, kwargs["latents"].shape))
        return kwargs

    generate(compiled, num_inference_steps=3, callback_on_step_end=on_step_end,
             callback_on_step_end_tensor_inputs=["latents"])
    assert [i for i, _ in seen] == [0, 1, 2]


def test_scheduler_swapped_after_compile(tiny_path, pipes):
    eager = load(tiny_path)
    _, compiled = pipes
    original = compiled.scheduler
    try:
        for pipe in (eager, compiled):
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        assert relative_error(generate(compiled).images, generate(eager).images) < TOL
    finally:
        compiled.scheduler = original


def test_compile_twice_changes_nothing(tiny_path, pipes):
    eager, _ = pipes
    pipe = load(tiny_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        diffjet.compile(pipe)
        forward = pipe.unet.forward
        processors = {k: id(v) for k, v in pipe.unet.attn_processors.items()}
        diffjet.compile(pipe)
    assert pipe.unet.forward == forward
    assert {k: id(v) for k, v in pipe.unet.attn_processors.items()} == processors
    assert relative_error(generate(pipe).images, generate(eager).images) < TOL


@pytest.mark.parametrize("pipeline_class", [StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline])
def test_img2img_and_inpaint_siblings_match_eager(tiny_path, pipeline_class):
    eager = pipeline_class(**load(tiny_path).components)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        compiled = diffjet.compile(pipeline_class(**load(tiny_path).components))
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 64, 64, generator=g)
    extra = {"mask_image": (torch.rand(1, 1, 64, 64, generator=g) > 0.5).float()} \
        if pipeline_class is StableDiffusionInpaintPipeline else {}
    outs = [generate(p, image=image, strength=0.7, num_inference_steps=3, **extra).images for p in (eager, compiled)]
    assert relative_error(outs[1], outs[0]) < TOL


def test_sdxl_and_its_img2img_match_eager(tiny_sdxl_path):
    eager = load(tiny_sdxl_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        compiled = diffjet.compile(load(tiny_sdxl_path))
    assert relative_error(generate(compiled).images, generate(eager).images) < TOL
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    i2i = [StableDiffusionXLImg2ImgPipeline(**p.components) for p in (eager, compiled)]
    for p in i2i:
        p.set_progress_bar_config(disable=True)
    outs = [generate(p, image=image, strength=0.6, num_inference_steps=3).images for p in i2i]
    assert relative_error(outs[1], outs[0]) < TOL


def test_cpu_warning_is_given_once(tiny_path, monkeypatch):
    import diffjet.compiler as compiler

    monkeypatch.setattr(compiler, "_warned_cpu", False)
    with pytest.warns(RuntimeWarning, match="device-independent"):
        diffjet.compile(load(tiny_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        diffjet.compile(load(tiny_path))


def test_config_is_frozen():
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.dtype = "bfloat16"
    assert config.dtype == "auto"  # float16 for UNet pipelines, bfloat16 for DiTs (test_dit.py)


BAD_CONFIGS = [
    ("dtype", "float8"),
    ("attention", "magic"),
    ("components", ("unet", "refiner")),
    ("components", "unet"),
    ("inductor", ("refiner",)),
    ("max_graphs", 0),
    ("compile_mode", "fast"),
    ("backend", "nonsense"),
    ("graph_memory_gib", 0),
    ("graph_memory_gib", -1.0),
    ("graph_memory_gib", "2"),
    ("graph_memory_gib", True),
]


@pytest.mark.parametrize("field, value", BAD_CONFIGS, ids=[f"{f}={v!r}" for f, v in BAD_CONFIGS])
def test_config_refuses_a_bad_value_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"^{field}") as error:
        Config(**{field: value})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("backend", ["inductor", "eager", "aot_eager"])
def test_config_takes_the_backends_diffjet_uses(backend):
    assert Config(backend=backend).backend == backend


def test_named_presets():
    assert Config.lossless() == Config()
    assert Config.fast_startup() == Config(inductor=())
    assert Config.max_autotune() == Config(compile_mode="max-autotune-no-cudagraphs")


def test_config_takes_lists_as_tuples_and_a_memory_cap_in_gib():
    assert Config(components=["unet"]).components == ("unet",)
    assert Config(kernels=["geglu"]).kernels == ("geglu",)
    assert Config(graph_memory_gib=1.5).graph_memory_gib == 1.5


@pytest.mark.parametrize(
    "held, max_graphs, max_bytes, victims",
    [
        ([("a", 10), ("b", 10), ("c", 10)], 16, None, []),
        ([("a", 10), ("b", 10), ("c", 10)], 2, None, ["a"]),
        ([("a", 10), ("b", 10), ("c", 10)], 16, 25, ["a"]),
        ([("a", 30), ("b", 1), ("c", 1)], 16, 25, ["a"]),
        ([("a", 1), ("b", 30), ("c", 1)], 16, 25, ["a", "b"]),
        ([("a", 10), ("b", 10), ("c", 40)], 16, 25, ["a", "b"]),  # the newest stays even when over the cap
        ([("a", 40)], 16, 25, []),
        ([("a", 5), ("b", 5), ("c", 5), ("d", 5)], 3, 12, ["a", "b"]),
    ],
)
def test_lru_eviction_under_the_count_and_memory_caps(held, max_graphs, max_bytes, victims):
    from diffjet.runtime.cuda_graph import lru_victims

    assert lru_victims(held, max_graphs, max_bytes) == victims


def test_inputs_that_differ_only_in_layout_share_a_graph_key_but_other_layouts_do_not():
    from diffjet.runtime.cuda_graph import _leaf_key

    timesteps = torch.tensor(999.0).expand(2)  # as SD 3's pipeline passes them: stride 0
    assert timesteps.stride() == (0,)
    assert _leaf_key(timesteps) == _leaf_key(torch.full((2,), 999.0))
    text = torch.randn(1, 77, 32).expand(2, 77, 32)
    assert _leaf_key(text) == _leaf_key(text.contiguous())
    # Dense layouts are kept by the runner's copy, so a graph compiled for one is not used for the other.
    x = torch.randn(2, 4, 8, 8)
    assert _leaf_key(x) != _leaf_key(x.to(memory_format=torch.channels_last))
    assert _leaf_key(x[0, 0]) != _leaf_key(x[0, 0].t())
    assert _leaf_key(x) != _leaf_key(x.half())


def test_compile_rejects_what_is_not_a_pipeline_or_config(pipes):
    _, compiled = pipes
    with pytest.raises(ConfigError):
        diffjet.compile(object())
    with pytest.raises(ConfigError):
        diffjet.compile(compiled, {"dtype": "float16"})


def test_unknown_modules_are_left_alone_and_named(tiny_path, caplog):
    import logging

    from torch import nn

    pipe = load(tiny_path)
    pipe.register_modules(safety_checker=nn.Linear(2, 2))  # any module diffjet does not know
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="diffjet"):
        warnings.simplefilter("ignore", RuntimeWarning)
        diffjet.compile(pipe)
    assert "safety_checker" in pipe.diffjet.left_alone
    assert "safety_checker (Linear)" in caplog.text
