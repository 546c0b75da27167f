"""The modules `test_precompiled.py` precompiles, and the loader it runs in a new process:
`python -m tests.precompiled_blocks FUNCTION_FILE plain|fused|plain-small` prints the loaded function's
error against eager, the frames Dynamo traced, the tensors its guards were unpickled with, and whether
its guards still turn away another input shape and grad mode (JSON)."""

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
    pickler = torch._dynamo.guards.GuardsStatePickler  # the guards' tensors are unpickled through it
    unpickle_tensor, unpickled = pickler.__dict__["_unpickle_tensor"], []

    def counted(cls, *args, **kwargs):
        unpickled.append(1)
        return unpickle_tensor.__func__(cls, *args, **kwargs)

    pickler._unpickle_tensor = classmethod(counted)
    with open(path, "rb") as handle:
        function = Precompiler(block).load(handle.read())
    pickler._unpickle_tensor = unpickle_tensor
    with torch.no_grad():
        out = function(x, temb)
        error = (out - block(x, temb)).abs().max().item()
    print(json.dumps({"error": error, "dynamo_frames": sum(counters["frames"].values()),
                      "unpickled_tensors": len(unpickled),
                      "rejects_other_shape": _rejects(function, torch.no_grad(), x[..., :4, :4], temb),
                      "rejects_grad_mode": _rejects(function, torch.enable_grad(), x, temb)}))


def _rejects(function, mode, *args) -> bool:
    try:
        with mode:
            function(*args)
    except RuntimeError as error:
        return "guard" in str(error).lower()
    return False


if __name__ == "__main__":
    main(*sys.argv[1:3])
