"""Building a full-size DiT preset (flux-dev, flux-schnell, sd35-medium): how long it takes, how much memory
and disk it needs, and how long loading it back takes, to plan GPU runs that must fit in ten minutes.

    DIFFJET_CACHE_DIR=/big/disk/diffjet python bench/dit_build.py --model flux-dev --json dit-build-flux-dev.json

Per model: `diffjet.models.build` into the preset cache, the folder `diffjet bench --model flux-dev` loads
(`$DIFFJET_CACHE_DIR/models/flux-dev-v1`; one component at a time, each created on the meta device, filled
in bfloat16 and saved; a progress bar on stderr), timed; then `diffjet.models.load_pipeline` of it onto the
GPU in bfloat16, timed. Recorded: both times, the process's peak resident memory (`ru_maxrss`) after the
build and after the load, bytes on disk per component and the free disk space before. The preset stays in
the cache (`--remove` deletes it), so a `diffjet bench` on the same machine with the same
`DIFFJET_CACHE_DIR` starts from it instead of building it again; an existing one is rebuilt. With `--profile`
the build runs under cProfile and `build_split_s` says where its time went: filling the random weights,
writing the safetensors files, hashing them for the manifest.

Needs no GPU for the build; the load goes to CUDA when there is one.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


#: The functions whose cumulative time `--profile` records, by what they do.
#: (file, function); the manifest hashes in threads, which cProfile does not see, so its `write` is timed whole.
_SPLIT = {"fill": ("random_weights.py", "fill_random_weights"), "write": ("", "serialize_file"),
          "hash": ("manifest.py", "write")}


def _split(profile) -> dict:
    import pstats

    stats = pstats.Stats(profile).stats
    return {part: round(sum(v[3] for (file, _, fn), v in stats.items() if name in fn and file.endswith(suffix)), 1)
            for part, (suffix, name) in _SPLIT.items()}


def run_model(model: str, remove: bool, profile: bool = False) -> dict:
    import torch

    from diffjet.models import build, count_parameters, load_pipeline
    from diffjet.models.architectures import ARCHITECTURES
    from diffjet.models.loading import PRESET_FORMAT_VERSION, default_cache_dir

    target = default_cache_dir() / "models" / f"{model}-v{PRESET_FORMAT_VERSION}"
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    free_before = shutil.disk_usage(target.parent).free
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
    start = time.perf_counter()
    if profiler:
        profiler.runcall(build, model, target, progress=True)
    else:
        build(model, target, progress=True)
    build_s = time.perf_counter() - start
    build_rss = _peak_rss_gib()
    components = {name: _bytes(target / name) for name in ARCHITECTURES[model].models}

    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    pipe = load_pipeline(str(target), device=device, dtype=torch.bfloat16)
    if device == "cuda":
        torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    del pipe
    result = {
        "model": model,
        "parameters": count_parameters(model),
        "build_s": round(build_s, 1),
        **({"build_split_s": _split(profiler)} if profiler else {}),
        "load_s": round(load_s, 1),
        "load_device": device,
        "peak_rss_gib_after_build": round(build_rss, 2),
        "peak_rss_gib_after_load": round(_peak_rss_gib(), 2),
        "bytes_on_disk": components,
        "disk_free_before_gib": round(free_before / 2**30, 1),
        "folder": target.name,  # in the preset cache
    }
    if remove:
        shutil.rmtree(target, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flux-dev", help="comma-separated full-size DiT presets")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--remove", action="store_true", help="delete each preset after measuring it")
    parser.add_argument("--profile", action="store_true", help="where the build's time goes (cProfile)")
    args = parser.parse_args(argv)
    results = [run_model(m, args.remove, args.profile) for m in args.model.split(",")]
    import torch

    from diffjet.bench import environment

    # the command without --json's path, which is this machine's
    record = {**environment("cuda" if torch.cuda.is_available() else "cpu"),
              "command": f"python bench/dit_build.py --model {args.model}" + (" --remove" if args.remove else ""),
              "runs": results}
    text = json.dumps(record, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
