"""Does cuBLAS's blockwise fp8 GEMM (1 × 128 activation scales, 128 × 128 weight scales, as DeepSeek-V3 trains)
run as fast as the rowwise one at SDXL's feed-forward output shapes?

    python bench/fp8_blockwise.py --json fp8-blockwise-sdxl.json

If it did, the fp8 GEGLU kernel could write e4m3 with a scale per row and 128 columns (one output tile's row)
from its epilogue, and the feed-forward output projection would run in fp8 with no quantization pass over its
input; a rowwise scale needs the whole row's maximum, which no single program of that kernel sees. Times
(`triton.testing.do_bench`, µs) for float16, rowwise and blockwise `torch._scaled_mm` on random values.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from triton.testing import do_bench

F8 = torch.float8_e4m3fn
#: (rows, inner, outputs, calls in one SDXL step at 1024², batch 2): the feed-forward outputs at both widths, then
#: the 1280 → 1280 projections (attention outputs, cross-attention queries).
SHAPES = [(2048, 5120, 1280, 60), (8192, 2560, 640, 10), (2048, 1280, 1280, 126)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    args = parser.parse_args()
    from diffjet.bench import environment

    rows = []
    for m, k, n, calls in SHAPES:
        a = torch.randn(m, k, device="cuda", dtype=torch.float16)
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        qa, qw = a.to(F8), w.to(F8)
        row_a, row_w = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
        row = {"m": m, "k": k, "n": n, "calls": calls, "fp16_us": do_bench(lambda: a @ w.t()) * 1e3,
               "rowwise_us": do_bench(lambda: torch._scaled_mm(qa, qw.t(), row_a, row_w, out_dtype=torch.float16,
                                                               use_fast_accum=True)) * 1e3}
        try:
            # (m, k/128) activation scales and (k/128, n/128) weight scales, both outer-dimension-major
            block_a = torch.ones(k // 128, m, device="cuda").t()
            block_w = torch.ones(n // 128, k // 128, device="cuda").t()
            row["blockwise_us"] = do_bench(lambda: torch._scaled_mm(qa, qw.t(), block_a, block_w,
                                                                    out_dtype=torch.float16)) * 1e3
        except Exception as exc:  # noqa: BLE001 - an unsupported scaling is the answer, not a failure
            row["blockwise_error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
        print(row, file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**environment("cuda"), "command": "python " + " ".join(sys.argv), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
