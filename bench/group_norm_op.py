"""The GroupNorm(+shift)+SiLU op alone, over every call a UNet step makes, against Inductor's own code.

    python bench/group_norm_op.py --model sd21 --programs 0,256,512,1024 --json out.json

Runs the preset's UNet once in eager (fp16, channels-last, batch 2, diffjet's kernel pass) and records
the op's calls: input shape, groups, shift, SiLU. Then, for each way of running them, captures all the
calls in order in one CUDA graph and times its replays (CUDA events, median of 50): the op with
`stats_programs` set to each value of --programs (0: one statistics program per pixel tile), and the same
GroupNorm(+shift)+SiLU compiled by Inductor (one compiled function per call shape). Each result is
checked against the op's float32 reference.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys

import torch
import torch.nn.functional as F
from unet_step import prepared_unet, unet_inputs  # bench/, the script's own folder


def record_calls(model: str, batch: int) -> list[dict]:
    from diffjet.kernels import group_norm_silu as gn
    from diffjet.models import PRESETS

    unet = prepared_unet(model, kernels=("group_norm_silu",))
    calls, launch = [], gn.launch

    def recording(x, weight, bias, groups, eps, silu, shift=None, **kw):
        calls.append({"shape": list(x.shape), "groups": groups, "eps": eps, "silu": silu, "shift": shift is not None,
                      "affine": weight is not None})
        return launch(x, weight, bias, groups, eps, silu, shift, **kw)

    sample, states, kwargs = unet_inputs(unet, PRESETS[model].height, batch)
    gn.launch = recording
    try:
        with torch.no_grad():
            unet(sample.contiguous(memory_format=torch.channels_last), torch.tensor(999.0, device="cuda"), states,
                 return_dict=False, **kwargs)
    finally:
        gn.launch = launch
    del unet
    torch.cuda.empty_cache()
    return calls


def make_inputs(calls: list[dict]) -> list[tuple]:
    g = torch.Generator("cuda").manual_seed(1)
    out = []
    for call in calls:
        n, c, h, w = call["shape"]
        x = (torch.randn(n, c, h, w, device="cuda", generator=g) * 2 + 1).half().contiguous(memory_format=torch.channels_last)
        weight = torch.randn(c, device="cuda", generator=g).half() if call["affine"] else None
        bias = torch.randn(c, device="cuda", generator=g).half() if call["affine"] else None
        shift = torch.randn(n, c, device="cuda", generator=g).half() if call["shift"] else None
        out.append((x, weight, bias, call["groups"], call["eps"], call["silu"], shift))
    return out


def inductor_fn(groups: int, eps: float, silu: bool):
    def f(x, weight, bias, shift):
        if shift is not None:
            x = x + shift[:, :, None, None]
        y = F.group_norm(x, groups, weight, bias, eps)
        return F.silu(y) if silu else y

    return torch.compile(f, dynamic=False, options={"conv_1x1_as_mm": True})


def time_graph(run_all, reps: int = 50) -> tuple[float, list]:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            run_all()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = run_all()
    for _ in range(5):
        graph.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times), outputs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--programs", default="0,256,512,1024")
    parser.add_argument("--json")
    args = parser.parse_args()

    from diffjet.bench import environment
    from diffjet.kernels import group_norm_silu as gn

    calls = record_calls(args.model, args.batch)
    inputs = make_inputs(calls)
    with torch.no_grad():
        references = [gn.reference(x.float(), None if w is None else w.float(), None if b is None else b.float(),
                                   groups, eps, silu, None if s is None else s.float())
                      for x, w, b, groups, eps, silu, s in inputs]

    def worst_error(outputs) -> float:
        return max(((o.float() - r).norm() / r.norm()).item() for o, r in zip(outputs, references))

    runs = []
    for programs in [int(p) for p in args.programs.split(",")]:
        ms, outputs = time_graph(lambda: [gn.launch(*a[:6], a[6], stats_programs=programs) for a in inputs])
        runs.append({"variant": f"op, stats_programs={programs}", "ms": round(ms, 4), "max_rel_error": worst_error(outputs)})
        print(json.dumps(runs[-1]), flush=True)
    compiled = {}
    torch._dynamo.config.recompile_limit = 1024  # one compiled graph per call shape, none left to eager
    for x, w, b, groups, eps, silu, s in inputs:
        key = (tuple(x.shape), groups, silu, s is not None)
        if key not in compiled:
            compiled[key] = inductor_fn(groups, eps, silu)
    with torch.no_grad():
        ms, outputs = time_graph(lambda: [compiled[(tuple(x.shape), g_, si, s is not None)](x, w, b, s)
                                          for x, w, b, g_, eps, si, s in inputs])
    runs.append({"variant": "inductor", "ms": round(ms, 4), "max_rel_error": worst_error(outputs)})
    print(json.dumps(runs[-1]), flush=True)

    shapes = collections.Counter(f"{tuple(c['shape'])}{' +shift' if c['shift'] else ''}" for c in calls)
    report = {**environment("cuda"), "command": "python " + " ".join(sys.argv), "model": args.model,
              "batch": args.batch, "calls": len(calls), "call_shapes": dict(shapes), "runs": runs}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print(f"{args.model}: {len(calls)} calls")
    for run in runs:
        print(f"  {run['variant']:28} {run['ms']:8.3f} ms   max rel error {run['max_rel_error']:.2e}")


if __name__ == "__main__":
    main()
