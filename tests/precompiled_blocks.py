"""The modules `test_precompiled.py` precompiles, and the loader it runs in a new process:
`python -m tests.precompiled_blocks FUNCTION_FILE plain|fused|plain-small` prints the loaded function's
error against eager and the frames Dynamo traced (JSON)."""

import json
import sys

import torch
from diffusers.models.resnet import ResnetBlock2D


def block_and_inputs():
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=32, out_channels=32, temb_channels=64, groups=8).eval()
    return block, torch.randn(1, 32, 16, 16), torch.randn(1, 64)


class Outer(torch.nn.Module):
    """A block inside a module, for diffjet's GroupNorm+SiLU kernel pass."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, temb):
        return self.block(x, temb)


def fused_and_inputs():
    from diffjet import Config
    from diffjet.passes import kernels

    block, x, temb = block_and_inputs()
    outer = kernels.apply(Outer(block), Config(kernels=("group_norm_silu",)))
    assert kernels.placements(outer)["resnet_blocks"] == 1
    return outer, x, temb


def main(path: str, which: str) -> None:
    from torch._dynamo.utils import counters

    from diffjet.runtime.precompiled import Precompiler

    block, x, temb = fused_and_inputs() if which == "fused" else block_and_inputs()
    if which == "plain-small":
        x = x[..., :8, :8]
    with open(path, "rb") as handle:
        function = Precompiler(block).load(handle.read())
    with torch.no_grad():
        out = function(x, temb)
        error = (out - block(x, temb)).abs().max().item()
    print(json.dumps({"error": error, "dynamo_frames": sum(counters["frames"].values())}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
