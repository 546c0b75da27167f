"""The GEMMs of one denoiser step, by shape: cuBLAS against Inductor's best Triton template for each shape.

    python bench/gemm_shapes.py --model sd15 --json gemm-shapes-sd15.json          # GPU: shapes and timings
    python bench/gemm_shapes.py --model flux-dev --top 12 --json gemm-shapes-flux-dev.json
    python bench/gemm_shapes.py --model tiny --device cpu --shapes-only            # CPU: the shapes only

Runs the preset's denoiser once (a UNet, or a DiT's transformer on its pipeline's own inputs) with diffjet's
passes (half precision on CUDA: fp16 for a UNet, bf16 for a DiT; a UNet's channels-last; fused-QKV SDPA) and records
every matrix product it makes: `addmm`/`mm` (linear layers) and 1×1 convolutions, which Inductor lowers to
GEMMs (`conv_1x1_as_mm`). For each distinct (M, K, N, bias) it then times, replayed from a CUDA graph:
`torch.addmm`/`torch.mm` (cuBLAS, what the compiled UNet calls today), and the same product compiled by
Inductor with `max_autotune` restricted to its Triton templates. The sum over calls of the difference is what
autotuned GEMMs could take off a step, without the hour of whole-UNet autotuning
(`bench/results/unet-step-sd15-autotune-mm-h100-2026-11-27.json` did not finish compiling in about 430 s).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
import time


def record_gemms(unet, args, kwargs) -> collections.Counter:
    """(M, K, N, bias) → calls, for every addmm/mm and 1×1 convolution that one forward of `unet` makes."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    seen: collections.Counter = collections.Counter()

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):
            kw = kw or {}
            packet = getattr(func, "overloadpacket", None)
            if packet is aten.addmm:
                bias, x, w = a[0], a[1], a[2]
                seen[(x.shape[0], x.shape[1], w.shape[1], True)] += 1
            elif packet is aten.mm:
                x, w = a[0], a[1]
                seen[(x.shape[0], x.shape[1], w.shape[1], False)] += 1
            elif packet is aten.convolution:
                x, w, bias = a[0], a[1], a[2]
                if tuple(w.shape[2:]) == (1, 1) and all(s == 1 for s in a[3]) and all(p == 0 for p in a[4]):
                    n, c, h, wd = x.shape
                    seen[(n * h * wd, c, w.shape[0], bias is not None)] += 1
            return func(*a, **kw)

    with torch.no_grad(), Recorder():
        unet(*args, **kwargs)
    return seen


def step_gemms(model: str, batch: int, device: str) -> list[tuple[tuple[int, int, int, bool], int]]:
    """((M, K, N, bias), calls) of one step of the preset's denoiser with diffjet's passes at the preset's
    size, the most FLOPs per step first."""
    from diffjet.models import PRESETS

    from unet_step import component, prepared, step_inputs  # bench/, the script's own folder

    denoiser, args, kwargs = step_inputs(model, PRESETS[model].height, batch, device)
    shapes = record_gemms(prepared(denoiser, component(model)), args, kwargs)
    return sorted(shapes.items(), key=lambda kv: -kv[1] * kv[0][0] * kv[0][1] * kv[0][2])


def shape_rows(model: str, batch: int, device: str, time_shape=None, top: int | None = None,
               annotate=lambda m, k, n, bias: {}) -> list[dict]:
    """A row per GEMM shape of one step (`step_gemms`): M, K, N, bias, calls, `annotate`'s facts, and
    `time_shape(m, k, n, bias)`'s results for the `top` shapes with the most FLOPs (all when None; none
    without `time_shape`). A shape whose timing fails records `error` and the others still run."""
    import torch

    rows = []
    for rank, ((m, k, n, bias), calls) in enumerate(step_gemms(model, batch, device)):
        row = {"m": m, "k": k, "n": n, "bias": bias, "calls": calls, **annotate(m, k, n, bias)}
        if time_shape is not None and (top is None or rank < top):
            try:
                row.update(time_shape(m, k, n, bias))
            except Exception as exc:  # noqa: BLE001 - one shape's failure is reported, the rest still run
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            torch._dynamo.reset()
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def time_calls(fn, reps: int = 20) -> float:
    """Microseconds per call of `fn`: `reps` calls captured in one CUDA graph, median replay over `reps`."""
    from group_norm_op import time_graph

    def run_all():
        for _ in range(reps):
            fn()

    ms, _ = time_graph(run_all)
    return ms * 1000 / reps


def time_shape(m: int, k: int, n: int, bias: bool, dtype=None) -> dict:
    """cuBLAS against Inductor's autotuned Triton templates for one (M, K, N, bias) in `dtype` (float16 when
    None), in microseconds."""
    import torch

    dtype = dtype or torch.float16
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)
    w = torch.randn(n, k, device="cuda", dtype=dtype, generator=g) / k**0.5
    b = torch.randn(n, device="cuda", dtype=dtype, generator=g) if bias else None

    def linear(x, w, b):
        return torch.nn.functional.linear(x, w, b)

    eager = time_calls(lambda: linear(x, w, b))
    start = time.perf_counter()
    import torch._inductor.config as inductor_config

    options = {"max_autotune_gemm": True, "max_autotune_gemm_backends": "TRITON", "autotune_fallback_to_aten": False}
    compiled = torch.compile(linear, dynamic=False,
                             options={k: v for k, v in options.items() if hasattr(inductor_config, k)})
    expected = linear(x, w, b)
    got = compiled(x, w, b)
    compile_s = time.perf_counter() - start
    error = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
    triton = time_calls(lambda: compiled(x, w, b))
    flop = 2 * m * k * n
    return {"cublas_us": round(eager, 2), "triton_us": round(triton, 2), "compile_s": round(compile_s, 1),
            "relative_error_vs_cublas": error, "cublas_tflops": round(flop / eager / 1e6, 1),
            "triton_tflops": round(flop / triton / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--batch", type=int, help="the denoiser's rows (default: one image's, 2 with CFG)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes-only", action="store_true", help="list the shapes, time nothing")
    parser.add_argument("--top", type=int, default=16, help="time only the shapes with the most FLOPs per step")
    parser.add_argument("--json")
    args = parser.parse_args()
    from diffjet.models import half_precision

    from unet_step import default_batch  # bench/, the script's own folder

    args.batch = args.batch or default_batch(args.model)
    timing = functools.partial(time_shape, dtype=half_precision(args.model))
    rows = shape_rows(args.model, args.batch, args.device, None if args.shapes_only else timing, args.top)
    timed = [r for r in rows if "triton_us" in r]
    total = {
        "shapes_timed": len(timed),
        "step_flop_share_timed": round(sum(2 * r["m"] * r["k"] * r["n"] * r["calls"] for r in timed)
                                       / sum(2 * r["m"] * r["k"] * r["n"] * r["calls"] for r in rows), 3),
        "cublas_us": round(sum(r["cublas_us"] * r["calls"] for r in timed), 1),
        "best_us": round(sum(min(r["cublas_us"], r["triton_us"]) * r["calls"] for r in timed), 1),
        "compile_s": round(sum(r["compile_s"] for r in timed), 1),
    }
    print(f"{'M':>6} {'K':>5} {'N':>5} bias calls  cuBLAS µs  Triton µs  compile s")
    for r in rows:
        print(f"{r['m']:6} {r['k']:5} {r['n']:5} {str(r['bias'])[0]:>4} {r['calls']:5}  "
              f"{r.get('cublas_us', float('nan')):9.2f}  {r.get('triton_us', float('nan')):9.2f}  "
              f"{r.get('compile_s', float('nan')):9.1f}" + (f"  {r['error']}" if "error" in r else ""))
    if timed:
        print(f"{len(timed)} shapes timed ({total['step_flop_share_timed']:.0%} of the step's GEMM FLOPs): "
              f"cuBLAS {total['cublas_us'] / 1000:.3f} ms, best per shape {total['best_us'] / 1000:.3f} ms, "
              f"Triton compile {total['compile_s']:.0f} s")
    if args.json:
        from diffjet.bench import environment

        report = {**environment(args.device), "command": "python " + " ".join(sys.argv), "model": args.model,
                  "batch": args.batch, "gemms": rows, "total": total}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
