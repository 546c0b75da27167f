"""diffjet's GEGLU projection kernel alone, over every GEGLU call of one UNet step, against Inductor.

    python bench/geglu_op.py --model sdxl --json geglu-op-sdxl.json
    python bench/geglu_op.py --model sd15 --blocks 128,64,64,8,8,3/128,128,64,8,8,3

Records the input of every diffusers `GEGLU` in one forward of the preset's UNet (fp16, channels-last,
fused-QKV SDPA), then times all of those calls replayed from one CUDA graph: Inductor's code for diffusers'
`GEGLU.forward` (the projection on cuBLAS, `h * gelu(g)` in a Triton kernel; compiled per shape) against
`diffjet::geglu` with each tile setting given, over all calls and over each shape's calls alone. A setting is
(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages). Each result's error against float32 is printed
beside the eager half-precision module's.
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
    parser.add_argument("--blocks", default=DEFAULT_SETTINGS, help="tile settings, '/'-separated")
    parser.add_argument("--json")
    args = parser.parse_args()

    from diffjet.bench import environment
    from diffjet.kernels import geglu as gg

    calls = record_calls(args.model)
    shapes = sorted({(tuple(x.shape), tuple(w.shape)) for x, w, _ in calls})
    print(f"{len(calls)} GEGLU calls, shapes {shapes}", file=sys.stderr)

    def geglu_forward(x, w, b):  # diffusers' GEGLU.forward
        hidden, gate = F.linear(x, w, b).chunk(2, dim=-1)
        return hidden * F.gelu(gate)

    compiled = torch.compile(geglu_forward, dynamic=False)
    with torch.no_grad():
        references = [gg.reference(x.float(), w.float(), b.float()) for x, w, b in calls]
        baseline = max(float((geglu_forward(x, w, b).float() - r).norm() / r.norm())
                       for (x, w, b), r in zip(calls, references))

        def max_error(outputs):
            return max(float((y.float() - r).norm() / r.norm()) for y, r in zip(outputs, references))

        by_shape = {shape: [c for c in calls if (tuple(c[0].shape), tuple(c[1].shape)) == shape] for shape in shapes}

        def timed(variant, op):
            """Time `op` over all calls (and its error), then over each shape's calls alone."""
            try:
                ms, outputs = time_graph(lambda: [op(x, w, b) for x, w, b in calls])
                per_shape = [time_graph(lambda: [op(x, w, b) for x, w, b in group])[0] for group in by_shape.values()]
            except Exception as exc:  # noqa: BLE001 - a setting that does not compile is reported, not fatal
                return {"variant": variant, "error": f"{type(exc).__name__}: {exc}"[:300]}
            return {"variant": variant, "ms": ms, "ms_by_shape": per_shape, "max_error": max_error(outputs)}

        rows = [timed("inductor", compiled)]
        for setting in args.blocks.split("/"):
            blocks = tuple(int(v) for v in setting.split(","))
            rows.append(timed(f"diffjet {setting}", lambda x, w, b, blocks=blocks: gg.launch(x, w, b, blocks=blocks)))
    print(f"max error of eager fp16: {baseline:.2e}; shapes (calls): "
          + ", ".join(f"{s[0]}x{s[1][0]} ({len(g)})" for s, g in by_shape.items()))
    print(f"{'variant':30} {'ms':>7} {'error':>8}  ms by shape")
    for r in rows:
        print(f"{r['variant']:30} " + (f"{r['ms']:7.3f} {r['max_error']:8.2e}  "
                                       + " ".join(f"{v:7.3f}" for v in r["ms_by_shape"]) if "ms" in r
                                       else r["error"]))
    if args.json:
        report = {**environment("cuda"), "command": "python " + " ".join(sys.argv), "model": args.model,
                  "calls": len(calls), "shapes": [list(map(list, s)) for s in shapes],
                  "eager_fp16_max_error": baseline, "results": rows}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
