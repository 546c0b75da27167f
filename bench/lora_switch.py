"""LoRA switching on a compiled pipeline: how long A → B takes, and that nothing recompiles or re-captures.

    python bench/lora_switch.py --model sd15,sdxl --json lora-switch.json
    python bench/lora_switch.py --model sdxl --compiler diffjet-fast   # with the lossy fast modes on
    python bench/lora_switch.py --model flux-dev --base-copy host,device

Per model: load the preset in its half precision on CUDA (float16; bfloat16 for flux-dev), `diffjet.compile`
it (Inductor on the UNet or Flux's transformer, CUDA graphs on every component), generate once at the native
size, then:
- `first_load_ms`: `diffjet.load_lora(pipe, A, base_copy=...)` from a .safetensors file, the first time (the
  base weights are copied then: to pinned host memory, or beside them in GPU memory with `--base-copy device`;
  each value of `--base-copy` is a run of its own);
- `switch_ms`: `unload_lora(A)` + `load_lora(B)` from the file, alternating A → B → A … with a generation
  (2 steps) between switches so the graphs really replay the new weights; median, min and max;
- `switch_in_memory_ms`: the same with the LoRAs already read into state dicts (no file read);
- `switch_replacing_ms`: the same in one step, `load_lora(B, replacing=A)` (each weight's base copy written
  back on a side stream while the previous weight is merged);
- recompiles (Dynamo's unique graphs) and new captures across all switches, which must be 0;
- that each switch changes the UNet's output and that B after A equals B loaded alone (same bits);
- `base_copy_gib`, the copies' size, and `pinned_host_gib`, the pinned host memory PyTorch holds at the end.
LoRAs are `diffjet.models.random_lora` (rank 16 by default, every attention, feed-forward and transformer
projection of the UNet plus the text encoders' attention and MLP: a kohya "full" LoRA; for Flux every Linear of
its blocks, as ai-toolkit trains), saved in the model's half precision. `adapted_unet_weights` counts the
denoiser's (UNet or transformer).
Every duration is wall time with the GPU synchronised before and after.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def timed(fn) -> float:
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - start) * 1000


def counts(pipe) -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return (sum(r.stats.captures for r in pipe.diffjet.runners.values()), counters["stats"]["unique_graphs"])


def run_model(model: str, rank: int, switches: int, folder: Path, device: str = "cuda",
              compiler: str = "diffjet", base_copy: str = "host") -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    import diffjet
    from diffjet.bench.recipes import DIFFJET
    from diffjet.models import half_precision, load_pipeline, lora_layers, random_lora
    from diffjet.quality import denoiser

    half = half_precision(model)
    pipe = load_pipeline(model, device=device, dtype=half if device == "cuda" else torch.float32)
    pipe.set_progress_bar_config(disable=True)
    step = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    # The VAE is left uncompiled (still graphed): a switch's cost does not depend on it.
    config = DIFFJET[compiler]()
    diffjet.compile(pipe, config.replace(inductor=(step,), cache=False) if device == "cuda" else config)
    files = {}
    for name, seed in (("a", 1), ("b", 2)):
        state = {k: v.to(half) for k, v in random_lora(pipe, seed=seed, rank=rank).items()}
        files[name] = folder / f"{model}-{name}.safetensors"
        save_file(state, files[name])
    in_memory = {name: load_file(path) for name, path in files.items()}
    unet_weights = sum(denoiser(pipe).get_submodule(p).weight.numel() for p in lora_layers(pipe)[step])
    all_weights = sum(getattr(pipe, c).get_submodule(p).weight.numel()
                      for c, paths in lora_layers(pipe).items() for p in paths)

    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    probe, same_after_switch_back = {}, []

    def generate(steps: int = 2):
        return pipe("a photo of a cat", num_inference_steps=steps, output_type="latent", generator=generator()).images

    start = time.perf_counter()
    generate()
    first_call_s = time.perf_counter() - start
    base = generate().float()
    warm = counts(pipe)

    first_load_ms = timed(lambda: diffjet.load_lora(pipe, files["a"], adapter_name="a", base_copy=base_copy))
    probe["a"] = generate().float()
    current = "a"
    from_file, from_memory, replacing = [], [], []
    for i in range(3 * switches):
        target = "b" if current == "a" else "a"
        source = files if i < switches else in_memory

        def switch():
            diffjet.unload_lora(pipe, current)
            diffjet.load_lora(pipe, source[target], adapter_name=target)

        def switch_in_one_step():
            diffjet.load_lora(pipe, source[target], adapter_name=target, replacing=current)

        times = (from_file, from_memory, replacing)[i // switches]
        times.append(timed(switch_in_one_step if times is replacing else switch))
        out = generate().float()
        if target in probe:
            same_after_switch_back.append(torch.equal(out, probe[target]))
        probe[target] = out
        current = target
    after = counts(pipe)
    unload_ms = timed(lambda: diffjet.unload_lora(pipe))
    restored = torch.equal(generate().float(), base)

    def rel(x, y):
        return ((x - y).norm() / y.norm()).item()

    result = {
        "model": model, "compiler": compiler, "lossy": pipe.diffjet.lossy, "rank": rank, "lora_layers": {c: len(p) for c, p in lora_layers(pipe).items()},
        "adapted_weights": all_weights, "adapted_unet_weights": unet_weights,
        "lora_file_mb": round(files["a"].stat().st_size / 2**20, 1),
        "first_call_s": round(first_call_s, 1),
        "first_load_ms": round(first_load_ms, 1),
        "switch_ms": round(statistics.median(from_file), 1),
        "switch_ms_min": round(min(from_file), 1), "switch_ms_max": round(max(from_file), 1),
        "switch_in_memory_ms": round(statistics.median(from_memory), 1),
        "switch_in_memory_ms_min": round(min(from_memory), 1),
        "switch_in_memory_ms_max": round(max(from_memory), 1),
        "switch_replacing_ms": round(statistics.median(replacing), 1),
        "switch_replacing_ms_min": round(min(replacing), 1), "switch_replacing_ms_max": round(max(replacing), 1),
        "switches_timed": len(from_file) + len(from_memory) + len(replacing),
        "unload_all_ms": round(unload_ms, 1),
        "recompiles": after[1] - warm[1], "new_captures": after[0] - warm[0],
        "latents_change_a_vs_base": round(rel(probe["a"], base), 4),
        "latents_change_b_vs_a": round(rel(probe["b"], probe["a"]), 4),
        "same_latents_each_time_back": all(same_after_switch_back),
        "unload_restores_base_bit_for_bit": restored,
        "base_copy": base_copy,
        "base_copy_gib": round(sum(t.numel() * t.element_size() for t in pipe._diffjet_lora.base.values()) / 2**30, 2),
        "pinned_host_gib": round(torch.cuda.host_memory_stats()["allocated_bytes.current"] / 2**30, 2)
        if device == "cuda" else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
    }
    del pipe
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="sd15,sdxl")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--switches", type=int, default=6, help="timed switches from files (as many from memory)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--compiler", default="diffjet", help="the diffjet variant (diffjet bench's names)")
    parser.add_argument("--base-copy", default="host", help="comma-separated: host, device (load_lora's base_copy)")
    parser.add_argument("--json")
    args = parser.parse_args()
    from diffjet.bench import environment

    report = {**environment(args.device), "command": "python " + " ".join(sys.argv), "runs": []}
    with tempfile.TemporaryDirectory() as folder:
        for model, base_copy in itertools.product(args.model.split(","), args.base_copy.split(",")):
            try:
                result = run_model(model, args.rank, args.switches, Path(folder), args.device, args.compiler,
                                   base_copy)
            except Exception as error:  # noqa: BLE001 - record and go on to the next model
                import traceback

                traceback.print_exc()
                result = {"model": model, "base_copy": base_copy, "error": repr(error)[:500]}
            report["runs"].append(result)
            print(json.dumps(result), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'model':8} {'copies':6} {'layers':>7} {'first ms':>9} {'switch ms':>10} {'in-mem ms':>10} {'recompiles':>10} "
          f"{'captures':>9}")
    for r in report["runs"]:
        if "error" in r:
            print(f"{r['model']:8} failed: {r['error']}")
            continue
        layers = sum(r["lora_layers"].values())
        print(f"{r['model']:8} {r['base_copy']:6} {layers:7d} {r['first_load_ms']:9.1f} {r['switch_ms']:10.1f} "
              f"{r['switch_in_memory_ms']:10.1f} {r['recompiles']:10d} {r['new_captures']:9d}")


if __name__ == "__main__":
    main()
