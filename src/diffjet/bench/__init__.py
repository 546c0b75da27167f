"""`diffjet bench`: each (model, compiler) variant in a fresh process, one table, one JSON file.

The JSON follows one schema: `{"device", "torch", "diffusers", "triton", "date", "command", "weights",
"runs": [{"model", "compiler", "height", "width", "steps", "batch", "its", "unet_ms", "e2e_s",
"peak_mem_gib", "first_call_s", ...}]}`; a variant that failed has `"error"` instead of timings.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from . import recipes

WEIGHTS_NOTE = "random (architecture-exact) for presets"


def environment(device: str) -> dict[str, Any]:
    """Versions and device facts recorded with every result file."""
    import torch

    from ..runtime.environment import package_version

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {
        "device": name,
        "torch": torch.__version__,
        "diffusers": package_version("diffusers"),
        "transformers": package_version("transformers"),
        "triton": package_version("triton"),
        "flash_attn_4": package_version("flash-attn-4"),
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        # Without bytecode caching every new process compiles torch's and diffusers' Python anew
        # (8-18 s more per start on the H100 machine, python-imports-h100-2026-11-26.json), which a warm start
        # would then count.
        "python_bytecode_cache": not sys.flags.dont_write_bytecode,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "weights": WEIGHTS_NOTE,
    }


def run_variant(spec: dict[str, Any], timeout: float | None = None,
                local_caches: Path | None = None) -> list[dict[str, Any]] | dict[str, Any]:
    """Run one variant in a fresh Python process; its runs (one per resolution), or one error record.

    Each process gets empty Inductor and Triton caches of its own (in `local_caches`, emptied first, when
    given), so `first_call_s` is a cold start and only diffjet's own compile cache (`spec["cache_dir"]`)
    carries over between processes.
    """
    with tempfile.TemporaryDirectory(prefix="diffjet-bench-") as tmp:
        out = Path(tmp) / "result.json"
        local = Path(tmp) if local_caches is None else local_caches
        shutil.rmtree(local / "inductor", ignore_errors=True)
        shutil.rmtree(local / "triton", ignore_errors=True)
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "TORCHINDUCTOR_CACHE_DIR": str(local / "inductor"),
            "TRITON_CACHE_DIR": str(local / "triton"),
        }
        spec = {**spec, "spawned_at": time.time()}
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "diffjet.bench.worker", json.dumps(spec), str(out)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            proc = None
        if proc is not None and proc.returncode == 0 and out.exists():
            return json.loads(out.read_text())
        if proc is None:
            tail = [f"did not finish within {timeout:.0f} s"]
        else:
            tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-3:]
        return {
            "model": spec["model"],
            "compiler": spec["compiler"],
            "height": spec["height"],
            "width": spec["width"],
            "steps": spec["steps"],
            "batch": spec["batch"],
            "error": " | ".join(tail) or f"worker exited with {proc.returncode}",
        }


def run_bench(
    specs: list[dict[str, Any]],
    on_result: Callable[[list[dict[str, Any]]], None] | None = None,
    timeout: float | None = None,
) -> list[dict]:
    """Each spec in a worker process of its own; `on_result` gets the runs so far after each spec."""
    runs = []
    for spec in specs:
        if spec["compiler"] in recipes.DIFFJET and spec["device"] == "cuda" and spec.get("time_warm_start", True):
            result = _run_with_warm_start(spec, timeout)
        else:
            result = run_variant(spec, timeout)
        result = result if isinstance(result, list) else [result]
        runs.extend(result)
        if on_result is not None:
            on_result(runs)
    return runs


def _run_with_warm_start(spec: dict[str, Any], timeout: float | None) -> list[dict[str, Any]] | dict[str, Any]:
    """diffjet from an empty compile cache, then `warm_start_s`: a new process with that cache, at the
    first resolution (recorded with that resolution's run).

    Both processes start with empty Inductor and Triton caches at the same paths, as a server set up like
    the machine that compiled: a loaded function's kernels look for their autotuning choices under the
    compiling process's Inductor folder (`runtime/autotune_choices.py`)."""
    with tempfile.TemporaryDirectory(prefix="diffjet-compile-cache-") as work:
        cache_dir, local = str(Path(work) / "compile"), Path(work) / "local"
        result = run_variant({**spec, "cache_dir": cache_dir}, timeout, local)
        if isinstance(result, list):
            first = {**spec, "cache_dir": cache_dir, "warm_start": True}
            if spec.get("resolutions"):
                first["height"], first["width"] = spec["resolutions"][0]
            warm = run_variant(first, timeout, local)
            result[0].update(warm if "error" not in warm else {"warm_start_error": warm["error"]})
    return result


_COLUMNS = (
    ("model", "model", "{}"),
    ("compiler", "compiler", "{}"),
    ("size", None, "{}"),
    ("it/s", "its", "{:.1f}"),
    ("unet ms", "unet_ms", "{:.2f}"),
    ("e2e s", "e2e_s", "{:.3f}"),
    ("first call s", "first_call_s", "{:.1f}"),
    ("warm start s", "warm_start_s", "{:.1f}"),
    ("peak GiB", "peak_mem_gib", "{:.2f}"),
    ("PSNR vs lossless", "psnr_db", "{:.1f} dB"),
)


def format_table(runs: list[dict[str, Any]]) -> str:
    rows = [[title for title, _, _ in _COLUMNS]]
    for run in runs:
        row = []
        for title, key, fmt in _COLUMNS:
            if key is None:
                row.append(f"{run['width']}x{run['height']}")
            elif "error" in run and key not in ("model", "compiler"):
                row.append("failed")
            else:
                value = run.get(key, run.get("fidelity", {}).get(key))
                row.append("-" if value is None else fmt.format(value))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    errors = [f"{r['model']}/{r['compiler']}: {r['error']}" for r in runs if "error" in r]
    return "\n".join(lines + errors)


def plot(runs: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """A bar chart of it/s per variant, drawn with Pillow (no plotting library needed)."""
    from PIL import Image, ImageDraw

    ok = [r for r in runs if "error" not in r]
    bar_h, gap, left, width = 28, 10, 260, 900
    height = 40 + len(ok) * (bar_h + gap)
    image = Image.new("RGB", (width, max(height, 80)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), "denoising-loop it/s (higher is better)", fill="black")
    top = max((r["its"] for r in ok), default=1.0)
    colours = {"eager": (150, 150, 150), "torch-compile": (70, 110, 200), "diffjet": (230, 120, 30),
               "diffjet-no-kernels": (200, 60, 60)}
    for i, run in enumerate(ok):
        y = 40 + i * (bar_h + gap)
        length = int((width - left - 90) * run["its"] / top)
        draw.text((10, y + 8), f"{run['model']} {run['width']}x{run['height']} {run['compiler']}", fill="black")
        draw.rectangle([left, y, left + length, y + bar_h], fill=colours.get(run["compiler"], (100, 160, 100)))
        draw.text((left + length + 6, y + 8), f"{run['its']:.1f}", fill="black")
    image.save(path, format="PNG")
