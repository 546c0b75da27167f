"""diffjet's GEGLU projection kernel alone, over every GEGLU call of one UNet step, against Inductor.

    python bench/geglu_op.py --model sdxl --json geglu-op-sdxl.json
    python bench/geglu_op.py --model sd15 --blocks 128,64,64,8,8,3/128,128,64,8,8,3
    python bench/geglu_op.py --model sdxl --fp8 --json geglu-fp8-op-sdxl.json

Records the input of every diffusers `GEGLU` in one forward of the preset's UNet (fp16, channels-last,
fused-QKV SDPA), then times all of those calls replayed from one CUDA graph: Inductor's code for diffusers'
`GEGLU.forward` (the projection on cuBLAS, `h * gelu(g)` in a Triton kernel; compiled per shape) against
`diffjet::geglu` with each tile setting given, over all calls and over each shape's calls alone. A setting is
(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages[, programs per SM]). Each result's error against
float32 is printed beside the eager half-precision module's.

With `--fp8` the same calls run on e4m3 inputs (`Config.fp8`): each input quantized per row and each weight
per output channel beforehand (inside a UNet that quantization is fused into the kernel that writes the
input), then `torch._scaled_mm` alone (the projection without its gate: the floor), the unfused fp8 path
(`_scaled_mm`, then Inductor's gate) and `diffjet::geglu_fp8` with each tile setting. Errors are against
the unfused computation in float32 on the same e4m3 values (`geglu.reference_fp8`). `--one-dot` adds the
experimental layout of `bench/geglu_one_dot.py` (one wide `tl.dot` for both halves).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from group_norm_op import time_graph  # bench/, the script's own folder
from unet_step import prepared_unet, unet_inputs

DEFAULT_SETTINGS = "128,128,64,8,8,3/128,128,64,16,8,3/128,128,64,8,8,4/128,64,64,8,4,3"
ONE_DOT_SETTINGS = "128,128,128,8,8,3/128,128,128,8,8,4/128,64,128,8,4,4"
FP8_SETTINGS = ("128,128,128,8,8,3/128,128,128,8,8,4/128,128,128,16,8,3/128,64,128,8,4,4/128,64,256,8,4,3/"
                "64,128,128,8,4,4/128,128,64,8,8,4/256,64,128,8,8,3")


def record_calls(model: str):
    """Every GEGLU call of one UNet step at the preset's size: (input, weight, bias)."""
    from diffusers.models.activations import GEGLU

    from diffjet.models import PRESETS

    unet = prepared_unet(model)
    calls = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: calls.append((args[0].clone(), mod.proj.weight,
                                                                         mod.proj.bias)))
             for m in unet.modules() if type(m) is GEGLU]
    sample, states, kwargs = unet_inputs(unet, PRESETS[model].height, 2)
    with torch.no_grad():
        unet(sample, torch.tensor(999.0, device="cuda"), states, return_dict=False, **kwargs)
    for hook in hooks:
        hook.remove()
    return calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="sdxl")
    parser.add_argument("--blocks", help="tile settings, '/'-separated (default: a list for each dtype)")
    parser.add_argument("--fp8", action="store_true", help="e4m3 inputs: diffjet::geglu_fp8 against _scaled_mm")
    parser.add_argument("--one-dot", default=ONE_DOT_SETTINGS, help="with --fp8: tile settings of the experimental "
                        "one-dot layout (bench/geglu_one_dot.py), '/'-separated; empty: none")
    parser.add_argument("--json")
    args = parser.parse_args()
    args.blocks = args.blocks or (FP8_SETTINGS if args.fp8 else DEFAULT_SETTINGS)

    from diffjet.bench import environment
    from diffjet.kernels import geglu as gg

    calls = record_calls(args.model)
    call_shapes = [(tuple(x.shape), tuple(w.shape)) for x, w, _ in calls]
    shapes = sorted(set(call_shapes))
    print(f"{len(calls)} GEGLU calls, shapes {shapes}", file=sys.stderr)

    def geglu_forward(x, w, b):  # diffusers' GEGLU.forward
        hidden, gate = F.linear(x, w, b).chunk(2, dim=-1)
        return hidden * F.gelu(gate)

    compiled = torch.compile(geglu_forward, dynamic=False)
    with torch.no_grad():
        if args.fp8:
            calls, references, baseline, variants = fp8_calls(calls)
        else:
            references = [gg.reference(x.float(), w.float(), b.float()) for x, w, b in calls]
            baseline = max(float((geglu_forward(x, w, b).float() - r).norm() / r.norm())
                           for (x, w, b), r in zip(calls, references))
            variants = [("inductor", compiled)] + [
                (f"diffjet {setting}", lambda x, w, b, blocks=_blocks(setting): gg.launch(x, w, b, blocks=blocks))
                for setting in args.blocks.split("/")]

        def max_error(outputs):  # None for the projection alone, which writes both halves
            if any(y.numel() != r.numel() for y, r in zip(outputs, references)):
                return None
            return max(float((y.float().view_as(r) - r).norm() / r.norm()) for y, r in zip(outputs, references))

        by_shape = {shape: [c for c, s in zip(calls, call_shapes) if s == shape] for shape in shapes}

        def timed(variant, op):
            """Time `op` over all calls (and its error), then over each shape's calls alone."""
            try:
                ms, outputs = time_graph(lambda: [op(x, w, b) for x, w, b in calls])
                per_shape = [time_graph(lambda: [op(x, w, b) for x, w, b in group])[0] for group in by_shape.values()]
            except Exception as exc:  # noqa: BLE001 - a setting that does not compile is reported, not fatal
                return {"variant": variant, "error": f"{type(exc).__name__}: {exc}"[:300]}
            return {"variant": variant, "ms": ms, "ms_by_shape": per_shape, "max_error": max_error(outputs)}

        if args.fp8:
            variants = variants + [
                (f"diffjet fp8 {setting}", lambda x, w, b, blocks=_blocks(setting): gg.launch_fp8(
                    *x, *w, b, torch.float16, blocks=blocks))
                for setting in args.blocks.split("/")] + one_dot_variants(calls, args.one_dot)
        rows = [timed(name, op) for name, op in variants]
    print(f"max error of {'the unfused fp8 path' if args.fp8 else 'eager fp16'}: {baseline:.2e}; shapes (calls): "
          + ", ".join(f"{s[0]}x{s[1][0]} ({len(g)})" for s, g in by_shape.items()))
    print(f"{'variant':30} {'ms':>7} {'error':>8}  ms by shape")
    for r in rows:
        error = "" if r.get("max_error") is None else f"{r['max_error']:.2e}"
        print(f"{r['variant']:30} " + (f"{r['ms']:7.3f} {error:>8}  "
                                       + " ".join(f"{v:7.3f}" for v in r["ms_by_shape"]) if "ms" in r
                                       else r["error"]))
    if args.json:
        report = {**environment("cuda"), "command": "python " + " ".join(sys.argv), "model": args.model,
                  "inputs": "e4m3, quantized beforehand" if args.fp8 else "float16",
                  "calls": len(calls), "shapes": [list(map(list, s)) for s in shapes],
                  ("unfused_fp8_max_error" if args.fp8 else "eager_fp16_max_error"): baseline, "results": rows}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


def _blocks(setting: str) -> tuple[int, ...]:
    return tuple(int(v) for v in setting.split(","))


def one_dot_variants(calls8, settings: str) -> list:
    """bench/geglu_one_dot.py's kernel for each tile setting, on the fp8 calls' weights reordered beforehand."""
    import geglu_one_dot as one  # bench/, the script's own folder

    variants = []
    for setting in filter(None, settings.split("/")):
        blocks = _blocks(setting)
        reordered = {id(w[0]): tuple(None if t is None else one.interleave(t, blocks[1]) for t in (*w, b))
                     for _, w, b in calls8}

        def op(x, w, b, blocks=blocks, reordered=reordered):
            return one.launch(*x, *reordered[id(w[0])], torch.float16, blocks)

        variants.append((f"one-dot fp8 {setting}", op))
    return variants


def fp8_calls(calls):
    """The calls on e4m3 values, as `(q, x_scale), (weight_fp8, weight_scale), bias`, their float32 references
    (`geglu.reference_fp8`), the unfused fp8 path's largest error, and the two fp8 baselines to time."""
    from diffjet.kernels import geglu as gg
    from diffjet.passes.fp8 import quantize_rows

    def quantized(x, w, b):
        q, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
        w8, w_scale = quantize_rows(w)
        return (q.view(*x.shape), x_scale.reshape(-1).contiguous()), (w8, w_scale.reshape(-1).contiguous()), b

    def projection(x, w, b):  # the GEMM alone: the floor for any fused kernel
        q, x_scale = x
        w8, w_scale = w
        return torch._scaled_mm(q.reshape(-1, q.shape[-1]), w8.t(), scale_a=x_scale.view(-1, 1),
                                scale_b=w_scale.view(1, -1), bias=b, out_dtype=torch.float16, use_fast_accum=True)

    def unfused(x, w, b):  # the fp8 pass without the kernel: _scaled_mm, then Inductor's gate
        hidden, gate = projection(x, w, b).chunk(2, dim=-1)
        return hidden * F.gelu(gate)

    calls8 = [quantized(x, w, b) for x, w, b in calls]
    references = [gg.reference_fp8(*x, *w, b.float(), torch.float32) for x, w, b in calls8]
    compiled = torch.compile(unfused, dynamic=False)
    baseline = max(float((compiled(x, w, b).float().view_as(r) - r).norm() / r.norm())
                   for (x, w, b), r in zip(calls8, references))
    return calls8, references, baseline, [("scaled_mm alone", projection), ("unfused fp8", compiled)]


if __name__ == "__main__":
    main()
