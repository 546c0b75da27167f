"""Warm start without Dynamo: how fast a new process gets a compiled UNet from `torch.compile(...).aot_compile`.

    python bench/aot_warm_start.py --model sd15 --json aot-warm-start.json

diffjet's compile cache today preloads Inductor's artifacts, but a new process still re-traces the UNet
with Dynamo (about 9 s of sd15's warm start: bench/results/warm-start-profile-sd15-h200-2026-11-26.json).
`aot_compile` saves the traced and compiled function, guards included, and loads it back as a callable.
This measures that path on one shape before diffjet's cache adopts it:

1. a process loads the preset's UNet, applies diffjet's passes (half precision on CUDA, channels-last,
   fused-QKV SDPA), `aot_compile`s one UNet step (full graph, portable guards only, diffjet's Inductor
   options) and saves it (`compile_s`);
2. a fresh process loads the UNet and the saved function and calls it: `import_s`, `load_model_s`,
   `load_compiled_s`, `first_call_s` and `start_to_first_step_s` from the process's start; the error
   against the same UNet run eagerly, and whether an in-place weight update (a LoRA merge) is seen.

`--method aoti` measures AOTInductor instead: the step exported (`torch.export`) and compiled into a
shared library whose weights are not inside it (`package_constants_in_so=False`); the loading process
hands it the module's own weight tensors (`load_constants(..., user_managed=True)`), so an in-place
update is still seen and nothing of the weights is copied. Loading it needs no Dynamo, no Inductor
Python code and no Triton runtime: the question is what that saves of a warm start.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _unet_and_inputs(model: str, device: str):
    from unet_step import prepared_unet  # bench/, the script's own folder

    from diffjet.models import PRESETS

    unet = prepared_unet(model, device=device)
    dtype = unet.dtype
    latent = PRESETS[model].height // 8
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, latent, latent, generator=g).to(device, dtype)
    sample = sample.contiguous(memory_format=torch.channels_last)
    states = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).to(device, dtype)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        size = PRESETS[model].height
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 1280, generator=g).to(device, dtype),
                                       "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2).to(device, dtype)}
    return unet, (sample, torch.tensor(999.0, device=device), states), kwargs


def step(unet, sample, timestep, states, added_cond_kwargs=None):
    return unet(sample, timestep, states, added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]


class _Step(torch.nn.Module):
    """The UNet step as a module, for `torch.export` (its weights keep their FQNs under `unet.`)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, states, added_cond_kwargs=None):
        return step(self.unet, sample, timestep, states, added_cond_kwargs)


def _probe_weights(unet) -> dict:
    """Two weights an in-place LoRA merge would write: the last Linear's and the output convolution's."""
    linear = [m for m in unet.modules() if isinstance(m, torch.nn.Linear)][-1]
    return {"linear": linear.weight, "conv_out": unet.conv_out.weight}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def save(model: str, device: str, path: str, method: str = "aot-compile") -> dict:
    unet, args, kwargs = _unet_and_inputs(model, device)
    if method == "aoti":
        start = time.perf_counter()
        with torch.no_grad():
            program = torch.export.export(_Step(unet), args, kwargs)
            exported_s = time.perf_counter() - start
            torch._inductor.aoti_compile_and_package(program, package_path=path, inductor_configs={
                "conv_1x1_as_mm": True, "aot_inductor.package_constants_in_so": False})
        return {"export_s": exported_s, "compile_s": time.perf_counter() - start,
                "artifact_mb": Path(path).stat().st_size / 2**20}
    if hasattr(torch._dynamo.config, "enable_aot_compile"):  # off by default before torch 2.12
        torch._dynamo.config.enable_aot_compile = True
    compiled = torch.compile(step, fullgraph=True, dynamic=False, options={
        "conv_1x1_as_mm": True, "guard_filter_fn": torch.compiler.keep_portable_guards_unsafe})
    start = time.perf_counter()
    with torch.no_grad():
        function = compiled.aot_compile(((unet, *args), kwargs))
        _sync()
        compile_s = time.perf_counter() - start
        function.save_compiled_function(path)
    return {"compile_s": compile_s, "artifact_mb": Path(path).stat().st_size / 2**20}


def _prewarm(device: str) -> float:
    """Seconds to initialise cuBLAS, cuDNN and SDPA with one tiny half-precision call each: what a pipeline's
    text encoder has done before its UNet's first call, and part of what a first call pays otherwise."""
    start = time.perf_counter()
    x = torch.randn(2, 64, 8, 8, device=device, dtype=torch.float16)
    torch.nn.functional.conv2d(x, torch.randn(64, 64, 3, 3, device=device, dtype=x.dtype), padding=1)
    q = torch.randn(2, 8, 64, 64, device=device, dtype=x.dtype)
    torch.nn.functional.scaled_dot_product_attention(q, q, q) @ q.transpose(-1, -2)
    _sync()
    return time.perf_counter() - start


def _profiled(call):
    """`call()` under torch's profiler: its result and the 15 host-side operations and CUDA API calls that took
    longest (self time), in ms."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        out = call()
        _sync()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return out, [{"name": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1000, 2)} for e in events]


def _error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.float() - reference.float()).norm() / reference.float().norm()).item()


def _median_ms(call, reps: int = 20) -> float:
    times = []
    for _ in range(reps):
        _sync()
        begin = time.perf_counter()
        call()
        _sync()
        times.append((time.perf_counter() - begin) * 1000)
    return sorted(times)[len(times) // 2]


def _captured(call):
    """`call` (already run once) captured in a CUDA graph, as diffjet's runner would hold it: the graph's
    `replay` and its static output, replayed once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # a warm-up on the capture's stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    graph.replay()
    return graph.replay, out


def load(model: str, device: str, path: str, spawned_at: float, method: str = "aot-compile") -> dict:
    import diffusers  # noqa: F401 - imports are timed apart from loading
    import diffjet  # noqa: F401

    imported = time.time()
    unet, args, kwargs = _unet_and_inputs(model, device)
    loaded_model = time.time()
    if method.startswith("aoti"):
        if method.startswith("aoti-direct"):
            # The package's C++ loader alone: `aoti_load_package` first checks the CPU's vector instruction
            # sets (`load_pt2` → `get_device_information`), which builds and runs a test program per set.
            from torch.export.pt2_archive._package import AOTICompiledModel

            # Single-threaded runs skip the container's wait for its previous run (`cudaEventSynchronize`),
            # which a CUDA graph's capture cannot contain.
            single_threaded = "-graph" in method
            runner = AOTICompiledModel(torch._C._aoti.AOTIModelPackageLoader(path, "model", single_threaded, 1, -1))
        else:
            runner = torch._inductor.aoti_load_package(path)
        package_loaded = time.time()
        weights = {f"unet.{name}": t for name, t in [*unet.named_parameters(), *unet.named_buffers()]}
        missing = sorted(set(runner.get_constant_fqns()) - set(weights))
        if missing:
            raise SystemExit(f"the package wants constants the UNet does not have: {missing[:5]}")
        runner.load_constants({name: weights[name] for name in runner.get_constant_fqns()},
                              check_full_update=True, user_managed=True)

        timings = {"package_s": package_loaded - loaded_model, "constants_s": time.time() - package_loaded}

        def function(unet, *args, **kwargs):
            return runner(*args, **kwargs)
    else:
        timings = {}
        with open(path, "rb") as handle:
            function = torch.compiler.load_compiled_function(handle)
    if "-prewarm" in method:
        timings["prewarm_s"] = _prewarm(device)
    loaded_function = time.time()
    with torch.no_grad():
        if method.endswith("-profiled"):
            out, timings["first_call_profile"] = _profiled(lambda: function(unet, *args, **kwargs))
        else:
            out = function(unet, *args, **kwargs)
        _sync()
        first = time.time()
        reference = step(unet, *args, **kwargs)
        error = _error(out, reference)
        if "-graph" in method:
            replay, graph_out = _captured(lambda: function(unet, *args, **kwargs))
            timings["graph_error_vs_eager"] = _error(graph_out, reference)
        seen = {}
        for name, weight in _probe_weights(unet).items():  # what an in-place LoRA merge does to a weight
            before = function(unet, *args, **kwargs).clone()
            weight.mul_(1.5)
            seen[name] = not torch.equal(function(unet, *args, **kwargs), before)
        if "-graph" in method:  # the weights changed in place above: a replay must see that too
            replay()
            timings["graph_sees_weight_updates"] = _error(graph_out, function(unet, *args, **kwargs)) < 1e-3
            timings["graph_replay_ms"] = _median_ms(replay)
        call_ms = _median_ms(lambda: function(unet, *args, **kwargs))
    return {
        "import_s": imported - spawned_at, "load_model_s": loaded_model - imported,
        "load_compiled_s": loaded_function - loaded_model, "first_call_s": first - loaded_function,
        "start_to_first_step_s": first - spawned_at, "error_vs_eager": error,
        "in_place_weight_update_seen": seen, "call_ms_median": call_ms, **timings,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--method", default="aot-compile",
                        help="comma-separated: aot-compile (what diffjet's cache keeps), aoti (loaded with "
                             "aoti_load_package), aoti-direct (the same package, loaded by its C++ loader) and/or "
                             "aoti-direct-prewarm (the same, with cuBLAS, cuDNN and SDPA used once before the "
                             "first call, as a pipeline's text encoder does: prewarm_s); '-graph' in a method's name "
                             "also captures the function in a CUDA graph (graph_error_vs_eager, "
                             "graph_sees_weight_updates, graph_replay_ms); a method ending in -profiled runs "
                             "its first call under torch's profiler (first_call_profile)")
    parser.add_argument("--json")
    parser.add_argument("--phase", choices=("save", "load"), help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--spawned-at", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "save":
        print("RESULT " + json.dumps(save(args.model, args.device, args.path, args.method)))
        return
    if args.phase == "load":
        print("RESULT " + json.dumps(load(args.model, args.device, args.path, args.spawned_at, args.method)))
        return

    from diffjet.bench import environment
    from diffjet.models import resolve

    resolve(args.model)  # build the preset before any process is timed
    report = {**environment(args.device), "command": "python " + " ".join(sys.argv), "model": args.model}
    with tempfile.TemporaryDirectory() as folder:
        for method in args.method.split(","):
            report[method] = {}
            kind = "aoti" if method.startswith("aoti") else method.removesuffix("-profiled")  # one package
            path = str(Path(folder) / f"unet-step-{kind}.pt2")
            for phase in ("save", "load") if not Path(path).exists() else ("load",):
                # Each process with Inductor and Triton folders of its own: the loading one finds only the file.
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{folder}/{method}-{phase}/inductor",
                       "TRITON_CACHE_DIR": f"{folder}/{method}-{phase}/triton"}
                cmd = [sys.executable, __file__, "--model", args.model, "--device", args.device, "--phase", phase,
                       "--method", kind if phase == "save" else method, "--path", path,
                       "--spawned-at", repr(time.time())]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if not lines:
                    report[method][phase] = {"error": proc.stderr.strip().splitlines()[-8:]}
                    break
                report[method][phase] = json.loads(lines[-1][7:])
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
