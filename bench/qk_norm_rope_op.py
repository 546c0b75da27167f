"""The Flux attention kernel (`diffjet::qk_norm_rope`) alone at flux-dev's 1024² shapes, against Inductor's
compile of the computation it replaces (`qk_norm_rope.reference`, diffusers' norms, rotation and layout).

    python bench/qk_norm_rope_op.py --json qk-norm-rope-op.json
    git show <commit>:src/diffjet/kernels/qk_norm_rope.py > old.py && python bench/qk_norm_rope_op.py --old old.py
    python bench/qk_norm_rope_op.py --sweep --json qk-norm-rope-sweep.json

Shapes: batch 1, 24 heads of 128 channels, bf16. "single": a single block's projection, 4608 tokens, its q/k/v
columns the first 9216 of a 21504-wide row (the MLP's share follows); "double": a double block's 4096 image
and 512 text tokens, with the text tokens' own norm weights. Each op is timed by CUDA events over 200 calls
after 10; `bound_us` is the time its bytes (q, k, v read and written once, the rotary tables read) take at
4.8 TB/s. `--old` times a previous version of the kernel file beside the current one; `--sweep` times the kernel
over launch configurations (tokens per program, heads per program, warps) and names the fastest for both cases.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import itertools
import json
import pathlib
import sys
import tempfile

HEADS, DIM = 24, 128


def _old_kernel(path: str):
    """The kernel module at `path` (a copy of diffjet/kernels/qk_norm_rope.py), its op registered under another
    name, imported as a module of diffjet.kernels (it imports from the package)."""
    import diffjet.kernels

    source = pathlib.Path(path).read_text().replace('"diffjet::qk_norm_rope"', '"diffjet::qk_norm_rope_old"')
    folder = pathlib.Path(tempfile.mkdtemp())
    (folder / "qk_norm_rope_old.py").write_text(source)
    diffjet.kernels.__path__.append(str(folder))
    spec = importlib.util.spec_from_file_location("diffjet.kernels.qk_norm_rope_old", folder / "qk_norm_rope_old.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _time_us(f, calls: int = 200) -> float:
    import torch

    for _ in range(10):
        f()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        f()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls * 1000


def inputs(case: str):
    """`reference`'s arguments for a flux-dev block at 1024²."""
    import torch

    g = torch.Generator("cuda").manual_seed(0)
    width, dt = 3 * HEADS * DIM, torch.bfloat16

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=dt, generator=g)

    def weight():
        return torch.rand(DIM, device="cuda", dtype=dt, generator=g) + 0.5

    if case == "single":
        qkv, text, text_q, text_k = randn(1, 4608, width + 12288)[..., :width], None, None, None
    else:
        qkv, text, text_q, text_k = randn(1, 4096, width), randn(1, 512, width), weight(), weight()
    angle = torch.rand(4608, DIM // 2, device="cuda", generator=g) * 6.28
    cos, sin = (f(angle).repeat_interleave(2, -1).contiguous() for f in (torch.cos, torch.sin))
    return qkv, text, weight(), weight(), text_q, text_k, cos, sin, HEADS, 1e-6, 1e-6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--old", help="a previous version of diffjet/kernels/qk_norm_rope.py to time beside")
    parser.add_argument("--sweep", action="store_true", help="time the kernel's launch configurations too")
    args = parser.parse_args()
    import torch

    from diffjet.bench import environment
    from diffjet.kernels import qk_norm_rope as kernel

    old = _old_kernel(args.old) if args.old else None
    compiled = torch.compile(kernel.reference)
    runs = []
    for case in ("single", "double"):
        call = inputs(case)
        want = kernel.reference(*call)
        ops = {"kernel": kernel.launch, "inductor": compiled, **({"old_kernel": old.launch} if old else {})}
        if args.sweep:
            ops.update({f"kernel_{bs}_{hp}_{nw}": functools.partial(kernel.launch, block_s=bs, heads_per_program=hp,
                                                                    num_warps=nw)
                        for bs, hp, nw in itertools.product((16, 32, 64), (1, 2, 4, 8), (4, 8))})
        run = {"case": case}
        for name, op in ops.items():
            got = op(*call)
            run[f"{name}_us"] = _time_us(lambda: op(*call))
            run[f"{name}_max_abs_error"] = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, want))
        tokens = call[0].shape[1] + (0 if call[1] is None else call[1].shape[1])
        run["bound_us"] = (tokens * call[0].shape[-1] * 2 * 2 + 2 * call[6].numel() * 4) / 4.8e12 * 1e6
        runs.append(run)
        print(json.dumps(run), flush=True)
    result = {**environment("cuda"), "command": "python " + " ".join(sys.argv), "runs": runs}
    if args.sweep:  # the configuration with the least time over both cases
        total = {k[:-3]: sum(run[k] for run in runs) for k in runs[0] if k.startswith("kernel_") and k.endswith("_us")}
        result["fastest"] = min(total, key=total.get)
        print("fastest:", result["fastest"], f"{total[result['fastest']]:.1f} µs for both cases; the default's "
              f"{runs[0]['kernel_us'] + runs[1]['kernel_us']:.1f}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    names = [k[:-3] for k in runs[0] if k.endswith("_us") and k != "bound_us" and k.count("_") < 3]
    print(f"{'case':8}" + "".join(f"{n + ' µs':>16}" for n in names) + f"{'bound µs':>10}")
    for run in runs:
        print(f"{run['case']:8}" + "".join(f"{run[n + '_us']:16.1f}" for n in names) + f"{run['bound_us']:10.1f}")


if __name__ == "__main__":
    main()
