"""One benchmark variant in its own process: `python -m diffjet.bench.worker SPEC_JSON OUT_JSON`.

A fresh process per variant keeps compile caches, Inductor's process-wide flags and allocator state
of one variant away from the next.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch

from .. import console
from ..models import control_inputs, half_precision, load_pipeline
from . import recipes
from .harness import measure

IMPORTED_AT = time.time()  # a warm start's phases: imports end here


def run(spec: dict) -> list[dict] | dict:
    """Time the variant at each of `spec["resolutions"]` (or its one height/width) in this process.

    With several resolutions, a second pass over all of them follows once every shape is warm; the
    Dynamo graphs it compiles and the CUDA graphs it captures are recorded (both should be zero), and
    so is its it/s next to the first pass's.
    """
    device = torch.device(spec["device"])
    dtype = half_precision(spec["model"]) if device.type == "cuda" else torch.float32
    pipe = load_pipeline(spec["model"], device=str(device), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    recipes.set_scheduler(pipe, spec.get("scheduler", "euler"))
    loaded_at = time.time()
    apply_compiler = lambda p: recipes.apply(p, spec["compiler"], cache_dir=spec.get("cache_dir"))  # noqa: E731
    if spec.get("warm_start"):
        return _warm_start(pipe, spec, apply_compiler, loaded_at)
    sizes = spec.get("resolutions") or [[spec["height"], spec["width"]]]

    def timed(height: int, width: int, apply) -> dict:
        result = measure(
            pipe,
            model=spec["model"],
            compiler=spec["compiler"],
            apply_compiler=apply,
            prompt=spec["prompt"],
            steps=spec["steps"],
            height=height,
            width=width,
            batch=spec["batch"],
            seed=spec["seed"],
            warmup=spec["warmup"],
            repeats=spec["repeats"],
            unet_repeats=spec["unet_repeats"],
        )
        return result.to_json()

    runs = [timed(h, w, apply_compiler if i == 0 else _nothing) for i, (h, w) in enumerate(sizes)]
    if len(sizes) > 1:
        graphs_before, captures_before = _dynamo_counts()["dynamo_graphs"], _captures(pipe)
        second = [timed(h, w, _nothing)["its"] for h, w in sizes]
        recompiles = _dynamo_counts()["dynamo_graphs"] - graphs_before
        for run, its in zip(runs, second):
            run.update(its_second_pass=its, recompiles_after_warmup=recompiles,
                       captures_after_warmup=_captures(pipe) - captures_before)
    common = {"dtype": str(dtype).removeprefix("torch."), "scheduler": type(pipe.scheduler).__name__,
              **_dynamo_counts()}
    if recipes.lossy(spec["compiler"]):
        common["fidelity"] = _lossy_cost(pipe, spec, dtype)
    report = getattr(pipe, "diffjet", None)
    if report is not None:
        common["graphs"] = {name: dataclasses.asdict(r.stats) for name, r in report.runners.items()}
    if device.type == "cuda":
        common["peak_mem_all_shapes_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return [{**run, **common} for run in runs]


def _lossy_cost(pipe, spec: dict, dtype) -> dict:
    """What a lossy variant costs at the first resolution: its output against eager's (the lossless
    output) at the same seed, and each reused step's error against the full denoiser (`quality.LossyCost`)."""
    from ..quality import audit_reused_steps, denoiser_name, final_outputs, lossy_cost

    height, width = (spec.get("resolutions") or [[spec["height"], spec["width"]]])[0]
    run = dict(prompt=spec["prompt"], steps=spec["steps"], height=height, width=width, seed=spec["seed"], decode=True)
    reused = audit_reused_steps(pipe)
    latents, image = final_outputs(pipe, **run)
    options = list(getattr(getattr(pipe, "diffjet", None), "lossy", [])) or [spec["compiler"]]
    reference = load_pipeline(spec["model"], device=str(pipe.device), dtype=dtype)
    reference.set_progress_bar_config(disable=True)
    recipes.set_scheduler(reference, spec.get("scheduler", "euler"))
    lossless_latents, lossless_image = final_outputs(reference, **run)
    del reference
    return dataclasses.asdict(lossy_cost(options, latents, image, lossless_latents, lossless_image, reused,
                                         denoiser_name(pipe)))


def _nothing(pipe) -> dict:
    return {}


def _captures(pipe) -> int:
    report = getattr(pipe, "diffjet", None)
    return sum(r.stats.captures for r in report.runners.values()) if report is not None else 0


def _warm_start(pipe, spec: dict, apply_compiler, loaded_at: float) -> dict:
    """From this process's start (`spawned_at`, the parent's clock) to its first finished image, and the
    phases of that time: imports, loading the pipeline, compiling (with the cache), the first image, and
    diffjet's log of it (cache loads, captures) with each line's time since the start."""
    log, logger = _TimedLog(spec["spawned_at"]), logging.getLogger("diffjet")
    level = logger.level
    logger.addHandler(log)
    logger.setLevel(logging.INFO)
    try:
        apply_compiler(pipe)
        compiled_at = time.time()
        pipe(
            **control_inputs(pipe, spec["height"], spec["width"]),
            prompt=spec["prompt"],
            num_inference_steps=spec["steps"],
            height=spec["height"],
            width=spec["width"],
            generator=torch.Generator("cpu").manual_seed(spec["seed"]),
        )
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    finally:
        logger.removeHandler(log)
        logger.setLevel(level)
    cache = getattr(getattr(pipe, "diffjet", None), "cache", None)
    done = time.time()
    return {
        "warm_start_s": done - spec["spawned_at"],
        "warm_start_phases_s": {"imports": IMPORTED_AT - spec["spawned_at"], "load": loaded_at - IMPORTED_AT,
                                "compile": compiled_at - loaded_at, "first_image": done - compiled_at},
        "warm_cache": dataclasses.asdict(cache.stats) if cache is not None else None,
        "warm_dynamo_frames": _dynamo_counts()["dynamo_frames"],
        "warm_runtime_autotune": runtime_autotune(),
        "warm_start_log": log.lines,
    }


def runtime_autotune() -> dict:
    """Inductor kernels whose launch configurations were timed at their first call in this process, and
    the seconds that took (none in a warm process whose entries carry their choices)."""
    from torch._dynamo.utils import compilation_time_metrics

    timings = compilation_time_metrics.get("CachingAutotuner.benchmark_all_configs", [])
    return {"kernels": len(timings), "s": round(sum(timings), 3)}


class _TimedLog(logging.Handler):
    """Keeps each record as `"12.34 s name: message"`, seconds since `start`."""

    def __init__(self, start: float):
        super().__init__(logging.INFO)
        self.start, self.lines = start, []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.created - self.start:.2f} s {record.name}: {record.getMessage()}")


def _dynamo_counts() -> dict[str, int]:
    """Graphs Dynamo compiled and graph breaks it took, over the whole run (warm-up included)."""
    from torch._dynamo.utils import counters

    return {
        "dynamo_graphs": int(counters["stats"].get("unique_graphs", 0)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "dynamo_frames": int(counters["frames"].get("total", 0)),  # frames Dynamo traced (0: all precompiled)
    }


def main() -> None:
    spec = json.loads(sys.argv[1])
    with console.terminal(verbose=False):  # the last lines of stderr are the run's error, if it fails
        result = run(spec)
    Path(sys.argv[2]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
