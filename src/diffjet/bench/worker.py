"""One benchmark variant in its own process: `python -m diffjet.bench.worker SPEC_JSON OUT_JSON`.

A fresh process per variant keeps compile caches, Inductor's process-wide flags and allocator state
of one variant away from the next.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
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
    result = measure(
        pipe,
        model=spec["model"],
        compiler=spec["compiler"],
        apply_compiler=lambda p: recipes.apply(p, spec["compiler"]),
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
