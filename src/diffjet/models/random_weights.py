"""Deterministic random weights for a module materialised from the meta device.

Each tensor draws from its own `torch.Generator`, seeded by a CRC32 of "preset/component/name",
so a value depends only on which tensor it is: not on build order, on which other components
exist, or on the machine. Scales follow PyTorch's default init (which keeps a float16 forward
finite and its activations O(1)), because speed and fidelity measurements need numerics that look
like a trained network's, not zeros or overflow.
"""

import math
import zlib

import torch
from torch import nn

# Norm layers (torch's and diffusers' own, such as RMSNorm or AdaGroupNorm's inner norms) start as
# the identity, as they do in PyTorch and in the trained checkpoints.
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.InstanceNorm2d)

# Token and position embeddings: the 0.02 std of CLIP's and GPT-2's init.
_EMBEDDING_STD = 0.02


def tensor_seed(key: str) -> int:
    """Seed of one tensor, stable across processes and Python versions (unlike `hash`)."""
    return zlib.crc32(key.encode("utf-8"))


def _uniform(shape: torch.Size, bound: float, generator: torch.Generator) -> torch.Tensor:
    # Drawn in float32 and then cast, so the float16 and float32 builds hold the same values.
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def _normal(shape: torch.Size, std: float, generator: torch.Generator) -> torch.Tensor:
    # float64 takes the scalar Box-Muller path on every CPU; the float32 path is vectorised
    # differently with and without AVX2, which could change the last bit between machines.
    return torch.empty(shape, dtype=torch.float64).normal_(0.0, std, generator=generator)


def _fan_in(tensor: torch.Tensor) -> int:
    # Linear (out, in) and conv (out, in, *kernel) weights: everything but the output dimension.
    return max(1, math.prod(tensor.shape[1:]))


def _random_value(
    module: nn.Module, param_name: str, param: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    if isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower():
        return torch.ones(param.shape) if param_name == "weight" else torch.zeros(param.shape)
    if isinstance(module, nn.Embedding):
        return _normal(param.shape, _EMBEDDING_STD, generator)
    if param_name == "bias" and getattr(module, "weight", None) is not None and module.weight.ndim >= 2:
        # nn.Linear / nn.ConvNd default: uniform(±1/sqrt(fan_in)) with the weight's fan_in.
        return _uniform(param.shape, 1 / math.sqrt(_fan_in(module.weight)), generator)
    if param.ndim >= 2:
        return _uniform(param.shape, 1 / math.sqrt(_fan_in(param)), generator)
    # A free-standing vector parameter (a learned scale or offset): small, so it perturbs little.
    return _uniform(param.shape, 0.02, generator)


def _recomputed_buffer(module: nn.Module, buffer_name: str, buffer: torch.Tensor) -> torch.Tensor:
    if buffer_name == "position_ids":  # CLIP: arange(max_position_embeddings), shape (1, n)
        return torch.arange(buffer.shape[-1]).expand(buffer.shape)
    if buffer_name == "pos_embed" and type(module).__name__ == "PatchEmbed":
        # SD3's fixed 2-D sin-cos position table over pos_embed_max_size² patches, shape (1, n², dim).
        from diffusers.models.embeddings import get_2d_sincos_pos_embed

        grid = math.isqrt(buffer.shape[1])
        table = get_2d_sincos_pos_embed(buffer.shape[-1], grid, base_size=module.base_size,
                                        interpolation_scale=module.interpolation_scale, output_type="pt")
        return table.float().unsqueeze(0)
    raise NotImplementedError(
        f"no rule to recompute buffer {buffer_name!r} of shape {tuple(buffer.shape)}; "
        "add one to diffjet.models.random_weights"
    )


@torch.no_grad()
def fill_random_weights(model: nn.Module, key: str) -> None:
    """Overwrite every parameter of `model` in place with deterministic random values.

    `model` is usually fresh from `to_empty()`, so its storage holds garbage; buffers are
    recomputed to what the module's `__init__` puts there (they are positions, not weights),
    and a buffer without a known rule is an error rather than silent garbage.
    `key` names the model (for example "sd15/unet"); each tensor's seed is `key/name`.
    """
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for param_name, param in module.named_parameters(recurse=False):
            generator = torch.Generator().manual_seed(tensor_seed(f"{key}/{prefix}{param_name}"))
            param.copy_(_random_value(module, param_name, param, generator))
        for buffer_name, buffer in module.named_buffers(recurse=False):
            buffer.copy_(_recomputed_buffer(module, buffer_name, buffer))
