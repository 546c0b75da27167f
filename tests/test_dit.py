"""DiT pipelines (Flux.1, SD 3.5): presets with the published architectures, and `diffjet.compile` on CPU,
where the device-independent passes run (the transformer's fused joint QKV attention): same pipeline object,
every call argument still working, output equal to eager."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline

import diffjet
from diffjet import Config
from diffjet.compiler import _cache_parts
from diffjet.models import PRESETS, count_parameters
from diffjet.models.architectures import ARCHITECTURES
from diffjet.models.tokenizer import t5_tokenizer
from diffjet.passes import attention
from diffjet.runtime.compile_cache import entry_key

from .conftest import relative_error

TOL = 1e-4
DIT_TINY = ["tiny-flux", "tiny-sd3"]
DIT_FULL = ["flux-dev", "flux-schnell", "sd35-medium"]

# Parameter counts of the published checkpoints: black-forest-labs/FLUX.1-dev (transformer 11.9B) and -schnell
# (no guidance embedder), stabilityai/stable-diffusion-3.5-medium; T5-XXL's encoder is google/t5-v1_1-xxl's.
T5_XXL = 4_762_310_656
PUBLISHED_PARAMETERS = {
    "flux-dev": {"transformer": 11_901_408_320, "vae": 83_819_683, "text_encoder": 123_060_480,
                 "text_encoder_2": T5_XXL},
    "flux-schnell": {"transformer": 11_891_178_560, "vae": 83_819_683, "text_encoder": 123_060_480,
                     "text_encoder_2": T5_XXL},
    "sd35-medium": {"transformer": 2_243_171_520, "vae": 83_819_683, "text_encoder": 123_650_304,
                    "text_encoder_2": 694_659_840, "text_encoder_3": T5_XXL},
}


@pytest.mark.parametrize("name", DIT_FULL)
def test_full_size_dit_parameter_counts_equal_published_checkpoints(name):
    assert count_parameters(name) == PUBLISHED_PARAMETERS[name]


def test_sd35_medium_with_its_stored_position_table_is_the_published_two_and_a_half_billion():
    # Stability's "2.5B" counts the 384² × 1536 sin-cos table that the checkpoint stores as a buffer.
    with torch.device("meta"):
        transformer = ARCHITECTURES["sd35-medium"].models["transformer"].instantiate()
    stored = sum(t.numel() for t in transformer.state_dict().values())
    assert stored == 2_243_171_520 + 384 * 384 * 1536 == 2_469_663_936


@pytest.mark.parametrize(("name", "pipeline_class", "dtype"), [
    ("flux-dev", "FluxPipeline", torch.bfloat16), ("flux-schnell", "FluxPipeline", torch.bfloat16),
    ("sd35-medium", "StableDiffusion3Pipeline", torch.bfloat16),
    ("tiny-flux", "FluxPipeline", torch.float32), ("tiny-sd3", "StableDiffusion3Pipeline", torch.float32)])
def test_dit_presets_name_their_pipeline_and_are_stored_as_published(name, pipeline_class, dtype):
    preset = PRESETS[name]
    assert (preset.pipeline_class, preset.dtype) == (pipeline_class, dtype)


def test_flux_schnell_differs_from_dev_only_where_published():
    dev, schnell = ARCHITECTURES["flux-dev"], ARCHITECTURES["flux-schnell"]
    assert dev.models["transformer"].config["guidance_embeds"] and not schnell.models["transformer"].config["guidance_embeds"]
    assert (dev.scheduler_config["use_dynamic_shifting"], schnell.scheduler_config["use_dynamic_shifting"]) == (True, False)


def test_t5_tokenizer_gives_ids_within_t5s_vocabulary_with_t5s_special_ids():
    tokenizer = t5_tokenizer(512)
    ids = tokenizer("An astronaut riding a horse on Mars!", padding="max_length", max_length=24).input_ids
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert len(tokenizer) == 32100 <= ARCHITECTURES["flux-dev"].models["text_encoder_2"].config["vocab_size"]
    n = ids.index(1)
    assert 5 <= n <= 12 and all(2 < i < 32000 for i in ids[:n]) and set(ids[n + 1:]) == {0}


def test_t5_embeddings_are_one_tied_tensor_as_published(compiled_pipe):
    pipe, _ = compiled_pipe
    t5 = pipe.text_encoder_2 if isinstance(pipe, FluxPipeline) else pipe.text_encoder_3
    assert torch.equal(t5.shared.weight, t5.encoder.embed_tokens.weight)


# --- compile on CPU -------------------------------------------------------------------------------------

def load(path):
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compiled(path, config=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return diffjet.compile(load(path), config)


@pytest.fixture(scope="module", params=DIT_TINY)
def compiled_pipe(request, tiny_flux_path, tiny_sd3_path):
    """A tiny DiT pipeline compiled in place, and the latents it gave before (eager)."""
    pipe = load({"tiny-flux": tiny_flux_path, "tiny-sd3": tiny_sd3_path}[request.param])
    eager_latents = generate(pipe, output_type="latent").images
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return diffjet.compile(pipe), eager_latents


@pytest.fixture(scope="module", params=DIT_TINY)
def pipes(request, tiny_flux_path, tiny_sd3_path):
    path = {"tiny-flux": tiny_flux_path, "tiny-sd3": tiny_sd3_path}[request.param]
    return load(path), compiled(path)


def generate(pipe, **kwargs):
    kwargs = {"num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np",
              "max_sequence_length": 32, **kwargs}
    return pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), **kwargs)


def test_compile_keeps_the_pipeline_and_fuses_the_transformers_attention(compiled_pipe):
    pipe, _ = compiled_pipe
    assert isinstance(pipe, (FluxPipeline, StableDiffusion3Pipeline))
    report = pipe.diffjet
    assert report.passes["transformer"] == ["fused_qkv_sdpa"]  # on CPU; no channels-last for token sequences
    assert "text_encoder_2" in report.passes and report.left_alone == {}
    joint = [m for m in pipe.transformer.modules() if hasattr(m, "to_qkv")]
    assert joint and all(m.fused_projections for m in joint)
    assert all(type(m.processor).__name__ in ("FluxAttnProcessor", "FusedJointQKVAttnProcessor") for m in joint)


def test_fused_projections_are_views_of_one_weight(compiled_pipe):
    pipe, _ = compiled_pipe
    attn = pipe.transformer.transformer_blocks[0].attn
    for fused, parts in ((attn.to_qkv, (attn.to_q, attn.to_k, attn.to_v)),
                         (attn.to_added_qkv, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))):
        start = fused.weight.data_ptr()
        rows = fused.weight.shape[1] * fused.weight.element_size()
        assert [p.weight.data_ptr() for p in parts] == [start + i * parts[0].weight.shape[0] * rows for i in range(3)]


def test_compiled_dit_gives_eagers_latents(compiled_pipe):
    pipe, eager_latents = compiled_pipe
    latents = generate(pipe, output_type="latent").images
    assert latents.shape == eager_latents.shape
    assert relative_error(latents, eager_latents) < TOL


def test_dit_callbacks_see_every_step(compiled_pipe):
    pipe, _ = compiled_pipe
    seen = []

    def on_step_end(p, i, t, kwargs):
        seen.append((i, kwargs["latents"].shape))
        return kwargs

    generate(pipe, num_inference_steps=3, output_type="latent", callback_on_step_end=on_step_end,
             callback_on_step_end_tensor_inputs=["latents"])
    assert [i for i, _ in seen] == [0, 1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [
    {},
    {"num_images_per_prompt": 2},
    {"height": 48, "width": 80},
    {"num_inference_steps": 3, "guidance_scale": 2.0},
    {"output_type": "pt"},
], ids=["default", "two-images", "other-size", "three-steps-guidance", "pt"])
def test_compiled_dit_matches_eager(pipes, kwargs):
    eager, pipe = pipes
    expected, got = generate(eager, **kwargs).images, generate(pipe, **kwargs).images
    assert got.shape == expected.shape
    assert relative_error(got, expected) < TOL


@pytest.mark.slow
def test_dit_pil_output_matches_eager(pipes):
    eager, pipe = pipes
    expected, got = generate(eager, output_type="pil").images, generate(pipe, output_type="pil").images
    assert np.abs(np.asarray(got[0], dtype=np.float64) - np.asarray(expected[0], dtype=np.float64)).max() <= 1


@pytest.mark.slow
def test_compile_twice_changes_nothing(tiny_sd3_path):
    pipe = compiled(tiny_sd3_path)
    weights = {name: p.data_ptr() for name, p in pipe.transformer.named_parameters()}
    processors = {k: id(v) for k, v in pipe.transformer.attn_processors.items()}
    compiled_again = diffjet.compile(pipe)
    assert {name: p.data_ptr() for name, p in compiled_again.transformer.named_parameters()} == weights
    assert {k: id(v) for k, v in pipe.transformer.attn_processors.items()} == processors


@pytest.mark.parametrize("compiled_pipe", ["tiny-flux"], indirect=True)
def test_flux_lora_changes_the_compiled_output_and_unloads_bit_for_bit(compiled_pipe):
    from .test_lora_flux import peft_lora

    pipe, eager_latents = compiled_pipe
    weights = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    diffjet.load_lora(pipe, peft_lora(pipe, 0), adapter_name="a")
    try:
        assert relative_error(generate(pipe, output_type="latent").images, eager_latents) > 1e-2
    finally:
        diffjet.unload_lora(pipe)
    assert all(torch.equal(p, weights[n]) for n, p in pipe.transformer.named_parameters())
    assert relative_error(generate(pipe, output_type="latent").images, eager_latents) < TOL


@pytest.mark.parametrize("compiled_pipe", ["tiny-flux"], indirect=True)
def test_random_flux_lora_adapts_every_block_linear_but_the_fused_projections(compiled_pipe):
    from diffjet.models import lora_layers, random_lora

    pipe, _ = compiled_pipe
    paths = lora_layers(pipe)["transformer"]
    assert "transformer_blocks.0.attn.add_q_proj" in paths and "single_transformer_blocks.0.proj_mlp" in paths
    assert not any(p.endswith(("to_qkv", "to_added_qkv")) for p in paths)
    diffjet.load_lora(pipe, random_lora(pipe, rank=2))
    diffjet.unload_lora(pipe)


@pytest.mark.parametrize("compiled_pipe", ["tiny-flux"], indirect=True)
def test_a_unet_lora_on_flux_is_refused_as_another_kind_of_model(compiled_pipe):
    from diffjet.errors import LoraError

    pipe, _ = compiled_pipe
    with pytest.raises(LoraError, match="another kind of model"):
        diffjet.load_lora(pipe, {"unet.conv_in.lora_A.weight": torch.zeros(4, 4)})


# --- dtype rule, scheduler and cache keys -----------------------------------------------------------------

@pytest.mark.parametrize(("model", "dtype"), [("flux-dev", torch.bfloat16), ("sd35-medium", torch.bfloat16),
                                              ("tiny-sd3", torch.bfloat16), ("sdxl", torch.float16),
                                              ("owner/unknown-model", torch.float16)])
def test_half_precision_of_a_model_is_bfloat16_for_dits(model, dtype):
    from diffjet.models import half_precision

    assert half_precision(model) == dtype


def test_half_precision_of_a_folder_follows_its_model_index(tiny_flux_path, tiny_path):
    from diffjet.models import half_precision

    assert (half_precision(str(tiny_flux_path)), half_precision(str(tiny_path))) == (torch.bfloat16, torch.float16)


def test_flow_matching_pipelines_keep_their_euler_and_refuse_sd_schedulers(compiled_pipe):
    from diffjet.bench.recipes import set_scheduler
    from diffjet.errors import ConfigError

    pipe, _ = compiled_pipe
    scheduler = pipe.scheduler
    set_scheduler(pipe, "euler")
    assert pipe.scheduler is scheduler
    with pytest.raises(ConfigError, match="flow-matching"):
        set_scheduler(pipe, "dpm++")

@pytest.mark.parametrize(("components", "dtype", "expected"), [
    (("transformer", "vae"), "auto", "bfloat16"), (("unet", "vae"), "auto", "float16"),
    (("transformer",), "float16", "float16"), (("unet",), "bfloat16", "bfloat16")])
def test_auto_dtype_is_bfloat16_for_dits_and_float16_for_unets(components, dtype, expected):
    settled = Config(dtype=dtype).for_pipeline(dict.fromkeys(components))
    assert settled.dtype == expected and settled.torch_dtype == getattr(torch, expected)


def test_report_says_which_dtype_and_why(compiled_pipe):
    from diffjet.compiler import _dtype_rule

    assert _dtype_rule(Config(), {"transformer": None}, on_cuda=True) == "bfloat16 (Config.dtype='auto': a DiT pipeline)"
    assert _dtype_rule(Config(), {"unet": None}, on_cuda=True) == "float16 (Config.dtype='auto': a UNet pipeline)"
    assert _dtype_rule(Config(dtype="float16"), {"transformer": None}, on_cuda=True) == "float16 (Config.dtype)"
    assert compiled_pipe[0].diffjet.dtype == "the pipeline's own (half precision is for CUDA)"


def _transformer_key(pipe, passes):
    return entry_key(_cache_parts("transformer", pipe.transformer, pipe.diffjet.config.for_pipeline(pipe.components),
                                  passes, "diffjet.runtime.precompiled.forward"))


@pytest.mark.parametrize("compiled_pipe", ["tiny-flux"], indirect=True)
def test_partial_configs_give_the_transformer_the_same_cache_key(compiled_pipe, tiny_flux_path):
    # The key holds what the compiled code depends on (module, passes, compile mode), never fields of Config
    # that do not reach the transformer: another component list, "auto" spelled out, another graph limit.
    pipe, _ = compiled_pipe
    partial = compiled(tiny_flux_path, Config(components=("transformer",)))
    keys = set()
    for compiled_pipe_, config in ((pipe, Config()), (partial, Config(components=("transformer",))),
                                   (pipe, Config(dtype="bfloat16", max_graphs=4)),
                                   (partial, Config(inductor=("transformer",), cache="read-only"))):
        compiled_pipe_.diffjet.config = config
        keys.add(_transformer_key(compiled_pipe_, ["precision(bfloat16)", *compiled_pipe_.diffjet.passes["transformer"]]))
    assert len(keys) == 1
    partial.diffjet.config = Config(compile_mode="max-autotune-no-cudagraphs")
    assert _transformer_key(partial, ["precision(bfloat16)", *partial.diffjet.passes["transformer"]]) not in keys


def test_transformer_cache_key_is_the_same_in_another_process(tiny_flux_path):
    program = ("import warnings, diffusers, diffjet; from tests.test_dit import _transformer_key;"
               "warnings.simplefilter('ignore');"
               f"p = diffjet.compile(diffusers.DiffusionPipeline.from_pretrained({str(tiny_flux_path)!r}));"
               "print(_transformer_key(p, p.diffjet.passes['transformer']))")
    keys = {subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": seed}).stdout.split()[-1]
            for seed in ("1", "2")}
    assert len(keys) == 1
