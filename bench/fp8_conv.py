"""Would an fp8 3×3 convolution of diffjet's own pay? A UNet step's convolutions: cuDNN fp16 against a Triton
implicit GEMM on fp16 and on e4m3 inputs.

    TRITON_INTERPRET=1 python bench/fp8_conv.py --check                 # the kernel against its reference, CPU
    python bench/fp8_conv.py --model tiny --device cpu --shapes-only    # the shapes only
    python bench/fp8_conv.py --model sdxl --json fp8-conv-sdxl.json     # GPU

Why: with `Config.fp8` on, SDXL's 3×3 convolutions stay in cuDNN fp16 (4.8 ms of a 28 ms step, about 680
TFLOP/s), and PyTorch 2.11 has no fp8 convolution; they are the largest part of the step fp8 does not reach.

The kernel is diffjet's (`diffjet/kernels/conv3x3_fp8.py`, used with `Config(fp8="max")`): an implicit GEMM over a
channels-last input, here also on fp16 inputs, with one e4m3 scale for the whole tensor or one per input pixel
(each tap's sums rescaled by its pixels' scales before they join the accumulator), or on the fp16 input
quantized as it is loaded. What it showed (bench/results/fp8-conv-sdxl-h200-2026-12-02.json) decided the
product's form: e4m3 with one scale per image, written by the GroupNorm+SiLU kernel before it.

Per shape (each 3×3 convolution of one step of the preset's UNet at its native size, one image's batch, with its
count), replayed from CUDA graphs: cuDNN fp16 channels-last (what diffjet runs now), the kernel on fp16 inputs
and on e4m3 inputs with one scale or one per pixel, or on the fp16 input quantized as it is loaded (one scale
a producer would hand over; the best of a few tile settings each), the input's
quantization alone (one scale; its amax and cast as plain torch ops: what a producer kernel would have to
absorb), and relative errors against float32. Totals are
weighted by calls per step.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

import torch
import torch.nn.functional as F

from diffjet.kernels import INTERPRET
from diffjet.kernels import conv3x3_fp8 as cv
from diffjet.kernels.conv3x3_fp8 import gemm_weight, triton_e4m3
from diffjet.passes.fp8 import quantize_rows
from diffjet.quality import relative_error

#: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages); a setting whose BLOCK_K does not divide C_in is skipped.
SETTINGS_FP8 = [(128, 128, 128, 8, 8, 3), (128, 128, 64, 8, 4, 4), (128, 256, 128, 8, 8, 3), (256, 128, 128, 8, 8, 3),
                (128, 128, 128, 8, 4, 4), (128, 128, 64, 8, 8, 4)]
#: What `time_shape` times, each as `{name}_us` (and, for the kernels, `{name}_setting` and `{name}_error`).
TIMED = ("cudnn", "fp16", "fp8", "fp8_pixel", "fp8_in_kernel")
SETTINGS_FP16 = [(128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 4, 4), (128, 256, 64, 8, 8, 3), (128, 128, 32, 8, 4, 4)]

def quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x as e4m3 with one float32 scale for the whole tensor (the fp8 pass's rows, one row), given once per image
    as the kernel takes it: x ≈ q · scale[n]."""
    q, scale = quantize_rows(x.reshape(1, -1))
    return q.view(x.shape), scale.reshape(1).expand(x.shape[0]).contiguous()


def quantize_pixels(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A channels-last NCHW x as e4m3 with one float32 scale per pixel (N·H·W of them, over its C channels)."""
    q, scale = quantize_rows(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]))
    return q.view(x.shape[0], x.shape[2], x.shape[3], -1).permute(0, 3, 1, 2), scale.view(-1)


def quantize_channels(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (CO, ...) weight as e4m3 with one float32 scale per output channel."""
    q, scale = quantize_rows(weight.reshape(weight.shape[0], -1))
    return q.view(weight.shape), scale.view(-1)


def conv3x3(x, w_gemm, bias, stride, *, setting=SETTINGS_FP8[0], **scales):
    """diffjet's kernel (`diffjet.kernels.conv3x3_fp8.run`) with one tile setting."""
    return cv.run(x, w_gemm, bias, stride, setting, **scales)


def reference_fp8(q, x_scale, w8, w_scale, bias, stride):
    """What the e4m3 kernel computes, in float32 (`diffjet.kernels.conv3x3_fp8.reference`)."""
    return cv.reference(q, x_scale, gemm_weight(w8), w_scale, bias, torch.float32, stride)


def inputs(n, c, h, w, co, bias, device, dtype=torch.float16, seed=0):
    """Seeded (x channels-last, weight (CO, C, 3, 3), bias): x as a GroupNorm+SiLU output would be (SiLU of a
    standard normal), the weight at PyTorch's default scale."""
    g = torch.Generator().manual_seed(seed)
    x = F.silu(torch.randn(n, c, h, w, generator=g)).to(device, dtype).contiguous(memory_format=torch.channels_last)
    weight = ((torch.rand(co, c, 3, 3, generator=g) * 2 - 1) / (9 * c) ** 0.5).to(device, dtype)
    b = (torch.randn(co, generator=g) * 0.1).to(device, dtype) if bias else None
    return x, weight, b


def check() -> float:
    """The largest relative error of the kernel against `reference_fp8` (e4m3) and against float32 F.conv2d (fp16
    inputs) over small shapes: odd sizes, both strides, two channel blocks per tap, tiles the output does not fill."""
    device = "cpu" if INTERPRET else "cuda"
    worst = 0.0
    for (n, c, h, w, co, stride, bias) in [(1, 64, 5, 7, 24, 1, True), (2, 64, 6, 6, 40, 2, False),
                                           (1, 32, 9, 4, 16, 1, False)]:
        x, weight, b = inputs(n, c, h, w, co, bias, device)
        setting = (32, 16, 32, 2, 4, 2)
        q, xs = quantize_tensor(x)
        w8, ws = quantize_channels(weight)
        got = conv3x3(q.contiguous(memory_format=torch.channels_last), gemm_weight(w8), b, stride, x_scale=xs,
                      w_scale=ws, setting=setting)
        e8 = relative_error(got.float(), reference_fp8(q, xs, w8, ws, b, stride))
        qp, xp = quantize_pixels(x)
        got = conv3x3(qp.contiguous(memory_format=torch.channels_last), gemm_weight(w8), b, stride, x_scale=xp,
                      w_scale=ws, setting=setting)
        e8p = relative_error(got.float(), reference_fp8(qp, xp, w8, ws, b, stride))
        got = conv3x3(x, gemm_weight(w8), b, stride, x_scale=xs, w_scale=ws, setting=setting)
        e8x = relative_error(got.float(), reference_fp8(triton_e4m3(x, xs), xs, w8, ws, b, stride))
        got16 = conv3x3(x, gemm_weight(weight), b, stride, setting=setting)
        e16 = relative_error(got16.float(), F.conv2d(x.float(), weight.float(), None if b is None else b.float(),
                                                     stride=stride, padding=1))
        print(f"  {n}×{c}×{h}×{w} → {co}, stride {stride}: e4m3 {e8:.2e}, per pixel {e8p:.2e}, "
              f"quantized in the kernel {e8x:.2e}, fp16 {e16:.2e}")
        worst = max(worst, e8, e8p, e8x, e16)
    return worst


def record_convs(unet, args, kwargs) -> collections.Counter:
    """(N, C, H, W, CO, stride, bias) → calls, for every 3×3 convolution with padding 1 that one forward makes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: collections.Counter = collections.Counter()

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):
            if getattr(func, "overloadpacket", None) is torch.ops.aten.convolution:
                x, w, bias, stride, padding = a[0], a[1], a[2], a[3], a[4]
                if tuple(w.shape[2:]) == (3, 3) and tuple(padding) == (1, 1) and a[8] == 1 and stride[0] == stride[1]:
                    seen[(*x.shape, w.shape[0], stride[0], bias is not None)] += 1
            return func(*a, **(kw or {}))

    with torch.no_grad(), Recorder():
        unet(*args, **kwargs)
    return seen


def time_shape(n, c, h, w, co, stride, bias) -> dict:
    """Microseconds per call: cuDNN fp16, the kernel on fp16 and on e4m3 inputs (best setting), the quantization."""
    from gemm_shapes import time_calls  # bench/, the script's own folder

    x, weight, b = inputs(n, c, h, w, co, bias, "cuda")
    exact = F.conv2d(x.float(), weight.float(), None if b is None else b.float(), stride=stride, padding=1)
    w_cl = weight.contiguous(memory_format=torch.channels_last)
    row = {"cudnn_us": round(time_calls(lambda: F.conv2d(x, w_cl, b, stride=stride, padding=1)), 2),
           "cudnn_error": relative_error(F.conv2d(x, w_cl, b, stride=stride, padding=1).float(), exact)}
    q, xs = quantize_tensor(x)
    q = q.contiguous(memory_format=torch.channels_last)
    w8, ws = quantize_channels(weight)
    row["quantize_us"] = round(time_calls(lambda: quantize_tensor(x)), 2)
    w16, w8g = gemm_weight(weight), gemm_weight(w8)
    qp, xp = quantize_pixels(x)
    qp = qp.contiguous(memory_format=torch.channels_last)
    kernels = {"fp16": (SETTINGS_FP16, lambda s: conv3x3(x, w16, b, stride, setting=s)),
               "fp8": (SETTINGS_FP8, lambda s: conv3x3(q, w8g, b, stride, x_scale=xs, w_scale=ws, setting=s)),
               "fp8_pixel": (SETTINGS_FP8, lambda s: conv3x3(qp, w8g, b, stride, x_scale=xp, w_scale=ws, setting=s)),
               "fp8_in_kernel": (SETTINGS_FP8, lambda s: conv3x3(x, w8g, b, stride, x_scale=xs, w_scale=ws, setting=s))}
    for name, (settings, run) in kernels.items():
        best = None
        for setting in (s for s in settings if c % s[2] == 0):
            try:
                us = time_calls(lambda: run(setting))  # noqa: B023 - called before the loop moves on
            except Exception as exc:  # noqa: BLE001 - a setting that does not compile (shared memory) is skipped
                print(f"    {name} {setting}: {type(exc).__name__}", file=sys.stderr)
                continue
            if best is None or us < best[0]:
                best = (us, setting)
        if best is not None:
            row[f"{name}_us"], row[f"{name}_setting"] = round(best[0], 2), best[1]
            row[f"{name}_error"] = relative_error(run(best[1]).float(), exact)
    flop = 2 * n * ((h - 1) // stride + 1) * ((w - 1) // stride + 1) * co * 9 * c
    row.update({f"{k}_tflops": round(flop / row[f"{k}_us"] / 1e6, 1) for k in TIMED if f"{k}_us" in row})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sdxl")
    parser.add_argument("--batch", type=int, help="the UNet's batch (default 2: one image with CFG)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--check", action="store_true", help="the kernel against its references on small shapes")
    parser.add_argument("--shapes-only", action="store_true", help="list the shapes, time nothing")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.check:
        error = check()
        print(f"fp8 3×3 convolution kernel: largest relative error {error:.2e}")
        sys.exit(0 if error < 2e-3 else 1)
    from diffjet.models import PRESETS

    from unet_step import prepared, step_inputs  # bench/, the script's own folder

    unet, inputs_args, kwargs = step_inputs(args.model, PRESETS[args.model].height, args.batch or 2, args.device)
    shapes = record_convs(prepared(unet, "unet"), inputs_args, kwargs)
    del unet
    rows = []
    for (n, c, h, w, co, stride, bias), calls in sorted(shapes.items(), key=lambda kv: -kv[1] * kv[0][1]
                                                        * kv[0][2] * kv[0][3] * kv[0][4] / kv[0][5] ** 2):
        row = {"n": n, "c": c, "h": h, "w": w, "co": co, "stride": stride, "bias": bias, "calls": calls}
        if not args.shapes_only:
            try:
                row.update(time_shape(n, c, h, w, co, stride, bias))
            except Exception as exc:  # noqa: BLE001 - one shape's failure is reported, the rest still run
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    total = {k: round(sum(r[f"{k}_us"] * r["calls"] for r in rows if f"{k}_us" in r) / 1000, 3)
             for k in (*TIMED, "quantize")}
    print(f"{'N':>2} {'C':>5} {'H×W':>9} {'CO':>5} s calls  cuDNN µs  fp16 µs   fp8 µs  pixel µs  in-kernel"
          "  quant µs  fp8 error  per pixel")
    for r in rows:
        print(f"{r['n']:2} {r['c']:5} {r['h']:4}×{r['w']:<4} {r['co']:5} {r['stride']} {r['calls']:5}  "
              + "  ".join(f"{r.get(k + '_us', float('nan')):7.2f}" for k in (*TIMED, "quantize"))
              + f"  {r.get('fp8_error', float('nan')):.2e}  {r.get('fp8_pixel_error', float('nan')):.2e}"
              + (f"  {r['error']}" if "error" in r else ""))
    print(f"a step's 3×3 convolutions: cuDNN fp16 {total['cudnn']} ms, kernel fp16 {total['fp16']} ms, "
          f"kernel fp8 {total['fp8']} ms (+ quantization alone {total['quantize']} ms), per-pixel scales "
          f"{total['fp8_pixel']} ms, quantized as loaded {total['fp8_in_kernel']} ms")
    if args.json:
        from diffjet.bench import environment

        report = {**environment(args.device), "command": "python " + " ".join(sys.argv), "model": args.model,
                  "convolutions": rows, "total_ms": total}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
