"""UNet-step variants on the GPU, each in a fresh process: which compile options diffjet should use.

    python bench/unet_step.py --model sd15 --variants eager-graph,inductor,inductor-cdt --json out.json
    python bench/unet_step.py --model sd15 --variants inductor --profile --json profile.json
    python bench/unet_step.py --model sdxl --variants inductor-gn-silu-geglu,fp8-all,fp8-rule --error


Loads the preset's UNet (built once with random weights), applies diffjet's passes
(fp16, channels-last, fused-QKV SDPA), then compiles with the variant's Inductor options, captures the
step with diffjet's CudaGraphRunner and times replays with CUDA events (median of 100 after warm-up).
With --profile, also the kernel time of the replayed step by category (torch profiler, CUPTI sees the
kernels inside graph replays), the top kernels, and FLOPs by category with what each category achieves.
With --error, also the step's relative error against the float32 UNet, and that of the eager fp16 UNet.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

VARIANTS = {
    "eager-graph": None,
    "inductor-plain": {},
    "inductor": {"conv_1x1_as_mm": True},
    # Diffusers' speed-guide flags.
    "inductor-guide": {
        "conv_1x1_as_mm": True,
        "coordinate_descent_tuning": True,
        "epilogue_fusion": False,
        "coordinate_descent_check_all_directions": True,
    },
    "inductor-cdt": {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True},
    "inductor-benchmark": {"conv_1x1_as_mm": True, "__cudnn_benchmark": True},
    # diffjet's Triton GroupNorm(+shift)+SiLU kernels in every ResNet block (passes/kernels.py).
    "inductor-gn-silu": {"conv_1x1_as_mm": True, "__kernels": ("group_norm_silu",)},
    "eager-gn-silu-graph": {"__eager": True, "__kernels": ("group_norm_silu",)},
    # diffjet's default (kernels on) with cuDNN timing its convolution algorithms, or Inductor's coordinate descent.
    "inductor-gn-silu-benchmark": {"conv_1x1_as_mm": True, "__kernels": ("group_norm_silu",), "__cudnn_benchmark": True},
    "inductor-gn-silu-cdt": {"conv_1x1_as_mm": True, "__kernels": ("group_norm_silu",),
                             "coordinate_descent_tuning": True},
    # diffjet's GEGLU projection kernel on top of the GroupNorm kernel (diffjet's default).
    "inductor-gn-silu-geglu": {"conv_1x1_as_mm": True, "__kernels": ("group_norm_silu", "geglu")},
    "inductor-gn-silu-autotune-mm": {"conv_1x1_as_mm": True, "__kernels": ("group_norm_silu",),
                                     "max_autotune_gemm": True, "max_autotune_gemm_backends": "TRITON,ATEN",
                                     "max_autotune_conv_backends": "ATEN"},
    # GEMMs (and 1x1 convolutions lowered to GEMMs) autotuned against Triton templates; 3x3 convs stay cuDNN.
    "inductor-autotune-mm": {"conv_1x1_as_mm": True, "max_autotune_gemm": True,
                             "max_autotune_gemm_backends": "TRITON,ATEN", "max_autotune_conv_backends": "ATEN"},
    # diffjet's default with fp8 GEMMs (passes/fp8.py, lossy): where `fp8.pays`, or in every linear/1x1 layer.
    "fp8-rule": {"conv_1x1_as_mm": True, "__kernels": ("group_norm_silu", "geglu"), "__fp8": "rule"},
    "fp8-all": {"conv_1x1_as_mm": True, "__kernels": ("group_norm_silu", "geglu"), "__fp8": "all"},
}


def category(kernel: str) -> str:
    """The profile's categories, from a CUDA kernel's name (cuDNN, cuBLAS/nvjet, Inductor's Triton names).

    Inductor names a fused kernel after every op it holds (`triton_per_fused_add_clone_…_group_norm_silu`):
    a kernel with a norm in it is normalisation, other reductions too, templates are GEMMs, and the rest of
    Inductor's pointwise kernels are elementwise unless they only copy.
    """
    n = kernel.lower()
    if any(k in n for k in ("fmha", "flash", "attention", "sdpa", "attn")):
        return "attention"
    if n.startswith("triton_"):
        if n.startswith("triton_tem"):
            return "gemm"
        if any(k in n for k in ("norm", "var_mean")) or n.startswith(("triton_red", "triton_per")):
            return "normalisation"
        ops = set(n.split("fused_", 1)[-1].split("_")) - {""}
        if ops and ops <= {"clone", "cat", "copy", "view", "permute", "transpose", "convolution", "unsqueeze"} | {
                o for o in ops if o.isdigit()}:
            return "copies/layout"
        return "elementwise"
    if "group_norm" in n or "layer_norm" in n:  # diffjet's kernels, ATen's norms
        return "normalisation"
    if any(k in n for k in ("nchwtonhwc", "nhwctonchw", "transpose", "copy", "memcpy", "memset")):
        return "copies/layout"
    if any(k in n for k in ("conv", "fprop", "implicit", "winograd")):
        return "convolution"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk", "matmul")):
        return "gemm"
    if any(k in n for k in ("elementwise", "vectorized", "unrolled", "fill", "reduce")):
        return "elementwise"
    return "other"


def flops_by_category(unet, args, kwargs) -> dict:
    import collections

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        unet(*args, **kwargs)
    out = collections.Counter()
    for op, n in counter.get_flop_counts()["Global"].items():
        name = str(op)
        kind = ("convolution" if "convolution" in name else "attention" if "attention" in name
                else "gemm" if any(k in name for k in ("mm", "addmm", "bmm", "baddbmm")) else "other")
        out[kind] += n / 1e12
    return dict(out)


def kernel_profile(step, reps: int = 5) -> dict:
    import collections

    import torch
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    by_cat, by_kernel, calls = collections.Counter(), collections.Counter(), collections.Counter()
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", 0)
        if us <= 0:
            continue
        by_cat[category(event.key)] += us / reps / 1000
        by_kernel[event.key[:110]] += us / reps / 1000
        calls[event.key[:110]] += event.count / reps
    return {
        "kernel_ms": round(sum(by_cat.values()), 3),
        "kernels": int(sum(calls.values())),
        "by_category_ms": {k: round(v, 3) for k, v in by_cat.most_common()},
        "top": [{"kernel": k, "ms": round(v, 3), "calls": calls[k], "category": category(k)}
                for k, v in by_kernel.most_common(25)],
        "top_normalisation": [{"kernel": k, "ms": round(v, 3), "calls": calls[k]}
                              for k, v in by_kernel.most_common() if category(k) == "normalisation"][:15],
    }


def prepared_unet(model: str, device: str = "cuda", kernels: tuple[str, ...] = (), fp8: str | None = None):
    """The preset's UNet with diffjet's passes: fp16 (on CUDA; float32 elsewhere), channels-last, fused-QKV
    SDPA, `kernels` (diffjet's Triton kernels, `Config.kernels`), and with `fp8` "rule" or "all", fp8 GEMMs
    (`Config.fp8`) where `fp8.pays` or in every layer the pass converts."""
    import torch
    from diffusers import UNet2DConditionModel

    from diffjet.config import Config
    from diffjet.models import resolve
    from diffjet.passes import attention, memory_format, precision
    from diffjet.passes import fp8 as fp8_pass
    from diffjet.passes import kernels as kernel_pass

    dtype = torch.float16 if device == "cuda" else torch.float32
    unet = UNet2DConditionModel.from_pretrained(resolve(model), subfolder="unet", torch_dtype=dtype).to(device).eval()
    config = Config(kernels=kernels, fp8=fp8 is not None)
    if device == "cuda":
        precision.apply(unet, config)
    memory_format.apply(unet, config)
    attention.apply(unet, config)
    if fp8 is not None:
        fp8_pass.apply(unet, config)
        for layer in unet._diffjet_fp8_layers if fp8 == "all" else ():
            layer.sms = None  # no GPU to weigh: always fp8
    if kernels:
        kernel_pass.apply(unet, config)
    return unet


def unet_inputs(unet, height: int, batch: int, device: str = "cuda"):
    """Seeded half-precision UNet inputs at `height`² pixels: (latents, text states, further kwargs)."""
    import torch

    lat = height // 8
    g = torch.Generator(device).manual_seed(0)
    sample = torch.randn(batch, unet.config.in_channels, lat, lat, device=device, dtype=torch.float16, generator=g)
    states = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device, dtype=torch.float16, generator=g)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 1280, device=device, dtype=torch.float16, generator=g),
            "time_ids": torch.tensor([[height, height, 0, 0, height, height]] * batch, device=device,
                                     dtype=torch.float16),
        }
    return sample, states, kwargs


def step_errors(model: str, runner, inputs: tuple, kwargs: dict) -> dict:
    """The relative error of `runner`'s step, and of the eager fp16 UNet's, against the float32 UNet (TF32 off)."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils._pytree import tree_map

    from diffjet.models import resolve
    from diffjet.quality import relative_error

    with torch.no_grad():
        got = runner(*inputs, return_dict=False, **kwargs)[0].clone()
        fp16 = prepared_unet(model)(*inputs, return_dict=False, **kwargs)[0]
        torch.cuda.empty_cache()
        reference = UNet2DConditionModel.from_pretrained(resolve(model), subfolder="unet").to("cuda").eval()
        inputs32, kwargs32 = tree_map(lambda v: v.float() if torch.is_tensor(v) and v.is_floating_point() else v,
                                      (inputs, kwargs))
        flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            want = reference(*inputs32, return_dict=False, **kwargs32)[0]
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    return {"error_vs_fp32": relative_error(got, want), "eager_fp16_error_vs_fp32": relative_error(fp16, want)}


def run_one(model: str, variant: str, batch: int, size: int | None, profile: bool = False,
            error: bool = False) -> dict:
    import torch

    from diffjet.models import PRESETS
    from diffjet.passes import kernels as kernel_pass
    from diffjet.runtime.cuda_graph import CudaGraphRunner

    preset = PRESETS[model]
    options = dict(VARIANTS[variant]) if VARIANTS[variant] is not None else None
    cudnn_benchmark = bool(options and options.pop("__cudnn_benchmark", False))
    kernels = options.pop("__kernels", ()) if options else ()
    fp8 = options.pop("__fp8", None) if options else None
    unet = prepared_unet(model, kernels=kernels, fp8=fp8)
    if kernels:
        print("kernels placed:", kernel_pass.placements(unet), file=sys.stderr)
    if options and options.pop("__eager", False):
        options = None
    forward = type(unet).forward.__get__(unet)
    if options is not None:
        forward = torch.compile(forward, dynamic=False, options=options)
    runner = CudaGraphRunner(forward, torch.device("cuda"), name="unet", weights=list(unet.parameters()),
                             tensor_args=(1, "timestep"))
    height = size or preset.height
    sample, states, kwargs = unet_inputs(unet, height, batch)
    t = torch.tensor(999.0, device="cuda")
    torch.backends.cudnn.benchmark = cudnn_benchmark
    start = time.perf_counter()
    runner(sample, t, states, return_dict=False, **kwargs)
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    for _ in range(10):
        runner(sample, t, states, return_dict=False, **kwargs)
    times = []
    for _ in range(100):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        runner(sample, t, states, return_dict=False, **kwargs)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    # Back-to-back replays: the GPU time per step with the host running ahead, as in a pipeline.
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(50):
        runner(sample, t, states, return_dict=False, **kwargs)
    b.record()
    b.synchronize()
    result = {
        "model": model, "variant": variant, "batch": batch, "height": height,
        "ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times),
        "ms_pipelined": a.elapsed_time(b) / 50, "first_call_s": first,
        "captures": runner.stats.captures, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    if error:
        result.update(step_errors(model, runner, (sample, t, states), kwargs))
    if profile:
        result["profile"] = kernel_profile(lambda: runner(sample, t, states, return_dict=False, **kwargs))
        with torch.no_grad():
            flops = flops_by_category(unet, (sample, t, states), dict(return_dict=False, **kwargs))
        by_cat = result["profile"]["by_category_ms"]
        result["profile"]["tflop"] = {k: round(v, 4) for k, v in flops.items()}
        result["profile"]["tflop_per_s"] = {k: round(v / (by_cat[k] / 1000), 1) for k, v in flops.items()
                                            if by_cat.get(k)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int)
    parser.add_argument("--json")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per variant")
    parser.add_argument("--profile", action="store_true", help="kernel time by category and FLOPs")
    parser.add_argument("--error", action="store_true", help="the step's error against the float32 UNet")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.model, args.one, args.batch, args.size, args.profile, args.error)))
        return
    from diffjet.bench import environment
    from diffjet.models import resolve

    resolve(args.model)  # build the preset once, before the variants' processes load it
    report = {**environment("cuda"), "command": "python " + " ".join(sys.argv),
              "weights": "random (architecture-exact)", "runs": []}
    results = report["runs"]
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--one", variant]
        if args.size:
            cmd += ["--size", str(args.size)]
        if args.profile:
            cmd.append("--profile")
        if args.error:
            cmd.append("--error")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            error = proc.stderr.strip().splitlines()[-3:]
        except subprocess.TimeoutExpired:
            lines, error = [], f"timed out after {args.timeout} s"
        result = json.loads(lines[-1][7:]) if lines else {"model": args.model, "variant": variant, "error": error}
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
    print(f"{'model':6} {'variant':20} {'ms':>7} {'pipelined':>9} {'first s':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['model']:6} {r['variant']:20} failed: {r['error']}")
        else:
            print(f"{r['model']:6} {r['variant']:20} {r['ms']:7.2f} {r['ms_pipelined']:9.2f} {r['first_call_s']:8.1f}"
                  + (f"  error vs fp32 {r['error_vs_fp32']:.4f} (eager fp16 {r['eager_fp16_error_vs_fp32']:.4f})"
                     if "error_vs_fp32" in r else ""))


if __name__ == "__main__":
    main()
