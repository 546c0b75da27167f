"""Where a warm start's time goes: `python bench/warm_start_profile.py CACHE_DIR [--model sd15]`.

Run it twice with the same (empty at first) cache folder: the first run compiles and fills the cache,
the second is the warm start. Each run prints the wall time of its phases (imports, loading,
`diffjet.compile`, first image, one more image) and Dynamo's per-phase compile times; `--cprofile FILE`
profiles `diffjet.compile` and the first image and prints the functions that took longest. `--precompile aoti`
keeps AOTInductor packages in the cache instead of saved functions (`Config.precompile`).
"""

import argparse
import cProfile
import importlib
import json
import logging
import pstats
import sys
import time

START = time.time()

import torch  # noqa: E402

import diffjet  # noqa: E402
from diffjet.models import load_pipeline  # noqa: E402


def main() -> None:
    logging.basicConfig(format="%(relativeCreated)8.0f ms %(name)s: %(message)s")
    logging.getLogger("diffjet").setLevel(logging.INFO)
    parser = argparse.ArgumentParser()
    parser.add_argument("cache_dir")
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cprofile", help="write the profile of diffjet.compile and the first image here")
    parser.add_argument("--json", help="append the phases to this file (one JSON line per run)")
    parser.add_argument("--top", type=int, default=45, help="functions printed per profile order")
    parser.add_argument("--precompile", default="function", help="Config.precompile: function or aoti")
    parser.add_argument("--eager-imports", action="store_true",
                        help="A/B: inside the compile phase, import Inductor's compiler and hash Triton's installation "
                             "first, as diffjet did before it put both off or on a thread")
    args = parser.parse_args()
    phases = {"imports": time.time() - START}
    t = time.time()
    pipe = load_pipeline(args.model, device="cuda", dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    torch.cuda.synchronize()
    phases["load_pipeline"] = time.time() - t
    profile = cProfile.Profile() if args.cprofile else None
    if profile:
        profile.enable()
    t = time.time()
    if args.eager_imports:
        importlib.import_module("torch._inductor.compile_fx")
        importlib.import_module("triton.runtime.cache").triton_key()
    diffjet.compile(pipe, diffjet.Config(cache_dir=args.cache_dir, precompile=args.precompile))
    phases["compile"] = time.time() - t
    t = time.time()
    pipe("warm start", num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0))
    torch.cuda.synchronize()
    phases["first_image"] = time.time() - t
    inductor_imported = "torch._inductor.compile_fx" in sys.modules
    if profile:
        profile.disable()
        profile.dump_stats(args.cprofile)
    t = time.time()
    pipe("warm start", num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0))
    torch.cuda.synchronize()
    phases["next_image"] = time.time() - t
    phases["diffjet_part"] = phases["compile"] + phases["first_image"] - phases["next_image"]
    phases["total"] = time.time() - START
    frames = sum(torch._dynamo.utils.counters["frames"].values())
    record = {"precompile": args.precompile, "eager_imports": args.eager_imports, "phases": phases,
              "inductor_compiler_imported": inductor_imported, "cache": vars(pipe.diffjet.cache.stats),
              "dynamo_frames": frames,
              "dont_write_bytecode": bool(sys.flags.dont_write_bytecode), "pycache_prefix": sys.pycache_prefix}
    print(json.dumps(record))
    if args.json:
        with open(args.json, "a") as out:
            out.write(json.dumps(record) + "\n")
    print(torch._dynamo.utils.compile_times(repr="str"))
    if profile:
        stats = pstats.Stats(args.cprofile)
        stats.sort_stats("cumulative").print_stats(args.top)
        stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
