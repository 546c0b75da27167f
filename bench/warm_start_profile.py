"""Where a warm start's time goes: `python bench/warm_start_profile.py CACHE_DIR [--model sd15]`.

Run it twice with the same (empty at first) cache folder: the first run compiles and fills the cache,
the second is the warm start. Each run prints the wall time of its phases (imports, loading, first
image) and Dynamo's per-phase compile times.
"""

import argparse
import json
import logging
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
    args = parser.parse_args()
    phases = {"imports": time.time() - START}
    t = time.time()
    pipe = load_pipeline(args.model, device="cuda", dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    phases["load_pipeline"] = time.time() - t
    t = time.time()
    diffjet.compile(pipe, diffjet.Config(cache_dir=args.cache_dir))
    pipe("warm start", num_inference_steps=30, generator=torch.Generator().manual_seed(0))
    torch.cuda.synchronize()
    phases["first_image"] = time.time() - t
    phases["total"] = time.time() - START
    print(json.dumps({"phases": phases, "cache": vars(pipe.diffjet.cache.stats)}))
    print(torch._dynamo.utils.compile_times(repr="str"))


if __name__ == "__main__":
    main()
