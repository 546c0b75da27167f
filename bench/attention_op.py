"""One attention call at the shapes of the DiTs' and SDXL's steps at 1024²: SDPA's cuDNN and flash backends against
FlashAttention-4's Hopper kernel (`diffjet::flash_attn_4`, the `flash-attn-4` package).

    python bench/attention_op.py --json attention-op.json

Shapes (batch, tokens, heads, head_dim): Flux.1 (1, 4608, 24, 128); SD 3.5's joint attention (2, 4429, 24, 64:
4,096 image and 333 text tokens, the CFG pair) and its MMDiT-X image-only attention (2, 4096, 24, 64); SDXL's
64×64 level (2, 4096, 10, 64). SDPA reads the (batch, heads, tokens, head_dim) tensors; FlashAttention-4 their
transposed views, as diffjet's DiT processors pass them (`flash_attn_4`), and contiguous (batch, tokens, heads,
head_dim) copies (`flash_attn_4_token_major`: no faster, so the processors keep SDPA's layout), and the package's
internal forward on those (`flash_attn_4_fwd`). Each is timed as 20 calls in one CUDA graph, the median of the
replays (`gemm_shapes.time_calls`), so the package's Python launch path is not counted; then all again in reverse
order (`us_again`). The error is relative to the float32 attention. bfloat16 for the DiTs, float16 for SDXL.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from gemm_shapes import time_calls
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {"flux": (1, 4608, 24, 128), "sd35-joint": (2, 4429, 24, 64), "sd35-image": (2, 4096, 24, 64),
          "sdxl-64x64": (2, 4096, 10, 64)}


def case(shape: tuple[int, int, int, int], dtype: torch.dtype, g: torch.Generator) -> dict:
    from diffjet.kernels.flash4 import _interface, flash_attn_4

    batch, tokens, heads, dim = shape
    q, k, v = (torch.randn(batch, heads, tokens, dim, device="cuda", generator=g).to(dtype) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    token_major = [x.transpose(1, 2).contiguous() for x in (q, k, v)]
    flops = 4 * batch * heads * tokens * tokens * dim

    def sdpa(backend):
        def run():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)
        return run

    variants = {"cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "flash2": sdpa(SDPBackend.FLASH_ATTENTION),
                "flash_attn_4": lambda: flash_attn_4(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     dim**-0.5).transpose(1, 2),
                "flash_attn_4_token_major": lambda: flash_attn_4(*token_major, dim**-0.5).transpose(1, 2),
                # the package's internal forward, which an exploratory probe timed faster than the op
                "flash_attn_4_fwd": lambda: _interface()._flash_attn_fwd(*token_major, softmax_scale=dim**-0.5)[0]
                .transpose(1, 2)}
    out = {}
    for name, fn in variants.items():
        y = fn().float()
        us = time_calls(fn)
        out[name] = {"us": us, "tflops": flops / us / 1e6, "error": float((y - ref).norm() / ref.norm())}
    for name, fn in reversed(variants.items()):  # again in reverse order: a drift of the card's clock shows here
        out[name]["us_again"] = time_calls(fn)
    return out


def main() -> None:
    from diffjet.bench import environment
    from diffjet.kernels.flash4 import unavailable

    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    args = parser.parse_args()
    unknown = set(args.shapes.split(",")) - SHAPES.keys()
    if unknown:
        parser.error(f"unknown shapes {', '.join(sorted(unknown))}; known: {', '.join(SHAPES)}")
    shapes = {name: SHAPES[name] for name in args.shapes.split(",")}
    why = unavailable(torch.device("cuda"))
    if why:
        raise SystemExit(f"FlashAttention-4 does not run here: {why}")
    g = torch.Generator("cuda").manual_seed(0)
    cases = {name: case(shape, torch.float16 if name.startswith("sdxl") else torch.bfloat16, g)
             for name, shape in shapes.items()}
    print(f"{'shape':12s} " + "  ".join(f"{n:>24s}" for n in next(iter(cases.values()))))
    for name, variants in cases.items():
        print(f"{name:12s} " + "  ".join(f"{v['us']:7.1f} / {v['us_again']:7.1f} us" for v in variants.values()))
    if args.json:
        result = {**environment("cuda"), "command": "python bench/attention_op.py --shapes " + args.shapes,
                  "shapes": {n: dict(zip(("batch", "tokens", "heads", "head_dim"), s)) for n, s in shapes.items()},
                  "cases": cases}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
