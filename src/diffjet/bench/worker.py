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

from ..models import load_pipeline
from . import recipes
from .harness import measure


def run(spec: dict) -> dict:
    device = torch.device(spec["device"])
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = load_pipeline(spec["model"], device=str(device), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    recipes.set_scheduler(pipe, spec.get("scheduler", "euler"))
    apply_compiler = lambda p: recipes.apply(p, spec["compiler"], cache_dir=spec.get("cache_dir"))  # noqa: E731
    if spec.get("warm_start"):
        return _warm_start(pipe, spec, apply_compiler)
    result = measure(
        pipe,
        model=spec["model"],
        compiler=spec["compiler"],
        apply_compiler=apply_compiler,
        prompt=spec["prompt"],
        steps=spec["steps"],
        height=spec["height"],
        width=spec["width"],
        batch=spec["batch"],
        seed=spec["seed"],
        warmup=spec["warmup"],
        repeats=spec["repeats"],
        unet_repeats=spec["unet_repeats"],
    )
    data = result.to_json()
    data["dtype"] = str(dtype).removeprefix("torch.")
    data["scheduler"] = type(pipe.scheduler).__name__
    data.update(_dynamo_counts())
    report = getattr(pipe, "diffjet", None)
    if report is not None:
        data["graphs"] = {name: dataclasses.asdict(r.stats) for name, r in report.runners.items()}
    return data


def _warm_start(pipe, spec: dict, apply_compiler) -> dict:
    """From this process's start (`spawned_at`, the parent's clock) to its first finished image."""
    apply_compiler(pipe)
    pipe(
        spec["prompt"],
        num_inference_steps=spec["steps"],
        height=spec["height"],
        width=spec["width"],
        generator=torch.Generator("cpu").manual_seed(spec["seed"]),
    )
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    cache = getattr(getattr(pipe, "diffjet", None), "cache", None)
    return {
        "warm_start_s": time.time() - spec["spawned_at"],
        "warm_cache": dataclasses.asdict(cache.stats) if cache is not None else None,
    }


def _dynamo_counts() -> dict[str, int]:
    """Graphs Dynamo compiled and graph breaks it took, over the whole run (warm-up included)."""
    from torch._dynamo.utils import counters

    return {
        "dynamo_graphs": int(counters["stats"].get("unique_graphs", 0)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    spec = json.loads(sys.argv[1])
    Path(sys.argv[2]).write_text(json.dumps(run(spec)))


if __name__ == "__main__":
    main()
