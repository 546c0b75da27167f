"""A Flux double block's projections, both token streams: what the text stream's small GEMMs cost and what
running them beside the image stream's would give back.

    python bench/flux_joint_gemm.py --json flux-joint-gemm.json

A double block projects its 4,096 image tokens and its 512 text tokens with separate weights of the same
shape. At 512 rows the text stream's GEMMs fill about one wave of output tiles on a Hopper card, so they run
well below the image stream's rate. For each of the block's four projections (fused QKV 3072 → 9216, attention
output 3072 → 3072, feed-forward 3072 → 12288 with its tanh GELU, feed-forward output 12288 → 3072), bf16,
batch 1, 20 calls in one CUDA graph (`gemm_shapes.time_calls`), in microseconds:
- `image`, `text`: each stream's GEMM alone (cuBLAS, the GELU in cuBLASLt's epilogue for the feed-forward);
- `separate`: both, one after the other, as a step runs them today;
- `streams`: the text GEMM on a second stream beside the image GEMM (fork and join captured in the graph);
- `grouped`: one `torch._grouped_mm` over the joined 4,608 rows and both weights stacked, its bias (and GELU)
  added after, as a pass would have to;
- `one weight`: one GEMM over 4,608 rows with a single weight, the rate both streams could share at best.
The error of `streams` and `grouped` is against `separate` (relative, over both streams' outputs).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from gemm_shapes import time_calls

IMAGE, TEXT, DIM = 4096, 512, 3072
PROJECTIONS = {"qkv": (DIM, 9216, False), "out": (DIM, DIM, False), "ff": (DIM, 4 * DIM, True),
               "ff out": (4 * DIM, DIM, False)}


def _linear(x, w, b, gelu: bool):
    return torch._addmm_activation(b, x, w.t(), use_gelu=True) if gelu else torch.addmm(b, x, w.t())


def case(k: int, n: int, gelu: bool, g: torch.Generator) -> dict:
    x = torch.randn(TEXT + IMAGE, k, device="cuda", generator=g).bfloat16()
    xt, xi = x[:TEXT], x[TEXT:]
    w = (torch.randn(2, n, k, device="cuda", generator=g) / k**0.5).bfloat16()  # text's, image's
    b = (torch.randn(2, n, device="cuda", generator=g) * 0.02).bfloat16()
    offs = torch.tensor([TEXT, TEXT + IMAGE], device="cuda", dtype=torch.int32)
    side = torch.cuda.Stream()

    def separate():
        return _linear(xt, w[0], b[0], gelu), _linear(xi, w[1], b[1], gelu)

    def streams():
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            t = _linear(xt, w[0], b[0], gelu)
        i = _linear(xi, w[1], b[1], gelu)
        main.wait_stream(side)
        return t, i

    def grouped():
        y = torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
        y = torch.cat([y[:TEXT] + b[0], y[TEXT:] + b[1]])
        return F.gelu(y, approximate="tanh") if gelu else y

    def joined(out):
        return torch.cat([out[0], out[1]]) if isinstance(out, tuple) else out

    ref = joined(separate()).float()

    def error(f) -> float:
        return float((joined(f()).float() - ref).norm() / ref.norm())

    result = {
        "image": {"us": time_calls(lambda: _linear(xi, w[1], b[1], gelu))},
        "text": {"us": time_calls(lambda: _linear(xt, w[0], b[0], gelu))},
        "separate": {"us": time_calls(separate)},
        "streams": {"us": time_calls(streams), "error": error(streams)},
        "one weight": {"us": time_calls(lambda: _linear(x, w[1], b[1], gelu))},
    }
    try:
        result["grouped"] = {"us": time_calls(grouped), "error": error(grouped)}
    except RuntimeError as e:  # the grouped GEMM's layout rules differ between releases
        result["grouped"] = {"failed": str(e).splitlines()[0][:200]}
    for name, v in result.items():
        if "us" in v:
            rows = {"image": IMAGE, "text": TEXT}.get(name, TEXT + IMAGE)  # each stream alone does only its rows
            v["tflop_per_s"] = round(2 * rows * k * n / (v["us"] * 1e-6) / 1e12, 1)
    return result


def main() -> None:
    from diffjet.bench import environment

    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    args = parser.parse_args()
    g = torch.Generator("cuda").manual_seed(0)
    cases = {name: case(k, n, gelu, g) for name, (k, n, gelu) in PROJECTIONS.items()}
    print(f"{'':8s}" + "".join(f"{v:>14s}" for v in cases["qkv"]))
    for name, variants in cases.items():
        print(f"{name:8s}" + "".join(f"{v['us']:9.1f} us  " if "us" in v else f"{'failed':>14s}"
                                     for v in variants.values()))
    saved = sum(v["separate"]["us"] - min(v["streams"]["us"], v.get("grouped", {}).get("us", 1e9))
                for v in cases.values())
    print(f"a double block's best against separate: {saved:.1f} us less ({saved * 19 / 1000:.2f} ms a flux-dev step)")
    if args.json:
        result = {**environment("cuda"), "command": "python bench/flux_joint_gemm.py", "cases": cases,
                  "us_less_per_block": round(saved, 1)}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
