"""The GELU projections of a flux-dev step at 1024², one block at a time: what Inductor runs against cuBLASLt's
GELU epilogue, and the single blocks' concatenation against a split output projection.

    python bench/flux_mlp_op.py --json flux-mlp-op.json

Cases (bf16, batch 1, 4,096 image + 512 text tokens; weights scaled as trained layers' are):
- "double ff": a double block's `ff` (image tokens), 3072 → 12288, tanh GELU. `inductor`: Inductor's compile of
  `gelu(linear(x))` (cuBLAS, then a GELU kernel); `epilogue`: `torch._addmm_activation(..., use_gelu=True)`,
  the GELU applied by the GEMM to its float32 accumulator before rounding.
- "single tail": a single block's 4,608 tokens from the norm's output `h` and the attention's `a` to the output
  projection. `inductor`: Inductor's compile of `proj_out(cat([a, gelu(proj_mlp(h))]))`, diffusers' forward;
  `split`: the GELU projection by the epilogue, then `proj_out` as two GEMMs over the halves of its input
  (`a @ Wa.T + m @ Wm.T + b`, the second accumulating onto the first), no concatenation.
- "single proj": the block's two projections of `h`, 3072 → 9216 (fused QKV) and 3072 → 12288, as two GEMMs
  against one 3072 → 21504 GEMM.
Each is timed as 20 calls in one CUDA graph, the median of 50 replays (`gemm_shapes.time_calls`); the error is
against the same computation in float32.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from gemm_shapes import time_calls

DIM, MLP, QKV = 3072, 12288, 9216


def _error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref).norm() / ref.norm())


def _weights(n: int, k: int, g: torch.Generator):
    w = torch.randn(n, k, device="cuda", generator=g) / k**0.5
    b = torch.randn(n, device="cuda", generator=g) * 0.02
    return w.bfloat16(), b.bfloat16()


def double_ff(g: torch.Generator) -> dict:
    x = torch.randn(4096, DIM, device="cuda", generator=g).bfloat16()
    w, b = _weights(MLP, DIM, g)
    ref = F.gelu(F.linear(x.float(), w.float(), b.float()), approximate="tanh")
    inductor = torch.compile(lambda x: F.gelu(F.linear(x, w, b), approximate="tanh"))
    epilogue = lambda x: torch._addmm_activation(b, x, w.t(), use_gelu=True)  # noqa: E731
    return {name: {"us": time_calls(lambda: f(x)), "error": _error(f(x), ref)}
            for name, f in (("inductor", inductor), ("epilogue", epilogue))}


def single_tail(g: torch.Generator) -> dict:
    h = torch.randn(4608, DIM, device="cuda", generator=g).bfloat16()
    a = torch.randn(4608, DIM, device="cuda", generator=g).bfloat16()
    wm, bm = _weights(MLP, DIM, g)
    wo, bo = _weights(DIM, DIM + MLP, g)
    wa, wr = wo[:, :DIM], wo[:, DIM:]  # views, as a split projection keeps the one weight

    def diffusers(h, a, wm, bm, wo, bo):
        return F.linear(torch.cat([a, F.gelu(F.linear(h, wm, bm), approximate="tanh")], dim=1), wo, bo)

    def split(h, a):
        m = torch._addmm_activation(bm, h, wm.t(), use_gelu=True)
        return torch.addmm(torch.addmm(bo, m, wr.t()), a, wa.t())

    ref = diffusers(h.float(), a.float(), wm.float(), bm.float(), wo.float(), bo.float())
    inductor = torch.compile(lambda h, a: diffusers(h, a, wm, bm, wo, bo))
    return {name: {"us": time_calls(lambda: f(h, a)), "error": _error(f(h, a), ref)}
            for name, f in (("inductor", inductor), ("split", split))}


def single_proj(g: torch.Generator) -> dict:
    h = torch.randn(4608, DIM, device="cuda", generator=g).bfloat16()
    w, b = _weights(QKV + MLP, DIM, g)
    wq, bq, wm, bm = w[:QKV], b[:QKV], w[QKV:], b[QKV:]
    return {"two": {"us": time_calls(lambda: (F.linear(h, wq, bq), F.linear(h, wm, bm)))},
            "one": {"us": time_calls(lambda: F.linear(h, w, b))}}


def main() -> None:
    from diffjet.bench import environment

    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    args = parser.parse_args()
    g = torch.Generator("cuda").manual_seed(0)
    cases = {"double ff": double_ff(g), "single tail": single_tail(g), "single proj": single_proj(g)}
    for case, variants in cases.items():
        line = "  ".join(f"{name} {v['us']:8.1f} us" + (f" (error {v['error']:.2e})" if "error" in v else "")
                         for name, v in variants.items())
        print(f"{case:12s} {line}")
    if args.json:
        result = {**environment("cuda"), "command": "python bench/flux_mlp_op.py", "cases": cases}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
