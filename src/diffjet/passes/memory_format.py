"""Memory-format pass: convolution weights in channels-last (NHWC).

cuDNN's fastest fp16 convolution kernels on Hopper read and write NHWC; Inductor propagates the layout
to the activations so that no transposes are left between convolutions. Applies to any module with
4-D weights (UNet, VAE, ControlNet); a text encoder has none and is returned unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import Config


def apply(module: nn.Module, config: Config) -> nn.Module:
    if not config.channels_last:
        return module
    if not any(p.dim() == 4 for p in module.parameters()):
        return module
    return module.to(memory_format=torch.channels_last)
