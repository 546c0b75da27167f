"""Where a warm process's kernels look for Inductor's autotuning choices (tiny preset, CUDA).

    python bench/diagnose_autotune_choices.py

A cold process fills a compile cache; its Inductor and Triton folders are then deleted, as on a new
machine; two warm processes load the precompiled functions, the first with TORCHINDUCTOR_COMPILE_THREADS=1
(so that Inductor's reads of its choices happen in-process and are recorded), the second with the default.
Each prints how many kernels Inductor timed at their first call, the choice files in its Inductor folder,
and the paths at which Inductor looked for a kernel's choice.
"""
import json, os, shutil, subprocess, sys, tempfile
from pathlib import Path
CHILD = r'''
import json, sys, os
from pathlib import Path
import torch
reads = []
from torch._inductor.runtime import autotune_cache as ac
orig = ac.AutotuneCache.read_best
def read_best(self, inductor_meta, configs):
    r = orig(self, inductor_meta, configs)
    lc = getattr(self, "local_cache", None)
    reads.append((lc[1] if lc else "no-local-cache", r is not None))
    return r
ac.AutotuneCache.read_best = read_best
import diffjet
from diffjet.bench.worker import runtime_autotune
from diffjet.models import load_pipeline
pipe = load_pipeline("tiny", device="cuda", dtype=torch.float16)
pipe.set_progress_bar_config(disable=True)
diffjet.compile(pipe, diffjet.Config(cache_dir=sys.argv[1], kernels=()))
pipe("a cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
root = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
bc = sorted(str(p.relative_to(root)) for p in root.glob("*/*.best_config"))
allbc = sorted(str(p.relative_to(root)) for p in root.rglob("*.best_config"))
py = sorted(str(p.relative_to(root)) for p in root.glob("*/*.py"))
print("RESULT " + json.dumps({"autotune": runtime_autotune(), "best_configs_top": len(bc), "best_configs_all": len(allbc),
      "sample_all": allbc[:3], "kernels_py": len(py), "sample_py": py[:3],
      "reads": len(reads), "read_hits": sum(h for _, h in reads),
      "read_sample": [(str(Path(k).relative_to(root)) if k.startswith(str(root)) else k, h) for k, h in reads[:4]]}))
'''
tmp = Path(tempfile.mkdtemp()); cache = tmp / "cache"
def run(name, extra=None):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp / name / "inductor"), "TRITON_CACHE_DIR": str(tmp / name / "triton"), **(extra or {})}
    p = subprocess.run([sys.executable, "-c", CHILD, str(cache)], env=env, capture_output=True, text=True, timeout=300)
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    print(name, line[-1][7:] if line else p.stderr[-2500:], flush=True)
    shutil.rmtree(tmp / name, ignore_errors=True)
run("cold")
entries = [json.loads(m.read_text()) for m in cache.rglob("meta.json")]
names = [n for e in entries for n in e["files"] if n.startswith("inductor/")]
print("entry inductor files:", len(names), names[:3])
run("warm-threads1", {"TORCHINDUCTOR_COMPILE_THREADS": "1"})
run("warm-default")
