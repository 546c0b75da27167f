"""ControlNet presets (exact published architectures) and compiled ControlNet pipelines on CPU: the
same output as eager with one ControlNet and with several; the conditioning image generator."""

import warnings

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, DiffusionPipeline
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

import diffjet
from diffjet.models import build, control_image, count_parameters, get_preset

from .conftest import relative_error

TOL = 1e-4

# lllyasviel/sd-controlnet-canny and diffusers/controlnet-canny-sdxl-1.0.
PUBLISHED_CONTROLNET_PARAMETERS = {"sd15-controlnet": 361_279_120, "sdxl-controlnet": 1_251_014_160}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet-presets")
    return {name: build(name, root / name) for name in ("tiny-controlnet", "tiny-sdxl-controlnet")}


def load(path):
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compile_quietly(pipe):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return diffjet.compile(pipe)


def generate(pipe, image, **kwargs):
    kwargs.setdefault("controlnet_conditioning_scale", 0.5)
    return pipe("a photo of a cat", image=image, num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def with_two_controlnets(pipe, path):
    second = ControlNetModel.from_pretrained(path, subfolder="controlnet")
    with torch.no_grad():  # a second net that differs from the first
        for parameter in second.parameters():
            parameter.mul_(-1.0)
    components = {**pipe.components, "controlnet": MultiControlNetModel([pipe.controlnet, second])}
    options = {"requires_safety_checker": False} if "requires_safety_checker" in pipe.config else {}
    multi = type(pipe)(**components, **options)
    multi.set_progress_bar_config(disable=True)
    return multi


# --- presets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONTROLNET_PARAMETERS))
def test_controlnet_presets_have_published_parameter_counts(name):
    counts = count_parameters(name)
    assert counts.pop("controlnet") == PUBLISHED_CONTROLNET_PARAMETERS[name]
    assert counts == count_parameters(name.removesuffix("-controlnet"))


@pytest.mark.parametrize("name", ["tiny-controlnet", "tiny-sdxl-controlnet"])
def test_tiny_controlnet_folder_loads_as_a_controlnet_pipeline(folders, name):
    pipe = load(folders[name])
    assert type(pipe).__name__ == get_preset(name).pipeline_class
    assert isinstance(pipe.controlnet, ControlNetModel)


# --- compiled pipelines -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-controlnet", "tiny-sdxl-controlnet"])
def test_compiled_controlnet_pipeline_matches_eager(folders, name):
    eager, compiled = load(folders[name]), compile_quietly(load(folders[name]))
    assert "fused_qkv_sdpa" in compiled.diffjet.passes["controlnet"]
    image = control_image(64, 64)
    expected = generate(eager, image)
    assert relative_error(generate(compiled, image), expected) < TOL
    assert relative_error(generate(eager, image, controlnet_conditioning_scale=0.0), expected) > 1e-2, \
        "the ControlNet must change the image"


def test_compiled_controlnet_pipeline_matches_eager_at_another_size(folders):
    eager, compiled = load(folders["tiny-controlnet"]), compile_quietly(load(folders["tiny-controlnet"]))
    image = control_image(48, 80, seed=3)
    kwargs = {"height": 48, "width": 80, "controlnet_conditioning_scale": 0.8}
    assert relative_error(generate(compiled, image, **kwargs), generate(eager, image, **kwargs)) < TOL


@pytest.mark.parametrize("name", ["tiny-controlnet", "tiny-sdxl-controlnet"])
def test_compiled_multi_controlnet_pipeline_matches_eager(folders, name):
    path = folders[name]
    eager = with_two_controlnets(load(path), path)
    compiled = compile_quietly(with_two_controlnets(load(path), path))
    assert "fused_qkv_sdpa" in compiled.diffjet.passes["controlnet"]
    images = [control_image(64, 64, seed=1), control_image(64, 64, seed=2)]
    expected = generate(eager, images, controlnet_conditioning_scale=[0.5, 0.8])
    assert relative_error(generate(compiled, images, controlnet_conditioning_scale=[0.5, 0.8]), expected) < TOL
    only_first = generate(eager, images, controlnet_conditioning_scale=[0.5, 0.0])
    assert relative_error(only_first, expected) > 1e-2, "the second ControlNet must change the image"


# --- control image ------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(64, 64), (48, 80), (512, 512)])
def test_control_image_has_the_requested_size_and_is_an_edge_map(height, width):
    image = control_image(height, width)
    assert image.size == (width, height) and image.mode == "RGB"
    pixels = np.asarray(image)
    assert set(np.unique(pixels)) <= {0, 255}
    assert 0.01 < (pixels == 255).mean() < 0.5


def test_control_image_is_deterministic_per_seed():
    first = np.asarray(control_image(64, 96, seed=7))
    assert np.array_equal(first, np.asarray(control_image(64, 96, seed=7)))
    assert not np.array_equal(first, np.asarray(control_image(64, 96, seed=8)))
