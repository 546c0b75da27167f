"""diffjet.models: offline presets with exact architectures, random weights and the real CLIP tokenizer.

Most tests build only the tiny presets; tests marked `slow` materialise a full-size model
(`-m "not slow"` leaves them out).
"""

import json
import math
import os
import pathlib
import subprocess
import sys
import types

import diffusers
import huggingface_hub
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTokenizer

import diffjet.models
import diffjet.models.building
import diffjet.models.loading
from diffjet.errors import ModelLoadError, ModelNotFoundError, OutputError
from diffjet.models import (
    PRESETS,
    Preset,
    build,
    clip_tokenizer,
    count_parameters,
    get_preset,
    load_pipeline,
    resolve,
)
from diffjet.models import manifest
from diffjet.models.architectures import ARCHITECTURES
from diffjet.models.random_weights import fill_random_weights

TINY_PRESETS = ["tiny", "tiny-sdxl"]
FULL_SIZE_PRESETS = ["sd15", "sd21", "sdxl"]

# Parameter counts of the published checkpoints (runwayml/stable-diffusion-v1-5,
# stabilityai/stable-diffusion-2-1, stabilityai/stable-diffusion-xl-base-1.0).
PUBLISHED_PARAMETERS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd21": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl": {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    },
}


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("presets")
    return {name: build(name, root / name) for name in TINY_PRESETS}


def _weight_files(folder: pathlib.Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        str(path.relative_to(folder)): load_file(path) for path in sorted(folder.glob("*/*.safetensors"))
    }


# --- presets -----------------------------------------------------------------------------------


def test_presets_are_the_known_architectures():
    assert set(PRESETS) == {"tiny", "tiny-sdxl", "sd15", "sd21", "sdxl",
                            "tiny-controlnet", "tiny-sdxl-controlnet", "sd15-controlnet", "sdxl-controlnet",
                            "tiny-flux", "tiny-sd3", "flux-dev", "flux-schnell", "sd35-medium"}
    assert all(isinstance(preset, Preset) and preset.name == name for name, preset in PRESETS.items())


@pytest.mark.parametrize(
    ("name", "pipeline_class", "resolution", "dtype"),
    [
        ("tiny", "StableDiffusionPipeline", 64, torch.float32),
        ("tiny-sdxl", "StableDiffusionXLPipeline", 64, torch.float32),
        ("sd15", "StableDiffusionPipeline", 512, torch.float16),
        ("sd21", "StableDiffusionPipeline", 768, torch.float16),
        ("sdxl", "StableDiffusionXLPipeline", 1024, torch.float16),
        ("tiny-controlnet", "StableDiffusionControlNetPipeline", 64, torch.float32),
        ("tiny-sdxl-controlnet", "StableDiffusionXLControlNetPipeline", 64, torch.float32),
        ("sd15-controlnet", "StableDiffusionControlNetPipeline", 512, torch.float16),
        ("sdxl-controlnet", "StableDiffusionXLControlNetPipeline", 1024, torch.float16),
    ],
)
def test_preset_describes_pipeline_resolution_and_dtype(name, pipeline_class, resolution, dtype):
    preset = get_preset(name)
    assert (preset.pipeline_class, preset.height, preset.width, preset.dtype) == (
        pipeline_class,
        resolution,
        resolution,
        dtype,
    )


def test_get_preset_of_unknown_name_lists_known_presets():
    with pytest.raises(ModelNotFoundError, match="sd15.*sdxl"):
        get_preset("sd99")


@pytest.mark.parametrize("name", FULL_SIZE_PRESETS)
def test_full_size_parameter_counts_equal_published_checkpoints(name):
    assert count_parameters(name) == PUBLISHED_PARAMETERS[name]


@pytest.mark.parametrize("name", [name for name in PRESETS if "unet" in ARCHITECTURES[name].models])
def test_default_resolution_is_what_the_pipeline_generates_without_arguments(name):
    # The pipeline's default size is unet.sample_size * 8 (the VAE downsampling).
    unet_config = ARCHITECTURES[name].models["unet"].config
    vae_config = ARCHITECTURES[name].models["vae"].config
    vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    assert vae_scale_factor == 8
    assert unet_config["sample_size"] * vae_scale_factor == get_preset(name).height


# --- tokenizer ---------------------------------------------------------------------------------

# Ids checked against OpenAI's own clip/simple_tokenizer.py on the same BPE file.
@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
        ("An astronaut riding a horse on Mars!", [49406, 550, 18376, 6765, 320, 4558, 525, 7496, 256, 49407]),
        (
            "It's 3.14 o'clock, don't!!",
            [49406, 585, 568, 274, 269, 272, 275, 334, 262, 6716, 267, 847, 713, 748, 49407],
        ),
        ("🤖 robots x", [49406, 46146, 13473, 343, 49407]),
    ],
)
def test_clip_tokenizer_gives_openai_token_ids(text, ids):
    assert clip_tokenizer()(text).input_ids == ids


def test_clip_tokenizer_has_clip_vocab_and_special_tokens():
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49408
    tokens = ["<|startoftext|>", "<|endoftext|>", "!", "a</w>"]
    assert tokenizer.convert_tokens_to_ids(tokens) == [49406, 49407, 0, 320]
    assert tokenizer.model_max_length == 77


@pytest.mark.parametrize(("pad_token", "pad_id"), [("<|endoftext|>", 49407), ("!", 0)])
def test_clip_tokenizer_pads_with_the_given_token(pad_token, pad_id):
    ids = clip_tokenizer(pad_token)("a cat", padding="max_length").input_ids
    assert len(ids) == 77
    assert ids[:4] == [49406, 320, 2368, 49407]
    assert set(ids[4:]) == {pad_id}


@pytest.mark.parametrize(
    ("name", "pad_tokens"),
    [
        ("tiny", {"tokenizer": "<|endoftext|>"}),
        ("tiny-sdxl", {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}),
        ("sd15", {"tokenizer": "<|endoftext|>"}),
        ("sd21", {"tokenizer": "!"}),
        ("sdxl", {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}),
    ],
)
def test_each_preset_pads_like_its_published_tokenizers(name, pad_tokens):
    assert dict(ARCHITECTURES[name].tokenizers) == pad_tokens


def test_saved_tokenizer_folder_loads_with_its_pad_token(tiny_folders):
    folder = tiny_folders["tiny-sdxl"]
    for component, pad_token in [("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")]:
        tokenizer = CLIPTokenizer.from_pretrained(folder / component)
        assert tokenizer.pad_token == pad_token
        assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
        merges = (folder / component / "merges.txt").read_text(encoding="utf-8").splitlines()
        assert merges[0] == "#version: 0.2" and len(merges) == 1 + 49152 - 256 - 2
        assert len(json.loads((folder / component / "vocab.json").read_text(encoding="utf-8"))) == 49408


# --- build -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_build_writes_a_diffusers_folder_that_from_pretrained_loads(tiny_folders, name):
    pipeline = diffusers.DiffusionPipeline.from_pretrained(tiny_folders[name])
    assert type(pipeline).__name__ == get_preset(name).pipeline_class
    for component in ARCHITECTURES[name].models:
        assert isinstance(getattr(pipeline, component), ARCHITECTURES[name].models[component].cls)


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_build_is_deterministic(tiny_folders, tmp_path, name):
    first = _weight_files(tiny_folders[name])
    second = _weight_files(build(name, tmp_path / name))
    assert first.keys() == second.keys() and first
    for file, tensors in first.items():
        assert tensors.keys() == second[file].keys()
        for key, tensor in tensors.items():
            assert torch.equal(tensor, second[file][key]), f"{file}:{key}"


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_loaded_weights_equal_the_files_written(tiny_folders, name):
    pipeline = load_pipeline(str(tiny_folders[name]))
    on_disk = load_file(tiny_folders[name] / "unet" / "diffusion_pytorch_model.safetensors")
    state = pipeline.unet.state_dict()
    assert on_disk.keys() == state.keys()
    assert all(torch.equal(on_disk[key], state[key]) for key in on_disk)


def test_pipeline_options_follow_the_published_model_index(tiny_folders):
    tiny = json.loads((tiny_folders["tiny"] / "model_index.json").read_text())
    assert tiny["requires_safety_checker"] is False
    assert tiny["safety_checker"] == [None, None] and tiny["feature_extractor"] == [None, None]
    tiny_sdxl = json.loads((tiny_folders["tiny-sdxl"] / "model_index.json").read_text())
    assert tiny_sdxl["force_zeros_for_empty_prompt"] is True
    assert tiny_sdxl["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]


def test_build_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(OutputError):
        build("tiny", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_build_fills_an_empty_folder(tmp_path):
    (tmp_path / "tiny").mkdir()
    assert (build("tiny", tmp_path / "tiny") / "model_index.json").is_file()


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def fail(model, key):
        raise RuntimeError("killed")

    monkeypatch.setattr(diffjet.models.building, "fill_random_weights", fail)
    with pytest.raises(RuntimeError, match="killed"):
        build("tiny", tmp_path / "tiny")
    assert list(tmp_path.iterdir()) == []


def test_build_progress_bar_goes_to_stderr(tmp_path, capfd):
    build("tiny", tmp_path / "quiet")
    assert capfd.readouterr().err == ""
    build("tiny", tmp_path / "loud", progress=True)
    assert "building tiny" in capfd.readouterr().err


# --- random weights ----------------------------------------------------------------------------


def test_random_weights_follow_pytorch_default_scales(tiny_folders):
    pipeline = load_pipeline(str(tiny_folders["tiny"]))
    linear = pipeline.unet.down_blocks[0].attentions[0].transformer_blocks[0].ff.net[2]
    bound = 1 / math.sqrt(linear.in_features)
    assert linear.weight.abs().max() <= bound and linear.weight.abs().max() > 0.9 * bound
    assert linear.bias.abs().max() <= bound
    norm = pipeline.unet.conv_norm_out
    assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
    embedding = pipeline.text_encoder.get_input_embeddings().weight
    assert embedding.std().item() == pytest.approx(0.02, rel=0.05)
    buffers = pipeline.text_encoder.named_buffers()
    (position_ids,) = [buffer for name, buffer in buffers if name.endswith("position_ids")]
    assert torch.equal(position_ids, torch.arange(77).unsqueeze(0))


def test_random_weights_depend_only_on_preset_component_and_tensor_name():
    spec = ARCHITECTURES["tiny"].models["text_encoder"]
    first, second, other = spec.instantiate(), spec.instantiate(), spec.instantiate()
    fill_random_weights(first, "tiny/text_encoder")
    fill_random_weights(second, "tiny/text_encoder")
    fill_random_weights(other, "tiny-sdxl/text_encoder")
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    weights, other_weights = first.state_dict(), other.state_dict()
    (fc1_0,) = [key for key in weights if key.endswith("layers.0.mlp.fc1.weight")]
    (fc1_1,) = [key for key in weights if key.endswith("layers.1.mlp.fc1.weight")]
    assert not torch.equal(weights[fc1_0], other_weights[fc1_0])
    # Two tensors of the same shape in one model get different values.
    assert not torch.equal(weights[fc1_0], weights[fc1_1])


def _unet_inputs(unet: torch.nn.Module, batch: int = 2, size: int = 64) -> tuple[tuple, dict]:
    generator = torch.Generator().manual_seed(0)
    config = unet.config
    sample = torch.randn(batch, config.in_channels, size, size, generator=generator)
    context = torch.randn(batch, 77, config.cross_attention_dim, generator=generator)
    kwargs = {}
    if config.addition_embed_type == "text_time":
        text_embeds = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_embeds, generator=generator),
            # original size, crop offset, target size of the image, in pixels
            "time_ids": torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]] * batch).float(),
        }
    return (sample, torch.tensor([999, 10][:batch]), context), kwargs


def _check_forward(pipeline: diffusers.DiffusionPipeline, size: int = 64) -> None:
    """UNet output finite and O(1) on `size`² latents; text encoders and VAE decoder finite."""
    with torch.no_grad():
        args, kwargs = _unet_inputs(pipeline.unet, size=size)
        out = pipeline.unet(*args, **kwargs).sample
        assert out.shape == args[0].shape
        assert torch.isfinite(out).all()
        assert 0.1 < out.std().item() < 10
        prompts = ["a photo of a cat"] * 2
        ids = pipeline.tokenizer(prompts, padding="max_length", return_tensors="pt").input_ids
        for encoder in (pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None)):
            if encoder is not None:
                hidden = encoder(ids, output_hidden_states=True).hidden_states[-2]
                assert torch.isfinite(hidden).all() and hidden.std() > 0
        latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
        image = pipeline.vae.decode(latents).sample
        assert image.shape == (1, 3, 128, 128)
        assert torch.isfinite(image).all() and image.std() > 0.01


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_tiny_forward_is_finite_and_not_degenerate(tiny_folders, name):
    _check_forward(load_pipeline(str(tiny_folders[name])))


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_tiny_pipeline_generates_two_steps_at_64px(tiny_folders, name):
    pipeline = load_pipeline(str(tiny_folders[name]))
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        "a photo of a cat",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all() and images.std() > 0


# --- resolve and load_pipeline -----------------------------------------------------------------


def test_resolve_builds_a_preset_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFJET_CACHE_DIR", str(tmp_path))
    path = resolve("tiny")
    assert pathlib.Path(path) == tmp_path / "models" / "tiny-v1"
    assert (tmp_path / "models" / "tiny-v1" / "model_index.json").is_file()

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt a cached preset")

    monkeypatch.setattr(diffjet.models.loading, "build", no_rebuild)
    assert resolve("tiny") == path


def test_resolve_takes_an_explicit_cache_dir(tmp_path):
    assert pathlib.Path(resolve("tiny", cache_dir=tmp_path / "c")) == tmp_path / "c" / "models" / "tiny-v1"


def test_resolve_returns_a_local_diffusers_folder(tiny_folders):
    assert resolve(str(tiny_folders["tiny"])) == str(tiny_folders["tiny"])


@pytest.mark.parametrize("kind", ["empty folder", "file", "missing relative path", "missing absolute path"])
def test_resolve_rejects_paths_that_are_not_diffusers_folders(tmp_path, kind):
    model = {
        "empty folder": str(tmp_path),
        "file": str(tmp_path / "weights.safetensors"),
        "missing relative path": "./no/such/folder",
        "missing absolute path": str(tmp_path / "nothing"),
    }[kind]
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="is not a diffusers folder"):
        resolve(model)


def test_resolve_passes_hub_ids_through():
    assert resolve("stabilityai/stable-diffusion-xl-base-1.0") == "stabilityai/stable-diffusion-xl-base-1.0"


@pytest.mark.parametrize("model", ["sd99", "stable diffusion", "a/b/c"])
def test_resolve_rejects_unknown_names_listing_presets(model):
    with pytest.raises(ModelNotFoundError, match="tiny.*sdxl"):
        resolve(model)


def _flip_bytes(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: pathlib.Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _hashes(folder: pathlib.Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != manifest.MANIFEST)
    return {str(p.relative_to(folder)): manifest._sha256(p) for p in files}


DAMAGE = {
    "flipped-vae-bytes": (lambda f: _flip_bytes(f / "vae" / "diffusion_pytorch_model.safetensors"), "SHA-256"),
    "truncated-unet": (lambda f: _truncate(f / "unet" / "diffusion_pytorch_model.safetensors"), "bytes"),
    "missing-scheduler": (lambda f: (f / "scheduler" / "scheduler_config.json").unlink(), "is missing"),
    "no-manifest": (lambda f: (f / manifest.MANIFEST).unlink(), "no manifest"),
}


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory) -> pathlib.Path:
    """A cache holding the tiny preset, built once; tests copy it (mtimes kept, so the manifest holds)."""
    cache = tmp_path_factory.mktemp("built-cache")
    resolve("tiny", cache_dir=cache)
    return cache


def _cache_copy(built_cache: pathlib.Path, tmp_path: pathlib.Path, monkeypatch) -> pathlib.Path:
    import shutil

    shutil.copytree(built_cache, tmp_path / "cache")
    monkeypatch.setenv("DIFFJET_CACHE_DIR", str(tmp_path / "cache"))
    return pathlib.Path(resolve("tiny"))


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_preset_in_the_cache_is_rebuilt_with_one_warning(built_cache, tmp_path, monkeypatch, caplog, damage):
    folder = _cache_copy(built_cache, tmp_path, monkeypatch)
    built = _hashes(folder)
    harm, reason = DAMAGE[damage]
    harm(folder)
    with caplog.at_level("WARNING", logger="diffjet"):
        assert resolve("tiny") == str(folder)
    (warning,) = [r for r in caplog.records if r.name.startswith("diffjet")]
    assert "rebuilding" in warning.getMessage() and reason in warning.getMessage() and "tiny" in warning.getMessage()
    assert _hashes(folder) == built and manifest.damage(folder) is None
    assert [p.name for p in folder.parent.iterdir()] == [folder.name], "the damaged copy is gone"


def test_an_unchanged_preset_is_not_hashed_at_load(built_cache, tmp_path, monkeypatch):
    folder = _cache_copy(built_cache, tmp_path, monkeypatch)
    hashed = []
    sha256 = manifest._sha256
    monkeypatch.setattr(manifest, "_sha256", lambda path: hashed.append(path.name) or sha256(path))
    monkeypatch.setattr(diffjet.models.loading, "build", lambda *a, **k: pytest.fail("rebuilt an intact preset"))
    resolve("tiny")
    assert hashed == []
    # Touched, not changed (a copy that kept the bytes, a backup restored): hashed once, then trusted again.
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    resolve("tiny")
    assert hashed == [weights.name]
    resolve("tiny")
    assert hashed == [weights.name]


@pytest.mark.parametrize("index", ["{}", "[]", '{"_class_name": 3}', "{not json"])
def test_a_model_index_that_names_no_pipeline_is_refused(tmp_path, index):
    (tmp_path / "model_index.json").write_text(index)
    with pytest.raises(ModelLoadError, match="model_index.json") as error:
        resolve(str(tmp_path))
    assert "\n" not in str(error.value)


def test_a_damaged_local_folder_gives_one_line(tiny_folders, tmp_path):
    import shutil

    folder = shutil.copytree(tiny_folders["tiny"], tmp_path / "tiny")
    _truncate(folder / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ModelLoadError, match="cannot load .*tiny.*damaged") as error:
        load_pipeline(str(folder))
    assert "\n" not in str(error.value)


def test_load_pipeline_of_unreachable_hub_id_says_what_works_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    expected = "could not be reached.*tiny.*local diffusers folder"
    with pytest.raises(ModelNotFoundError, match=expected) as error:
        load_pipeline("diffjet-test/no-such-model")
    assert "\n" not in str(error.value)


def test_load_pipeline_of_a_preset_uses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFJET_CACHE_DIR", str(tmp_path))
    pipeline = load_pipeline("tiny")
    assert isinstance(pipeline, diffusers.StableDiffusionPipeline)
    assert pipeline.unet.dtype == torch.float32 and pipeline.device.type == "cpu"


def test_load_pipeline_keeps_the_dtype_on_disk(tiny_folders, tmp_path):
    # diffusers alone would load the UNet in float32 and the text encoder in float16.
    load_pipeline(str(tiny_folders["tiny"]), dtype=torch.float16).save_pretrained(tmp_path / "fp16")
    pipeline = load_pipeline(str(tmp_path / "fp16"))
    assert {pipeline.unet.dtype, pipeline.vae.dtype, pipeline.text_encoder.dtype} == {torch.float16}


# --- full size (slow) --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15"])
def test_full_size_forward_is_finite_and_not_degenerate(name):
    components = {}
    for component, spec in ARCHITECTURES[name].models.items():
        with torch.device("meta"):
            model = spec.instantiate()
        model.to_empty(device="cpu")
        fill_random_weights(model, f"{name}/{component}")
        components[component] = model.eval()
    # 32² latents: every block of the full-size UNet runs (down to 4² at its lowest level), in about a third of the
    # time 64² takes on a CPU (99 s of a CI run).
    _check_forward(types.SimpleNamespace(**components, tokenizer=clip_tokenizer()), size=32)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak RSS from Linux /proc")
def test_building_sd15_needs_at_most_twice_its_fp16_size_in_memory(tmp_path):
    fp16_bytes = 2 * sum(count_parameters("sd15").values())
    src = pathlib.Path(diffjet.models.__file__).parents[2]
    # VmHWM, not ru_maxrss: Linux carries the forking parent's peak (pytest's, possibly large after
    # other tests) into the child's ru_maxrss across exec; VmHWM belongs to the new process image.
    script = (
        "import json, sys, time\n"
        "from diffjet.models import build\n"
        "start = time.perf_counter()\n"
        "build('sd15', sys.argv[1])\n"
        "status = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
        "print(json.dumps({'seconds': time.perf_counter() - start,\n"
        "                  'peak_rss': int(status['VmHWM'].split()[0]) * 1024}))\n"
    )
    pythonpath = os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "sd15")],
        env={**os.environ, "PYTHONPATH": pythonpath},
        capture_output=True,
        text=True,
        check=True,
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"sd15 build: {measured['seconds']:.1f} s, peak RSS {measured['peak_rss'] / 2**30:.2f} GiB")
    assert measured["peak_rss"] < 2 * fp16_bytes + 1.5 * 2**30
    assert (tmp_path / "sd15" / "model_index.json").is_file()
