"""What the GEGLU kernel spends beyond its GEMM: the gate (epilogue) and how programs share an SM.

    python bench/geglu_epilogue.py --json geglu-fp8-epilogue-sdxl.json
    python bench/geglu_epilogue.py --occupancy --json geglu-fp8-occupancy-sdxl.json

The 70 GEGLU calls of one SDXL step (`geglu_op.record_calls`), e4m3 and float16, each variant timed from one
CUDA graph. Default: the kernel with the exact gate (`_gate`, as the lossless kernel rounds), with the fp8 gate
(`_gate_fp8`) and with `h + g` in place of the gate (the floor of any gate), beside the GEMM alone
(`torch._scaled_mm` / cuBLAS writing both halves). `--occupancy`: tile settings at one and two programs per SM
(the 7th value of a setting), so that one program's epilogue can overlap another's mainloop.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from geglu_op import fp8_calls, record_calls  # bench/, the script's own folder
from group_norm_op import time_graph

FP8_TILES = (128, 128, 128, 8, 8, 3)
OCCUPANCY_FP8 = [(128, 128, 128, 8, 8, 3), (64, 128, 128, 8, 4, 2, 2), (64, 128, 128, 8, 8, 2, 2),
                 (128, 64, 128, 8, 4, 3, 2), (128, 64, 128, 8, 4, 2, 2), (64, 128, 128, 8, 4, 3, 2)]
OCCUPANCY_FP16 = [(128, 128, 64, 8, 8, 3), (64, 128, 64, 8, 4, 2, 2), (128, 64, 64, 8, 4, 3, 2),
                  (128, 64, 64, 8, 4, 2, 2)]


def kernel_copies(folder: Path) -> dict:
    """The kernel module as shipped ("fast": `_gate_fp8` on e4m3), with the exact gate on e4m3 too ("exact"), and
    with `h + g` for both gates ("sums"): copies of its source, loaded as modules of their own."""
    from diffjet.kernels import geglu as gg

    source = Path(gg.__file__).read_text().split("@torch.library.custom_op")[0]  # the ops are registered once
    exact = source.replace("_gate_fp8(acc_h, acc_g, y_desc.dtype)", "_gate(acc_h, acc_g, y_desc.dtype)")
    sums = re.sub(r"(def _gate\(acc_h, acc_g, dtype: tl.constexpr\):\n)",
                  r"\1        return (acc_h + acc_g).to(dtype)\n", source)
    sums = re.sub(r"(def _gate_fp8\(h, g, dtype: tl.constexpr\):\n)", r"\1        return (h + g).to(dtype)\n", sums)
    assert exact != source and sums.count("return (") > source.count("return ("), "the kernel's source changed"
    modules = {"fast": gg}
    for name, text in (("exact", exact), ("sums", sums)):
        path = folder / f"geglu_{name}.py"  # Triton reads a kernel's source from its file
        path.write_text(text)
        spec = importlib.util.spec_from_file_location(f"diffjet.kernels.geglu_{name}", path)
        modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[name])
    return modules


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--occupancy", action="store_true", help="tile settings at one and two programs per SM")
    parser.add_argument("--json")
    args = parser.parse_args()

    from diffjet.bench import environment
    from diffjet.kernels import geglu as gg

    calls = record_calls("sdxl")
    rows = []

    def timed(name, op, on, references=None):
        """Time `op` over the calls `on` and record its largest error against `references` (None: not compared)."""
        try:
            ms, outputs = time_graph(lambda: [op(x, w, b) for x, w, b in on])
        except Exception as exc:  # noqa: BLE001 - a setting that does not fit is reported, not fatal
            rows.append({"variant": name, "failed": f"{type(exc).__name__}: {exc}"[:200]})
            return
        error = None if references is None else max(float((y.float().view_as(r) - r).norm() / r.norm())
                                                    for y, r in zip(outputs, references))
        rows.append({"variant": name, "ms": ms, "error": error})
        print(rows[-1], file=sys.stderr, flush=True)

    with torch.no_grad(), tempfile.TemporaryDirectory() as folder:
        calls8, refs8, unfused_error, ((_, alone), (_, unfused)) = fp8_calls(calls)
        refs16 = [gg.reference(x.float(), w.float(), b.float()) for x, w, b in calls]
        timed("scaled_mm alone", alone, calls8)
        if args.occupancy:
            for blocks in OCCUPANCY_FP8:
                timed(f"fp8 {blocks}", lambda x, w, b, t=blocks: gg.launch_fp8(*x, *w, b, torch.float16, blocks=t),
                      calls8, refs8)
            for blocks in OCCUPANCY_FP16:
                timed(f"fp16 {blocks}", lambda x, w, b, t=blocks: gg.launch(x, w, b, blocks=t), calls, refs16)
        else:
            copies = kernel_copies(Path(folder))
            timed("unfused fp8", unfused, calls8, refs8)
            for name, module in copies.items():
                timed(f"fp8 {name} {FP8_TILES}", lambda x, w, b, m=module: m.launch_fp8(
                    *x, *w, b, torch.float16, blocks=FP8_TILES), calls8, None if name == "sums" else refs8)
            timed("fp16 cuBLAS projection alone", F.linear, calls)
            timed("fp16 exact", gg.launch, calls, refs16)
            timed("fp16 sums", copies["sums"].launch, calls)
    print(f"{'variant':45} {'ms':>7} error")
    for r in rows:
        print(f"{r['variant']:45} " + (f"{r['ms']:7.3f} {'' if r['error'] is None else '%.2e' % r['error']}"
                                       if "ms" in r else r["failed"]))
    if args.json:
        report = {**environment("cuda"), "command": "python " + " ".join(sys.argv), "model": "sdxl",
                  "calls": len(calls), "unfused_fp8_max_error": unfused_error, "results": rows}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
