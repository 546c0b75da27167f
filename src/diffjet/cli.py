"""The `diffjet` command: `generate`, `bench`, `verify`, `compile`, `cache`, `serve`.

Bad input never ends in a traceback: every argument and output path is checked before any work, and
every `DiffjetError` becomes one line on stderr and exit code 2; `verify` exits 1 when the compiled
pipeline breaks the lossless rule. torch, diffusers and the server's libraries are imported inside the
commands, so that `diffjet --help` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from . import console
from .bench.recipes import COMPILERS, DIFFJET, SCHEDULERS
from .errors import CacheError, ConfigError, DeviceError, DiffjetError, OutputError
from .runtime.files import write_atomically


def _write_atomically(target: Path, write) -> None:
    """Write an output file; a write that fails after the checks (a full disk, a folder removed meanwhile)
    is one line too, after the results were printed."""
    try:
        write_atomically(target, write)
    except OSError as error:
        raise OutputError(f"cannot write {target} ({error.strerror or error}); the results are printed above") from error


# -- validation --------------------------------------------------------------------------------
def _positive(name: str, value: int) -> int:
    if value < 1:
        raise ConfigError(f"{name} must be at least 1, got {value}")
    return value


def _size(name: str, value: int | None) -> int | None:
    if value is not None and (value < 8 or value % 8):
        raise ConfigError(f"{name} must be a positive multiple of 8 (the VAE downsamples by 8), got {value}")
    return value


def _seed(value: int) -> int:
    from .config import MAX_SEED

    if not 0 <= value <= MAX_SEED:
        raise ConfigError(f"--seed must be a whole number from 0 to {MAX_SEED}, got {value}")
    return value


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    return value


def _lora(args: argparse.Namespace, *, random_allowed: bool) -> None:
    """Refuse a `--lora` that is not there (or "random" where it is allowed) and a `--lora-scale` that is not
    finite, before any work."""
    _finite("--lora-scale", args.lora_scale)
    if args.lora and not (random_allowed and args.lora == "random") and not os.path.exists(args.lora):
        raise ConfigError(f"--lora: no such file or folder: {args.lora}")


def _device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but no CUDA GPU is visible (torch.cuda.is_available() is False)")
    return requested


def _writable_file(path: str, suffixes: tuple[str, ...]) -> Path:
    """`path` as an output file, checked by creating (and removing) a file beside it: permissions, a
    read-only or special file system, a folder in its place all show now, not after the work."""
    target = Path(path)
    if target.suffix.lower() not in suffixes:
        raise OutputError(f"{path}: the output file must end in {' or '.join(suffixes)}")
    if target.is_dir():
        raise OutputError(f"{path} is a folder; name a file to write")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{path}: folder {parent} does not exist")
    if target.exists() and not os.access(target, os.W_OK):
        raise OutputError(f"{path}: not writable")
    _probe_folder(parent, path)
    return target


def _probe_folder(folder: Path, shown: str) -> None:
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".diffjet-probe-"):
            pass
    except OSError as error:
        raise OutputError(f"{shown}: cannot write in {folder} ({error.strerror or error})") from None


def _compilers(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c not in COMPILERS]
    if unknown or not names:
        raise ConfigError(f"--compiler: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(COMPILERS)}")
    return names


def _refuse_fp8_where_it_cannot_run(compilers: Sequence[str], device: str) -> None:
    """A variant that forces fp8 (`Config(fp8=True)` or "max") fails on a device without fp8 GEMMs: say so before any
    pipeline is built, in the CLI's terms (`diffjet-fast` asks for fp8 only where the GPU has it)."""
    import torch

    from .passes import fp8

    forced = [c for c in compilers if c in DIFFJET and DIFFJET[c]().fp8_required]
    reason = fp8.unsupported(torch.device(device)) if forced else None
    if reason:
        raise DeviceError(f"--compiler {', '.join(forced)}: {reason}; diffjet-fast uses fp8 only where the GPU has it")


def _default_model(device: str) -> str:
    return "sd15" if device == "cuda" else "tiny"


def _native_size(model: str) -> tuple[int | None, int | None]:
    from .models import PRESETS

    preset = PRESETS.get(model)
    return (preset.height, preset.width) if preset else (None, None)


# -- generate ----------------------------------------------------------------------------------
def _check_for_pipeline(pipeline_class: str | None, scheduler: str, negative_prompt: str | None = None) -> None:
    """`recipes.refused` as one line for the command line."""
    from .bench.recipes import refused

    problem = refused(pipeline_class, scheduler, negative_prompt)
    if problem is not None:
        field, why = problem
        raise ConfigError(f"--scheduler {scheduler}: {why}" if field == "scheduler" else f"--negative-prompt: {why}")


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .config import MAX_GUIDANCE

    device = _device(args.device)
    model = args.model or _default_model(device)
    steps = _positive("--steps", args.steps)
    native_h, native_w = _native_size(model)
    height = _size("--height", args.height) or native_h
    width = _size("--width", args.width) or native_w
    _seed(args.seed)
    if args.guidance is not None and not 0 <= _finite("--guidance", args.guidance) <= MAX_GUIDANCE:
        raise ConfigError(f"--guidance must be from 0 to {MAX_GUIDANCE:g} (1 or less turns classifier-free guidance "
                          f"off), got {args.guidance:g}")
    _lora(args, random_allowed=False)
    out = _writable_file(args.out, (".png",))

    from PIL.PngImagePlugin import PngInfo

    from .bench import recipes
    from .models import control_inputs, half_precision, load_pipeline, pipeline_class_name
    from .models.loading import default_guidance

    _check_for_pipeline(pipeline_class_name(model), args.scheduler, args.negative_prompt)  # before loading, if known
    dtype = half_precision(model) if device == "cuda" else torch.float32
    pipe = load_pipeline(model, device=device, dtype=dtype)
    _check_for_pipeline(type(pipe).__name__, args.scheduler, args.negative_prompt)
    recipes.set_scheduler(pipe, args.scheduler)
    guidance = args.guidance if args.guidance is not None else default_guidance(type(pipe).__name__)
    compiler = _fast_or(args)
    on_diffjet = compiler in DIFFJET
    if args.lora and not on_diffjet:  # the other recipes compile what diffusers merged
        pipe.load_lora_weights(args.lora)
        pipe.fuse_lora(lora_scale=args.lora_scale)
    applied = recipes.apply(pipe, compiler)
    if args.lora and on_diffjet:
        import diffjet

        diffjet.load_lora(pipe, args.lora, scale=args.lora_scale)
    for option in applied.get("lossy", []):
        print(f"diffjet: LOSSY option on: {option} (diffjet verify --fast prints what it costs)", file=sys.stderr)
    image = pipe(
        **control_inputs(pipe, height, width),
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        num_inference_steps=steps,
        height=height,
        width=width,
        **({} if guidance is None else {"guidance_scale": guidance}),
        generator=torch.Generator("cpu").manual_seed(args.seed),
    ).images[0]

    parameters = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "model": model,
        "steps": steps,
        "height": image.height,
        "width": image.width,
        "seed": args.seed,
        "guidance": guidance,
        "scheduler": type(pipe.scheduler).__name__,
        "compiler": compiler,
        **({"lora": args.lora, "lora_scale": args.lora_scale} if args.lora else {}),
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
    }
    info = PngInfo()
    info.add_text("parameters", json.dumps(parameters, sort_keys=True))
    info.add_text("software", "diffjet")
    _write_atomically(out, lambda handle: image.save(handle, format="PNG", pnginfo=info))
    print(f"wrote {out} ({image.width}x{image.height}, seed {args.seed}, {steps} steps)")
    return 0


# -- bench -------------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import bench

    device = _device(args.device)
    models = [m.strip() for m in (args.model or _default_model(device)).split(",") if m.strip()]
    compilers = _compilers(args.compiler)
    _refuse_fp8_where_it_cannot_run(compilers, device)
    steps = _positive("--steps", args.steps)
    batch = _positive("--batch", args.batch)
    repeats = _positive("--repeats", args.repeats)
    _positive("--unet-repeats", args.unet_repeats)
    _positive("--warmup", args.warmup)
    if args.timeout is not None and not args.timeout > 0:
        raise ConfigError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    _size("--height", args.height)
    _size("--width", args.width)
    _seed(args.seed)
    sizes = _resolutions(args.resolutions) if args.resolutions else None
    json_path = _writable_file(args.json, (".json",)) if args.json else None
    plot_path = _writable_file(args.plot, (".png",)) if args.plot else None

    from .models import PRESETS, pipeline_class_name, resolve

    # An unknown model fails now, once, not in every worker; folders and hub ids are checked before any
    # preset is built.
    for model in sorted(models, key=lambda m: m in PRESETS):
        resolve(model)
        _check_for_pipeline(pipeline_class_name(model), args.scheduler)
    specs = []
    for model in models:
        native_h, native_w = _native_size(model)
        height, width = args.height or native_h or 512, args.width or native_w or 512
        for compiler in compilers:
            specs.append(
                dict(model=model, compiler=compiler, device=device, prompt=args.prompt, steps=steps,
                     scheduler=args.scheduler, resolutions=[[h, w] for w, h in sizes] if sizes else None,
                     height=height, width=width, batch=batch, seed=args.seed, warmup=args.warmup,
                     repeats=repeats, unet_repeats=args.unet_repeats, time_warm_start=not args.skip_warm_start)
            )
    if device == "cpu" and any(c in DIFFJET for c in compilers):
        print("diffjet: note: CPU timings only show that bench works: on a CPU diffjet applies channels-last "
              "and fused attention alone (no half precision, Inductor, kernels or CUDA graphs); time it on a GPU",
              file=sys.stderr)
    def report(runs: list[dict[str, Any]], **extra: Any) -> Callable[[Any], Any]:
        data = {**bench.environment(device), "command": args.command_line, "runs": runs, **extra}
        return lambda h: h.write((json.dumps(data, indent=2) + "\n").encode())

    with tqdm(total=len(specs), desc="bench", unit="variant", file=sys.stderr) as bar:
        def progress(runs: list[dict[str, Any]]) -> None:
            bar.set_postfix_str(f"{runs[-1]['model']}/{runs[-1]['compiler']}")
            bar.update()
            # Specs, not runs, are counted: a spec over several resolutions gives a run for each.
            if json_path and bar.n < len(specs):  # a run stopped part-way keeps what it measured
                with contextlib.suppress(OSError):
                    write_atomically(json_path, report(runs, incomplete=True))

        runs = bench.run_bench(specs, on_result=progress, timeout=args.timeout)
    print(bench.format_table(runs))
    if json_path:
        _write_atomically(json_path, report(runs))
        print(f"wrote {json_path}")
    if plot_path:
        _write_atomically(plot_path, lambda h: bench.plot(runs, h))
        print(f"wrote {plot_path}")
    return 1 if any("error" in r for r in runs) else 0


# -- verify ------------------------------------------------------------------------------------
def _verify_lora_steps(lora: str, scale: float, height: int, width: int, config):
    """How `verify --lora` readies its pipelines: diffusers' `load_lora_weights` + `fuse_lora` for the eager
    ones; for diffjet's, compile, load another LoRA, generate (so graphs are captured), then switch to this one.
    "random" is `diffjet.models.random_lora(seed=0)`, drawn once from the float32 reference pipeline."""
    import diffjet

    from .models import control_inputs, random_lora

    drawn: dict[str, Any] = {}

    def lora_for(pipe):
        if lora != "random":
            return lora
        if "state" not in drawn:
            drawn["state"] = random_lora(pipe, seed=0)
        return dict(drawn["state"])  # diffusers' loader may pop keys

    def prepare_eager(pipe):
        pipe.load_lora_weights(lora_for(pipe))
        pipe.fuse_lora(lora_scale=scale)
        return pipe

    def compile_pipe(pipe):
        target = lora_for(pipe)
        diffjet.compile(pipe, config)
        diffjet.load_lora(pipe, random_lora(pipe, seed=1), adapter_name="previous")
        pipe(prompt="warm-up", num_inference_steps=2, height=height, width=width,
             output_type="latent", **control_inputs(pipe, height, width))
        diffjet.unload_lora(pipe, "previous")
        diffjet.load_lora(pipe, target, scale=scale)
        return pipe

    return compile_pipe, prepare_eager


def cmd_verify(args: argparse.Namespace) -> int:
    import torch

    import diffjet

    from . import quality
    from .models import half_precision, load_pipeline

    device = _device(args.device)
    _refuse_fp8_where_it_cannot_run([_fast_or(args)], device)
    model = args.model or _default_model(device)
    steps = _positive("--steps", args.steps if args.steps is not None else (30 if device == "cuda" else 4))
    native_h, native_w = _native_size(model)
    height = _size("--height", args.height) or native_h
    width = _size("--width", args.width) or native_w
    _seed(args.seed)
    _lora(args, random_allowed=True)
    json_path = _writable_file(args.json, (".json",)) if args.json else None
    from .models import resolve

    path = resolve(model)
    from .bench import recipes

    compiler = _fast_or(args)
    config = recipes.DIFFJET[compiler]()
    compile_pipe, prepare_eager = (lambda pipe: diffjet.compile(pipe, config)), None
    if args.lora:
        compile_pipe, prepare_eager = _verify_lora_steps(args.lora, args.lora_scale, height, width, config)
    verdict = quality.verify(
        lambda dtype: load_pipeline(path, device=device, dtype=dtype),
        device=torch.device(device),
        prompt=args.prompt,
        steps=steps,
        height=height,
        width=width,
        seed=args.seed,
        compile_pipe=compile_pipe,
        prepare_eager=prepare_eager,
        half=half_precision(model),
    )
    with_lora = f", LoRA {args.lora} at scale {args.lora_scale}" if args.lora else ""
    print(f"fidelity of {compiler} on {model}{with_lora} ({device}, {steps} steps), "
          f"reference: {verdict.reference}")
    print(verdict.table())
    if verdict.lossy is not None:
        print(verdict.lossy.table())
    if json_path:
        from dataclasses import asdict

        from . import bench

        record = {**bench.environment(device), "command": args.command_line, "model": model,
                  "compiler": compiler, "lora": args.lora, "lora_scale": args.lora_scale if args.lora else None,
                  "steps": steps, "passed": verdict.passed if verdict.lossy is None else None,
                  "final_latents_decide": verdict.latents_decide, **asdict(verdict)}
        _write_atomically(json_path, lambda h: h.write((json.dumps(record, indent=2) + "\n").encode()))
        print(f"wrote {json_path}")
    c = verdict.candidate
    if verdict.lossy is not None:
        if not c.finite:
            print("diffjet: FAIL: NaN/Inf in the output", file=sys.stderr)
            return 1
        print(f"diffjet: LOSSY ({', '.join(verdict.lossy.options)}): not held to the lossless rule; its cost is above")
        return 0
    if not verdict.passed:
        why = "NaN/Inf in the output" if not c.finite else "error above 1.5x eager half precision"
        print(f"diffjet: FAIL: {why}", file=sys.stderr)
        return 1
    print("diffjet: PASS (lossless)" if verdict.latents_decide else
          f"diffjet: PASS (lossless, by the one-step error; the final latents cannot tell at {steps} steps)")
    return 0


def _fast_or(args: argparse.Namespace) -> str:
    """The variant a command runs: `--fast` is `--compiler diffjet-fast`."""
    return "diffjet-fast" if getattr(args, "fast", False) else args.compiler


# -- compile (ahead of deployment) --------------------------------------------------------------
def _resolutions(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        try:
            width, height = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--resolutions: {item!r} is not WIDTHxHEIGHT (e.g. 512x768)") from None
        sizes.append((_size("width", width), _size("height", height)))
    if not sizes:
        raise ConfigError("--resolutions: give at least one WIDTHxHEIGHT")
    return sizes


def _batches(text: str, option: str = "--batch") -> list[int]:
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"{option}: {text!r} is not a comma-separated list of whole numbers (e.g. 1,2)") from None
    if not batches:
        raise ConfigError(f"{option}: give at least one batch size")
    return [_positive(option, b) for b in batches]


def cmd_compile(args: argparse.Namespace) -> int:
    import time

    import torch
    from tqdm import tqdm

    import diffjet

    from .models import half_precision, load_pipeline

    if _device(args.device) != "cuda":
        raise DeviceError("diffjet compile builds GPU kernels, and no CUDA GPU is visible here")
    sizes = _resolutions(args.resolutions) if args.resolutions else None
    batches = _batches(args.batch)
    from .runtime.compile_cache import open_cache

    target = open_cache(args.cache)  # refuses an unsafe folder before any work
    if not target.writable:
        raise CacheError(f"compile cache {target.directory} is {target.read_only_reason}; give --cache a folder "
                         "this user can write")
    model = args.model or "sd15"
    sizes = sizes or [_model_native_size(model)]
    pipe = load_pipeline(model, device="cuda", dtype=half_precision(model))
    pipe.set_progress_bar_config(disable=True)
    diffjet.compile(pipe, diffjet.Config(cache_dir=args.cache, precompile=args.precompile))
    cache = pipe.diffjet.cache
    rows = []
    shapes = [(w, h, b) for w, h in sizes for b in batches]
    with tqdm(shapes, desc="compile", unit="shape", file=sys.stderr) as bar:
        for width, height, batch in bar:
            bar.set_postfix_str(f"{width}x{height} batch {batch}")
            start = time.perf_counter()
            pipe(args.prompt, num_inference_steps=2, height=height, width=width, num_images_per_prompt=batch,
                 output_type="latent" if args.skip_vae else "pil")
            torch.cuda.synchronize()
            rows.append((f"{width}x{height}", batch, time.perf_counter() - start))
    kept = "AOTInductor packages" if args.precompile == "aoti" else "saved functions"
    print(f"compiled {model} into {cache.directory} ({kept})")
    for size, batch, seconds in rows:
        print(f"  {size:>9} batch {batch}: {seconds:6.1f} s")
    stats = cache.stats
    print(f"  cache: {stats.hits} loaded, {stats.stored} stored, {stats.rejected} rebuilt; "
          f"total {sum(r[2] for r in rows):.1f} s")
    for name, runner in pipe.diffjet.runners.items():
        print(f"  {name}: {runner.graphs_held} CUDA graph(s)")
    return 0


# -- cache -------------------------------------------------------------------------------------
def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def cmd_cache(args: argparse.Namespace) -> int:
    import datetime as dt

    from .runtime.compile_cache import default_cache_dir, open_cache

    if args.max_gib is not None and (args.action != "prune" or args.max_gib < 0):
        raise ConfigError("--max-gib goes with prune, as a number of GiB (0 or more)")
    folder = Path(args.cache) if args.cache else default_cache_dir()
    if not folder.exists():  # nothing compiled with it yet: nothing to list, check or prune
        print(f"compile cache {folder}: not created yet, 0 entries (`diffjet compile` or a compiled pipeline's "
              "first call at a new size fills it)")
        return 0
    # ls and verify read meta.json and hash files; nothing is unpickled, and nothing is written.
    cache = open_cache(folder, read_only=args.action != "prune")
    signed = "signed entries only" if cache.key is not None else "unsigned ($DIFFJET_CACHE_KEY not set)"
    if args.action == "prune":
        removed = cache.prune(None if args.max_gib is None else int(args.max_gib * 2**30))
        left = cache.entries()
        print(f"pruned {len(removed)} entr{'y' if len(removed) == 1 else 'ies'} ({_gib(sum(i.bytes for i in removed))}) "
              f"from {cache.directory}; {len(left)} left ({_gib(sum(i.bytes for i in left))})")
        return 0
    infos = cache.entries()
    print(f"compile cache {cache.directory}: {len(infos)} entries, {_gib(sum(i.bytes for i in infos))}; {signed}")
    broken = 0
    for info in reversed(infos):  # most recently used first
        used = dt.datetime.fromtimestamp(info.last_used).strftime("%Y-%m-%d %H:%M") if info.last_used else "-"
        about = info.about
        line = (f"  {info.path.name[:12]}  {used:16}  {_gib(info.bytes):>10}  {about.get('component') or '?':14}  "
                f"{about.get('model') or '?'}  [{(about.get('signature') or '?')[:48]}]")
        if args.action == "verify":
            problem = cache.verify(info) if info.readable else "unreadable meta.json"
            broken += problem is not None
            line += f"  {'ok' if problem is None else 'BROKEN: ' + problem}"
        print(line)
    if broken:
        print(f"diffjet: {broken} broken entr{'y' if broken == 1 else 'ies'}: never loaded; `diffjet cache prune` "
              "deletes them (a process that needs one rebuilds it)", file=sys.stderr)
    return 1 if broken else 0


# -- serve -------------------------------------------------------------------------------------
def _serve_settings(args: argparse.Namespace, device: str, model: str):
    """`ServeSettings` from the options, every check done; the model is not resolved yet."""
    from .serve.settings import ServeSettings, is_loopback, read_api_key

    api_key = read_api_key(args.api_key_file) if args.api_key_file else None
    if not is_loopback(args.host) and api_key is None:
        raise ConfigError(f"--host {args.host} takes requests from other machines: give --api-key-file too "
                          "(a bearer token every request must send)")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be from 0 to 65535, got {args.port}")
    if args.resolutions:
        sizes = _resolutions(args.resolutions)
    else:
        height, width = _native_size(model)
        sizes = [(width or 512, height or 512)]
    if args.ray:
        _ray_options(args)
    if args.precompile != "function" and args.compiler == "eager":
        raise ConfigError("--precompile is what diffjet's compile cache keeps; --compiler eager compiles nothing")
    return ServeSettings(
        model=model, model_name=model, sizes=tuple(sizes), device=device, compiler=args.compiler,
        precompile=args.precompile,
        lora_dir=Path(args.lora_dir) if args.lora_dir else None, lora_base_copy=args.lora_base_copy,
        max_batch=args.max_batch,
        batch_sizes=tuple(_batches(args.batch_sizes, "--batch-sizes")) if args.batch_sizes else (),
        max_wait_ms=_finite("--max-wait-ms", args.max_wait_ms), queue=args.queue,
        allow_new_sizes=args.allow_new_sizes, max_pixels=args.max_pixels,
        timeout_s=_finite("--timeout", args.timeout), default_steps=args.steps, max_steps=args.max_steps,
        max_images=args.max_images, max_body_bytes=args.max_body_kib * 1024, api_key=api_key,
    )


def _ray_options(args: argparse.Namespace) -> None:
    _positive("--replicas", args.replicas)
    low, high = args.min_replicas, args.max_replicas
    if (low is None) != (high is None):
        raise ConfigError("--min-replicas and --max-replicas go together (autoscaling bounds)")
    if low is not None and not 0 <= low <= high or high is not None and high < 1:
        raise ConfigError(f"autoscaling bounds: need 0 <= --min-replicas <= --max-replicas and at least 1 "
                          f"replica at most, got {low} and {high}")
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ConfigError("--ray needs Ray Serve: pip install 'diffjet[ray]'")


def cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses

    device = _device(args.device)
    model = args.model or _default_model(device)
    settings = _serve_settings(args, device, model)
    from .models import PRESETS, resolve
    from .serve import server

    sock = None if args.ray else server.bind(args.host, args.port)
    path = resolve(model)  # a preset is built on first use; an unknown model is one line
    if not args.resolutions and model not in PRESETS:
        settings = dataclasses.replace(settings, sizes=(_folder_native_size(path),))
    settings = dataclasses.replace(settings, model=path)
    if args.ray:
        from .serve import ray as ray_serve

        ray_serve.run(settings, args.host, args.port, replicas=args.replicas, min_replicas=args.min_replicas,
                      max_replicas=args.max_replicas, gpus_per_replica=1 if device == "cuda" else 0)
    else:
        server.run(settings, sock, access_log=args.verbose)
    return 0


def _model_native_size(model: str) -> tuple[int, int]:
    """(width, height) of a preset, a diffusers folder or a hub id's images by default."""
    from .models import PRESETS, resolve

    if model in PRESETS:
        height, width = _native_size(model)
        return width, height
    return _folder_native_size(resolve(model))


def _folder_native_size(path: str) -> tuple[int, int]:
    """(width, height) a diffusers folder's model was trained at, as its pipeline's default size: the UNet's or
    DiT's sample size in latent pixels × the VAE's scale (Flux's transformer gives none: its pipeline's 128);
    512² when not known."""
    folder = Path(path)

    def config(name: str) -> dict | None:
        try:
            found = json.loads((folder / name / "config.json").read_text())
        except (OSError, ValueError):
            return None
        return found if isinstance(found, dict) else None

    vae = config("vae") or {}
    scale = 2 ** (len(vae.get("block_out_channels") or [0] * 4) - 1)
    for name, default in (("unet", None), ("transformer", 128)):
        model = config(name)
        if model is None:
            continue
        side = model.get("sample_size", default)
        if isinstance(side, int):
            return side * scale, side * scale
    return 512, 512


# -- entry point -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffjet", description="Fast, faithful Stable Diffusion pipelines.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log what diffjet does, and show the third-party lines hidden by default")
    sub = parser.add_subparsers(dest="command", required=True)

    def precompile_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--precompile", choices=("function", "aoti"), default="function",
                       help="what the compile cache keeps for the next start (Config.precompile): function, or aoti "
                            "(experimental: AOTInductor packages; diffjet's part of sd15's warm start 1.5-2.0 s "
                            "against 3.6-5.3 s, its first compile about 2.3x as long). Entries of either kind are "
                            "loaded whatever this says")

    def common(p: argparse.ArgumentParser, steps_default: int | None) -> None:
        p.add_argument("--model", help="preset (tiny, tiny-sdxl, sd15, sd21, sdxl, flux-dev, sd35-medium, ...), "
                                       "diffusers folder or hub id (default: sd15 on a GPU, tiny on a CPU)")
        p.add_argument("--prompt", default="an astronaut riding a horse on mars, highly detailed")
        p.add_argument("--steps", type=int, default=steps_default)
        p.add_argument("--height", type=int, help="pixels, a multiple of 8 (default: the model's native size)")
        p.add_argument("--width", type=int, help="pixels, a multiple of 8 (default: the model's native size)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")

    gen = sub.add_parser("generate", help="generate one image")
    common(gen, 30)
    gen.add_argument("--negative-prompt")
    gen.add_argument("--guidance", type=float, help="default: the model's own (SD 7.5, FLUX.1-dev 3.5, SD 3.5 7.0)")
    gen.add_argument("--scheduler", choices=tuple(SCHEDULERS), default="default", help="default: the model's own")
    gen.add_argument("--out", "-o", required=True, help="PNG file to write")
    gen.add_argument("--compiler", choices=COMPILERS, default="diffjet")
    gen.add_argument("--lora", help="a LoRA file (.safetensors, diffusers/PEFT or kohya format) or folder, merged at "
                     "--lora-scale: with diffjet.load_lora on diffjet's compilers, with diffusers' load_lora_weights + "
                     "fuse_lora (which needs peft) on the others")
    gen.add_argument("--lora-scale", type=float, default=1.0)
    gen.add_argument("--fast", action="store_true", help="lossy fast modes where supported (= --compiler "
                     "diffjet-fast): step cache, and fp8 GEMMs on GPUs that have them; `diffjet verify --fast` prints "
                     "what they cost")
    gen.set_defaults(func=cmd_generate)

    ben = sub.add_parser("bench", help="time eager, torch-compile and diffjet side by side")
    common(ben, 30)
    ben.add_argument("--compiler", default="eager,torch-compile,diffjet", help="comma-separated, from: " + ", ".join(COMPILERS))
    ben.add_argument("--batch", type=int, default=1, help="images per prompt")
    ben.add_argument("--scheduler", choices=tuple(SCHEDULERS), default="euler",
                     help="euler (default, as the measurement protocol says) or another; 'default' is the model's own")
    ben.add_argument("--warmup", type=int, default=2, help="untimed calls after the first")
    ben.add_argument("--repeats", type=int, default=10, help="timed pipeline calls")
    ben.add_argument("--unet-repeats", type=int, default=50, help="timed UNet-only calls")
    ben.add_argument("--resolutions", help="WIDTHxHEIGHT list timed one after another in the same process "
                                          "(then once more, all warm, counting recompiles)")
    ben.add_argument("--skip-warm-start", action="store_true",
                     help="do not time diffjet's warm start (a second process with the compile cache)")
    ben.add_argument("--timeout", type=float, help="seconds a variant may take (default: no limit)")
    ben.add_argument("--json", help="write the results here")
    ben.add_argument("--plot", help="write a bar chart (PNG) here")
    ben.set_defaults(func=cmd_bench)

    comp = sub.add_parser("compile", help="precompile for given resolutions into the compile cache (GPU)")
    comp.add_argument("--model", help="preset, diffusers folder or hub id (default: sd15)")
    comp.add_argument("--resolutions", help="comma-separated WIDTHxHEIGHT list (default: the model's native size)")
    comp.add_argument("--batch", default="1", help="comma-separated images per prompt")
    comp.add_argument("--cache", help="compile cache folder (default: $DIFFJET_CACHE_DIR/compile or ~/.cache/diffjet/compile)")
    comp.add_argument("--prompt", default="warm-up")
    comp.add_argument("--skip-vae", action="store_true", help="compile only the UNet and text encoders")
    comp.add_argument("--device", choices=("auto", "cuda"), default="auto")
    precompile_option(comp)
    comp.set_defaults(func=cmd_compile)

    cac = sub.add_parser("cache", help="list, check or prune the compile cache")
    cac.add_argument("action", choices=("ls", "verify", "prune"),
                     help="ls: entries with size, last use and model; verify: also check sizes, hashes and "
                          "signatures; prune: delete broken entries and stale staging folders (and, with --max-gib, "
                          "the least recently used entries until the cache fits)")
    cac.add_argument("--cache", help="compile cache folder (default: $DIFFJET_CACHE_DIR/compile or ~/.cache/diffjet/compile)")
    cac.add_argument("--max-gib", type=float, help="prune: the size to keep the cache within")
    cac.set_defaults(func=cmd_cache)

    srv = sub.add_parser("serve", help="an HTTP image service (OpenAI and AUTOMATIC1111 APIs) with batching")
    srv.add_argument("--model", help="preset, diffusers folder or hub id (default: sd15 on a GPU, tiny on a CPU)")
    srv.add_argument("--resolutions", help="WIDTHxHEIGHT list served and warmed before ready; the first is the "
                                           "default (default: the model's native size)")
    srv.add_argument("--allow-new-sizes", action="store_true", help="also take sizes off the list (each compiles "
                     "on its first request)")
    srv.add_argument("--max-pixels", type=int, default=1536 * 1536, help="cap on width x height")
    srv.add_argument("--lora-dir", help="folder of NAME.safetensors LoRAs that requests may name")
    srv.add_argument("--lora-base-copy", default="host",
                     help="where the copies of the weights a LoRA changes live: host (pinned host memory) or device "
                          "(GPU memory: faster switches, as much GPU memory again as the weights a LoRA touches)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on; another than loopback needs --api-key-file")
    srv.add_argument("--port", type=int, default=8000, help="0: a free port (printed)")
    srv.add_argument("--api-key-file", help="file whose first line is the bearer token requests must send")
    srv.add_argument("--max-batch", type=int, default=4, help="images per pipeline call")
    srv.add_argument("--batch-sizes", help="comma-separated batch sizes to warm and run (default: every size up "
                     "to --max-batch); fewer sizes, fewer compiles at start")
    srv.add_argument("--max-wait-ms", type=float, default=20.0, help="how long a batch waits to fill")
    srv.add_argument("--queue", type=int, default=64, help="images that may wait; beyond, 429 with Retry-After")
    srv.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take before 504")
    srv.add_argument("--steps", type=int, default=30, help="steps of a request that gives none")
    srv.add_argument("--max-steps", type=int, default=150)
    srv.add_argument("--max-images", type=int, default=10, help="images per request (n, batch_size)")
    srv.add_argument("--max-body-kib", type=int, default=64, help="cap on a request body")
    srv.add_argument("--compiler", choices=("eager", *DIFFJET), default="diffjet")
    srv.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    precompile_option(srv)
    srv.add_argument("--ray", action="store_true", help="serve on Ray Serve: one replica per GPU, same HTTP API")
    srv.add_argument("--replicas", type=int, default=1, help="with --ray: replicas (one GPU each)")
    srv.add_argument("--min-replicas", type=int, help="with --ray: autoscaling lower bound")
    srv.add_argument("--max-replicas", type=int, help="with --ray: autoscaling upper bound")
    srv.set_defaults(func=cmd_serve)

    ver = sub.add_parser("verify", help="check that diffjet's output equals eager within the lossless rule")
    common(ver, None)
    ver.add_argument("--lora", help="a LoRA file or folder, or \"random\" (a rank-16 LoRA drawn for the model): the "
                     "eager pipelines load it with diffusers' load_lora_weights + fuse_lora, diffjet's switches to "
                     "it on the compiled pipeline with diffjet.load_lora")
    ver.add_argument("--lora-scale", type=float, default=1.0)
    ver.add_argument("--compiler", choices=tuple(DIFFJET), default="diffjet",
                     help="the diffjet variant to check; a lossy one (diffjet-fast, diffjet-deepcache, diffjet-fp8) is reported "
                          "as LOSSY with its cost instead of PASS/FAIL")
    ver.add_argument("--fast", action="store_true", help="= --compiler diffjet-fast")
    ver.add_argument("--json", help="write the errors here")
    ver.set_defaults(func=cmd_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = "diffjet " + shlex.join(argv)
    try:
        with console.terminal(args.verbose):
            return args.func(args)
    except DiffjetError as exc:
        if args.verbose and exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__)
        print(f"diffjet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffjet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
