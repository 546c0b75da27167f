"""The GEMMs of one UNet step, by shape: fp16 against fp8 (`passes/fp8.py`), the measurements behind `fp8.pays`.

    python bench/fp8_shapes.py --model sd15 --json fp8-shapes-sd15.json            # GPU: shapes, timings, errors
    python bench/fp8_shapes.py --model sdxl --json fp8-shapes-sdxl.json
    python bench/fp8_shapes.py --fit fp8-shapes-sd15.json fp8-shapes-sdxl.json    # the rule's constants
    python bench/fp8_shapes.py --model tiny --device cpu --shapes-only            # CPU: the shapes only

Lists every distinct linear-layer and 1×1-convolution GEMM (M, K, N, bias) of one UNet step at the preset's
size, batch 2 (one image with CFG), with its count per step (`gemm_shapes.shape_rows`). On the GPU, for each
shape: fp16 `F.linear` and the fp8 path (`fp8.fp8_linear`: per-row quantization of the input, then
`torch._scaled_mm`), each compiled by Inductor and timed as `gemm_shapes.time_calls` does (CUDA graph replays,
CUDA events, median); `fp8_gemm_us` is `_scaled_mm` alone on an input quantized beforehand (in the UNet,
Inductor may fuse the quantization into the kernel that writes the input, so the true cost lies between the
two). `relative_error` is fp8's relative error against fp16 on random data (N(0, 1) inputs, weights scaled by
1/sqrt(K)); activations with outliers lose more to per-row scales. `pays` is what `fp8.pays` decides now.

`--fit` reads result files and prints, for each GPU, the constants of `fp8.pays` (MIN_WAVES, MIN_K) that make
one step of all of the files' models fastest, with each shape at its fp8 or fp16 time as the rule picks.

The whole UNet step, lossless against fp8 on every GEMM and fp8 by the rule (compiled, CUDA graph), with its
error against float32:
`python bench/unet_step.py --model sdxl --variants inductor-gn-silu-geglu,fp8-all,fp8-rule --error`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

from gemm_shapes import shape_rows, time_calls  # bench/, the script's own folder

WAVES = (0, 0.25, 0.5, 1, 2, 4, 8)
MIN_KS = (0, 320, 640, 1280, 2560)


def time_shape(m: int, k: int, n: int, bias: bool) -> dict:
    """fp16 against fp8 for one (M, K, N, bias), both compiled by Inductor, in microseconds; fp8's error."""
    import torch
    import torch.nn.functional as F

    from diffjet.passes import fp8

    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=g)
    w = torch.randn(n, k, device="cuda", dtype=torch.float16, generator=g) / k**0.5
    b = torch.randn(n, device="cuda", dtype=torch.float16, generator=g) if bias else None
    w_fp8, w_scale = fp8.quantize_rows(w)
    w_scale = w_scale.view(1, -1).contiguous()
    out = fp8.output_dtype(x.device, x.dtype)

    def fp16_linear(x, w, b):
        return F.linear(x, w, b)

    def fp8_linear(x, w_fp8, w_scale, b):
        return fp8.fp8_linear(x, w_fp8, w_scale, b, out)

    def fp8_gemm(q, scale, w_fp8, w_scale, b):
        return torch._scaled_mm(q, w_fp8.t(), scale_a=scale, scale_b=w_scale,
                                bias=None if b is None else b.to(out), out_dtype=out, use_fast_accum=True)

    start = time.perf_counter()
    compiled_fp16 = torch.compile(fp16_linear, dynamic=False)
    compiled_fp8 = torch.compile(fp8_linear, dynamic=False)
    compiled_gemm = torch.compile(fp8_gemm, dynamic=False)
    q, scale = fp8.quantize_rows(x)
    want = compiled_fp16(x, w, b)
    got = compiled_fp8(x, w_fp8, w_scale, b)
    compiled_gemm(q, scale, w_fp8, w_scale, b)
    compile_s = time.perf_counter() - start
    fp16_us = time_calls(lambda: compiled_fp16(x, w, b))
    fp8_us = time_calls(lambda: compiled_fp8(x, w_fp8, w_scale, b))
    gemm_us = time_calls(lambda: compiled_gemm(q, scale, w_fp8, w_scale, b))
    error = ((got.float() - want.float()).norm() / want.float().norm()).item()
    flop = 2 * m * k * n
    return {"fp16_us": round(fp16_us, 2), "fp8_us": round(fp8_us, 2), "fp8_gemm_us": round(gemm_us, 2),
            "speedup": round(fp16_us / fp8_us, 3), "relative_error": round(error, 5), "compile_s": round(compile_s, 1),
            "fp16_tflops": round(flop / fp16_us / 1e6, 1), "fp8_tflops": round(flop / fp8_us / 1e6, 1),
            "out_dtype": str(out).removeprefix("torch.")}


def step_us(rows: list[dict], choose) -> float:
    """One step's GEMM time with each shape at its fp8 time where `choose(row)`, else its fp16 time."""
    return sum(r["calls"] * (r["fp8_us"] if choose(r) else r["fp16_us"]) for r in rows)


def fit(paths: list[str]) -> None:
    """Print, per GPU, the (MIN_WAVES, MIN_K) of `fp8.pays` that make the files' steps fastest."""
    from diffjet.passes import fp8

    by_device: dict[tuple[str, int], list[tuple[str, list[dict]]]] = {}
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        timed = [r for r in report["gemms"] if "fp8_us" in r]
        by_device.setdefault((report["device"], report["sms"]), []).append((report["model"], timed))
    for (device, sms), models in by_device.items():
        def total(waves, min_k):
            def choose(r):
                return -(-r["m"] // 128) * -(-r["n"] // 128) >= waves * sms and r["k"] >= min_k
            return sum(step_us(rows, choose) for _, rows in models)

        grid = sorted((total(w, k), w, k) for w, k in itertools.product(WAVES, MIN_KS))
        best_us, waves, min_k = grid[0]
        all_fp16 = sum(step_us(rows, lambda r: False) for _, rows in models)
        all_fp8 = sum(step_us(rows, lambda r: True) for _, rows in models)
        per_shape = sum(step_us(rows, lambda r: r["fp8_us"] < r["fp16_us"]) for _, rows in models)
        now = total(fp8.MIN_WAVES, fp8.MIN_K)
        print(f"{device} ({sms} SMs), {', '.join(m for m, _ in models)}: GEMM µs per step summed over the models")
        print(f"  fp16 {all_fp16:.0f}, fp8 everywhere {all_fp8:.0f}, best per shape {per_shape:.0f}")
        print(f"  rule now (MIN_WAVES={fp8.MIN_WAVES}, MIN_K={fp8.MIN_K}) {now:.0f}; "
              f"best rule: MIN_WAVES={waves}, MIN_K={min_k} {best_us:.0f}")
        print("  next best: " + ", ".join(f"({w}, {k}) {t:.0f}" for t, w, k in grid[1:6]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes-only", action="store_true", help="list the shapes, time nothing")
    parser.add_argument("--fit", nargs="+", metavar="JSON", help="fit the rule's constants to result files")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.fit:
        fit(args.fit)
        return

    import torch

    from diffjet.kernels.geglu import multiprocessors
    from diffjet.passes import fp8

    sms = multiprocessors(torch.device(args.device))
    rows = shape_rows(args.model, args.batch, args.device, None if args.shapes_only else time_shape,
                      annotate=lambda m, k, n, bias: {"pays": fp8.pays(m, k, n, sms)})

    print(f"{'M':>6} {'K':>5} {'N':>5} bias calls pays  fp16 µs   fp8 µs  gemm µs  speed-up  error")
    for r in rows:
        timed = (f"{r['fp16_us']:8.2f} {r['fp8_us']:8.2f} {r['fp8_gemm_us']:8.2f} {r['speedup']:8.2f}x  "
                 f"{r['relative_error']:.4f}" if "fp8_us" in r else r.get("error", ""))
        print(f"{r['m']:6} {r['k']:5} {r['n']:5} {str(r['bias'])[0]:>4} {r['calls']:5} {str(r['pays'])[0]:>4}  {timed}")
    timed = [r for r in rows if "fp8_us" in r]
    total = {}
    if timed:
        total = {"fp16_us": step_us(timed, lambda r: False), "fp8_all_us": step_us(timed, lambda r: True),
                 "fp8_rule_us": step_us(timed, lambda r: r["pays"]),
                 "best_us": step_us(timed, lambda r: r["fp8_us"] < r["fp16_us"])}
        total = {key: round(value, 1) for key, value in total.items()}
        print("GEMM time per step: "
              + ", ".join(f"{key.removesuffix('_us')} {v / 1000:.3f} ms" for key, v in total.items()))
    if args.json:
        from diffjet.bench import environment

        report = {**environment(args.device), "command": "python " + " ".join(sys.argv), "model": args.model,
                  "batch": args.batch, "sms": sms, "rule": {"MIN_WAVES": fp8.MIN_WAVES, "MIN_K": fp8.MIN_K},
                  "gemms": rows, "total": total}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
