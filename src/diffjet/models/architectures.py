"""The component configs of every preset, copied from the published `config.json` files.

Full-size presets repeat the published configs of runwayml/stable-diffusion-v1-5,
stabilityai/stable-diffusion-2-1, stabilityai/stable-diffusion-xl-base-1.0, black-forest-labs/FLUX.1-dev and
-schnell and stabilityai/stable-diffusion-3.5-medium key for key (minus
`_class_name`, `_diffusers_version` and keys that only name files), so a preset folder loads into
the same modules, with the same shapes and the same numerics, as the real checkpoint.
`tests/test_models.py` pins the parameter counts of the real checkpoints.

The tiny presets keep every component class and code path of their full-size twin (cross-attention
and plain blocks, linear projections, text-time embeddings, a VAE that downsamples 8x) at sizes a
CPU runs in milliseconds.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

from diffjet.models.tokenizer import EOS_TOKEN


@dataclass(frozen=True)
class ModelSpec:
    """A weight-bearing component: its class and the config it is built from."""

    cls: type[torch.nn.Module]
    config: Mapping[str, Any]

    def instantiate(self) -> torch.nn.Module:
        """Build the module with the current default device and dtype (use the meta device)."""
        config_class = getattr(self.cls, "config_class", None)
        if config_class is not None:  # transformers: the model takes a config object
            return self.cls(config_class(**self.config))
        return self.cls(**self.config)


@dataclass(frozen=True)
class Architecture:
    """Everything in a preset's diffusers folder except weight values.

    `models` is in build order; `tokenizers` maps each CLIP tokenizer component to its pad token;
    `t5_tokenizers` maps each T5 tokenizer component to its `model_max_length`;
    `pipeline_options` are the pipeline's own registered config values (model_index.json).
    """

    models: Mapping[str, ModelSpec]
    scheduler_class: type[SchedulerMixin]
    scheduler_config: Mapping[str, Any]
    tokenizers: Mapping[str, str]
    pipeline_options: Mapping[str, Any]
    t5_tokenizers: Mapping[str, int] = field(default_factory=dict)


_SD_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

# runwayml/stable-diffusion-v1-5 unet/config.json
SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": list(_SD_DOWN_BLOCKS),
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": list(_SD_UP_BLOCKS),
}

# stabilityai/stable-diffusion-2-1 unet/config.json
SD21_UNET = {
    **SD15_UNET,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
}

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
SDXL_UNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# runwayml/stable-diffusion-v1-5 vae/config.json (scaling_factor is the class default there).
SD15_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD21_VAE = {**SD15_VAE, "sample_size": 768}
SDXL_VAE = {**SD15_VAE, "force_upcast": True, "sample_size": 1024, "scaling_factor": 0.13025}

# openai/clip-vit-large-patch14 text tower, as in runwayml/stable-diffusion-v1-5 text_encoder/config.json.
# eos_token_id 2 is what the published configs say; transformers reads it as "pool at argmax(input_ids)",
# the behaviour of the real checkpoints.
CLIP_L_TEXT = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}
# OpenCLIP ViT-H/14 text tower without its last layer (SD 2.x uses the penultimate layer).
OPENCLIP_H_TEXT = {
    **CLIP_L_TEXT,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
}
# OpenCLIP ViT-bigG/14 text tower, SDXL's text_encoder_2.
OPENCLIP_BIGG_TEXT = {
    **CLIP_L_TEXT,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
SD15_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
# stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json
SD21_SCHEDULER = {**SD15_SCHEDULER, "prediction_type": "v_prediction"}
# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
SDXL_SCHEDULER = {
    **SD15_SCHEDULER,
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}

_SD_PIPELINE_OPTIONS = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

# Tiny sizes: 32 channels is the smallest width GroupNorm(32 groups) allows; four VAE blocks keep the
# real 8x latent downsampling, so a 64x64 image has 8x8 latents like a 512x512 one has 64x64.
TINY_UNET = {
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "sample_size": 8,
}
TINY_VAE = {
    "block_out_channels": [32, 32, 64, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 64,
}
TINY_CLIP_TEXT = {
    **CLIP_L_TEXT,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": 32,
}
TINY_OPENCLIP_TEXT = {**TINY_CLIP_TEXT, "hidden_act": "gelu"}
# SDXL's UNet takes text_encoder_2's pooled projection plus six size/crop ids, each embedded with
# addition_time_embed_dim channels: 1280 + 6 * 256 = 2816 full size, 32 + 6 * 8 = 80 here.
TINY_SDXL_UNET = {
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2],
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "cross_attention_dim": 64,  # text_encoder (32) and text_encoder_2 (32) hidden states, concatenated
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,
    "norm_num_groups": 32,
    "sample_size": 8,
}
TINY_SDXL_VAE = {**TINY_VAE, "force_upcast": True, "scaling_factor": 0.13025}

ARCHITECTURES: dict[str, Architecture] = {
    "tiny": Architecture(
        models={
            "unet": ModelSpec(UNet2DConditionModel, TINY_UNET),
            "vae": ModelSpec(AutoencoderKL, TINY_VAE),
            "text_encoder": ModelSpec(CLIPTextModel, TINY_CLIP_TEXT),
        },
        scheduler_class=EulerDiscreteScheduler,
        scheduler_config=SDXL_SCHEDULER,
        tokenizers={"tokenizer": EOS_TOKEN},
        pipeline_options=_SD_PIPELINE_OPTIONS,
    ),
    "tiny-sdxl": Architecture(
        models={
            "unet": ModelSpec(UNet2DConditionModel, TINY_SDXL_UNET),
            "vae": ModelSpec(AutoencoderKL, TINY_SDXL_VAE),
            "text_encoder": ModelSpec(CLIPTextModel, TINY_CLIP_TEXT),
            "text_encoder_2": ModelSpec(CLIPTextModelWithProjection, TINY_OPENCLIP_TEXT),
        },
        scheduler_class=EulerDiscreteScheduler,
        scheduler_config=SDXL_SCHEDULER,
        tokenizers={"tokenizer": EOS_TOKEN, "tokenizer_2": "!"},
        pipeline_options={"force_zeros_for_empty_prompt": True},
    ),
    "sd15": Architecture(
        models={
            "unet": ModelSpec(UNet2DConditionModel, SD15_UNET),
            "vae": ModelSpec(AutoencoderKL, SD15_VAE),
            "text_encoder": ModelSpec(CLIPTextModel, CLIP_L_TEXT),
        },
        scheduler_class=PNDMScheduler,
        scheduler_config=SD15_SCHEDULER,
        tokenizers={"tokenizer": EOS_TOKEN},
        pipeline_options=_SD_PIPELINE_OPTIONS,
    ),
    "sd21": Architecture(
        models={
            "unet": ModelSpec(UNet2DConditionModel, SD21_UNET),
            "vae": ModelSpec(AutoencoderKL, SD21_VAE),
            "text_encoder": ModelSpec(CLIPTextModel, OPENCLIP_H_TEXT),
        },
        scheduler_class=DDIMScheduler,
        scheduler_config=SD21_SCHEDULER,
        tokenizers={"tokenizer": "!"},
        pipeline_options=_SD_PIPELINE_OPTIONS,
    ),
    "sdxl": Architecture(
        models={
            "unet": ModelSpec(UNet2DConditionModel, SDXL_UNET),
            "vae": ModelSpec(AutoencoderKL, SDXL_VAE),
            "text_encoder": ModelSpec(CLIPTextModel, CLIP_L_TEXT),
            "text_encoder_2": ModelSpec(CLIPTextModelWithProjection, OPENCLIP_BIGG_TEXT),
        },
        scheduler_class=EulerDiscreteScheduler,
        scheduler_config=SDXL_SCHEDULER,
        tokenizers={"tokenizer": EOS_TOKEN, "tokenizer_2": "!"},
        pipeline_options={"force_zeros_for_empty_prompt": True},
    ),
}


# --- ControlNet presets: a base preset plus the published ControlNet for it ------------------------------

# lllyasviel/sd-controlnet-canny config.json; every SD 1.5 ControlNet of lllyasviel in diffusers format has
# this layout (361,279,120 parameters, the same as `ControlNetModel.from_unet` of the SD 1.5 UNet).
SD15_CONTROLNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "class_embed_type": None,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 768,
    "down_block_types": list(_SD_DOWN_BLOCKS),
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": None,
    "resnet_time_scale_shift": "default",
    "upcast_attention": False,
    "use_linear_projection": False,
}

# diffusers/controlnet-canny-sdxl-1.0 config.json (1,251,014,160 parameters).
SDXL_CONTROLNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "class_embed_type": None,
    "conditioning_channels": 3,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "global_pool_conditions": False,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_time_scale_shift": "default",
    "transformer_layers_per_block": [1, 2, 10],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# A ControlNet copies its UNet's encoder, so the tiny ones take the tiny UNets' down path; four
# conditioning channels widths give the real 8x downsampling of the control image to the latent size.
_UNET_DECODER_KEYS = ("up_block_types", "sample_size")
TINY_CONTROLNET = {
    **{k: v for k, v in TINY_UNET.items() if k not in _UNET_DECODER_KEYS},
    "conditioning_embedding_out_channels": [16, 16, 32, 32],
}
TINY_SDXL_CONTROLNET = {
    **{k: v for k, v in TINY_SDXL_UNET.items() if k not in _UNET_DECODER_KEYS},
    "conditioning_embedding_out_channels": [16, 16, 32, 32],
}


def _with_controlnet(base: Architecture, controlnet: Mapping[str, Any]) -> Architecture:
    models = dict(base.models)
    models = {"unet": models.pop("unet"), "controlnet": ModelSpec(ControlNetModel, controlnet), **models}
    return replace(base, models=models)


ARCHITECTURES.update(
    {
        "tiny-controlnet": _with_controlnet(ARCHITECTURES["tiny"], TINY_CONTROLNET),
        "tiny-sdxl-controlnet": _with_controlnet(ARCHITECTURES["tiny-sdxl"], TINY_SDXL_CONTROLNET),
        "sd15-controlnet": _with_controlnet(ARCHITECTURES["sd15"], SD15_CONTROLNET),
        "sdxl-controlnet": _with_controlnet(ARCHITECTURES["sdxl"], SDXL_CONTROLNET),
    }
)


# --- DiT presets: Flux.1 and Stable Diffusion 3.5 ---------------------------------------------------------

# google/t5-v1_1-xxl encoder, as in black-forest-labs/FLUX.1-dev text_encoder_2/config.json and
# stabilityai/stable-diffusion-3.5-medium text_encoder_3/config.json (4,762,310,656 parameters).
T5_XXL = {
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "decoder_start_token_id": 0,
    "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "num_decoder_layers": 24,
    "num_heads": 64,
    "num_layers": 24,
    "pad_token_id": 0,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "vocab_size": 32128,
}
# T5's tokenizers: FLUX.1-dev's tokenizer_2 and SD 3.5's tokenizer_3 say model_max_length 512.
T5_MAX_LENGTH = 512

# black-forest-labs/FLUX.1-dev transformer/config.json; `axes_dims_rope` is the class default, which the
# published file leaves out. FLUX.1-schnell's differs only in `guidance_embeds` (it is guidance-distilled).
FLUX_DEV_TRANSFORMER = {
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}
FLUX_SCHNELL_TRANSFORMER = {**FLUX_DEV_TRANSFORMER, "guidance_embeds": False}

# black-forest-labs/FLUX.1-dev vae/config.json (the same in -schnell): 16 latent channels, no quant convs.
FLUX_VAE = {
    **SD15_VAE,
    "force_upcast": True,
    "latent_channels": 16,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}

# black-forest-labs/FLUX.1-dev and -schnell scheduler/scheduler_config.json.
FLUX_DEV_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
FLUX_SCHNELL_SCHEDULER = {**FLUX_DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}

# stabilityai/stable-diffusion-3.5-medium transformer/config.json: MMDiT-X, self-attention added to the
# image stream of the first 13 blocks, RMS-normed queries and keys.
SD35_MEDIUM_TRANSFORMER = {
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "dual_attention_layers": list(range(13)),
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}
# stabilityai/stable-diffusion-3.5-medium vae/config.json.
SD35_VAE = {**FLUX_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609}
# stabilityai/stable-diffusion-3.5-medium scheduler/scheduler_config.json.
SD35_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}

# Tiny DiT twins: every class and code path of the full-size ones (joint and single-stream blocks, guidance
# embedding, RoPE; MMDiT-X's dual attention and QK norms; T5 with relative positions, a 16-channel VAE
# without quant convs) at CPU sizes. The T5 keeps its 32128-token vocabulary so that the tokenizer fits.
TINY_T5 = {
    **T5_XXL,
    "d_ff": 37,
    "d_kv": 8,
    "d_model": 32,
    "num_decoder_layers": 2,
    "num_heads": 4,
    "num_layers": 2,
}
TINY_DIT_VAE = {**TINY_VAE, **{k: FLUX_VAE[k] for k in ("latent_channels", "scaling_factor", "shift_factor",
                                                          "use_post_quant_conv", "use_quant_conv")}}
TINY_FLUX_TRANSFORMER = {
    "attention_head_dim": 16,
    "axes_dims_rope": [4, 6, 6],  # sums to the head size, as 16 + 56 + 56 = 128
    "guidance_embeds": True,
    "in_channels": 64,  # 2×2 patches of 16 latent channels, as full size
    "joint_attention_dim": 32,  # the tiny T5's width
    "num_attention_heads": 2,
    "num_layers": 1,
    "num_single_layers": 1,
    "patch_size": 1,
    "pooled_projection_dim": 32,  # the tiny CLIP's width
}
# SD3 pads the two CLIP encoders' concatenated states (32 + 32 wide here, 768 + 1280 full size) to T5's width.
TINY_SD3_T5 = {**TINY_T5, "d_model": 64}
TINY_SD3_TRANSFORMER = {
    "attention_head_dim": 8,
    "caption_projection_dim": 32,
    "dual_attention_layers": [0],
    "in_channels": 16,
    "joint_attention_dim": 64,
    "num_attention_heads": 4,
    "num_layers": 2,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 64,  # the two CLIP projections, concatenated
    "pos_embed_max_size": 16,
    "qk_norm": "rms_norm",
    "sample_size": 8,
}

_FLUX_TOKENIZERS = {"tokenizer": EOS_TOKEN}
_SD3_TOKENIZERS = {"tokenizer": EOS_TOKEN, "tokenizer_2": "!"}


def _flux(transformer: Mapping[str, Any], vae: Mapping[str, Any], clip: Mapping[str, Any], t5: Mapping[str, Any],
          scheduler: Mapping[str, Any]) -> Architecture:
    return Architecture(
        models={
            "transformer": ModelSpec(FluxTransformer2DModel, transformer),
            "vae": ModelSpec(AutoencoderKL, vae),
            "text_encoder": ModelSpec(CLIPTextModel, clip),
            "text_encoder_2": ModelSpec(T5EncoderModel, t5),
        },
        scheduler_class=FlowMatchEulerDiscreteScheduler,
        scheduler_config=scheduler,
        tokenizers=_FLUX_TOKENIZERS,
        t5_tokenizers={"tokenizer_2": T5_MAX_LENGTH},
        pipeline_options={},
    )


def _sd3(transformer: Mapping[str, Any], vae: Mapping[str, Any], clip_l: Mapping[str, Any],
         clip_g: Mapping[str, Any], t5: Mapping[str, Any]) -> Architecture:
    return Architecture(
        models={
            "transformer": ModelSpec(SD3Transformer2DModel, transformer),
            "vae": ModelSpec(AutoencoderKL, vae),
            "text_encoder": ModelSpec(CLIPTextModelWithProjection, clip_l),
            "text_encoder_2": ModelSpec(CLIPTextModelWithProjection, clip_g),
            "text_encoder_3": ModelSpec(T5EncoderModel, t5),
        },
        scheduler_class=FlowMatchEulerDiscreteScheduler,
        scheduler_config=SD35_SCHEDULER,
        tokenizers=_SD3_TOKENIZERS,
        t5_tokenizers={"tokenizer_3": T5_MAX_LENGTH},
        pipeline_options={},
    )


ARCHITECTURES.update(
    {
        "tiny-flux": _flux(TINY_FLUX_TRANSFORMER, TINY_DIT_VAE, TINY_CLIP_TEXT, TINY_T5, FLUX_DEV_SCHEDULER),
        "flux-dev": _flux(FLUX_DEV_TRANSFORMER, FLUX_VAE, CLIP_L_TEXT, T5_XXL, FLUX_DEV_SCHEDULER),
        "flux-schnell": _flux(FLUX_SCHNELL_TRANSFORMER, FLUX_VAE, CLIP_L_TEXT, T5_XXL, FLUX_SCHNELL_SCHEDULER),
        "tiny-sd3": _sd3(TINY_SD3_TRANSFORMER, TINY_DIT_VAE, TINY_CLIP_TEXT, TINY_OPENCLIP_TEXT, TINY_SD3_T5),
        "sd35-medium": _sd3(SD35_MEDIUM_TRANSFORMER, SD35_VAE, CLIP_L_TEXT, OPENCLIP_BIGG_TEXT, T5_XXL),
    }
)
