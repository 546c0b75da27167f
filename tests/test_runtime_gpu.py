"""CUDA-graph runtime and the fidelity rule on the GPU (marked `gpu`; skipped without CUDA)."""

import pytest
import torch
from torch import nn

import diffjet
from diffjet.config import DEFAULT_KERNELS
from diffjet.kernels import flash4
from diffjet.models import load_pipeline
from diffjet.quality import verify
from diffjet.runtime.cuda_graph import CudaGraphRunner

pytestmark = pytest.mark.gpu


class Affine(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 16, device="cuda"))

    def forward(self, x, t, scale=1.0):
        return {"out": (x @ self.weight) * t * scale, "aux": [x.sum()]}


def make_runner():
    module = Affine()
    runner = CudaGraphRunner(module.forward, torch.device("cuda"), name="affine",
                             weights=list(module.parameters()), tensor_args=(1, "t"))
    return module, runner


def test_one_capture_per_signature_then_replays():
    module, runner = make_runner()
    x4, x8 = torch.randn(4, 16, device="cuda"), torch.randn(8, 16, device="cuda")
    for step in range(5):
        for x in (x4, x8):
            out = runner(x, float(step))  # a Python timestep: one graph for every value
            torch.testing.assert_close(out["out"], module(x, float(step))["out"])
    assert runner.stats.captures == 2 and runner.graphs_held == 2
    assert runner.stats.replays == 10 and runner.stats.eager_calls == 0


def test_an_expanded_input_and_a_dense_one_of_the_same_shape_share_one_graph():
    module, runner = make_runner()
    x = torch.randn(1, 16, device="cuda")
    for batch in (x.expand(4, 16), x.expand(4, 16).contiguous(), x.repeat(4, 1) * 2):
        torch.testing.assert_close(runner(batch, 0.5)["out"], module(batch, 0.5)["out"])
    assert runner.stats.captures == 1 and runner.stats.replays == 3


def test_returned_tensors_never_alias_graph_buffers():
    _, runner = make_runner()
    x = torch.randn(4, 16, device="cuda")
    first = runner(x, 1.0)["out"]
    kept = first.clone()
    second = runner(torch.randn(4, 16, device="cuda"), 2.0)["out"]
    assert first.data_ptr() != second.data_ptr()
    torch.testing.assert_close(first, kept, rtol=0, atol=0)


def test_non_tensor_arguments_are_part_of_the_signature():
    module, runner = make_runner()
    x = torch.randn(4, 16, device="cuda")
    torch.testing.assert_close(runner(x, 1.0, scale=2.0)["out"], module(x, 1.0, scale=2.0)["out"])
    torch.testing.assert_close(runner(x, 1.0, scale=3.0)["out"], module(x, 1.0, scale=3.0)["out"])
    assert runner.stats.captures == 2


def test_in_place_weight_update_is_seen_and_a_move_recaptures():
    module, runner = make_runner()
    x = torch.randn(4, 16, device="cuda")
    runner(x, 1.0)
    with torch.no_grad():
        module.weight.mul_(2.0)
    torch.testing.assert_close(runner(x, 1.0)["out"], module(x, 1.0)["out"])
    assert runner.stats.captures == 1
    module.double()
    torch.testing.assert_close(runner(x.double(), 1.0)["out"], module(x.double(), 1.0)["out"])
    assert runner.stats.invalidations == 1 and runner.stats.captures == 2


def test_lru_bound_on_graphs():
    module, _ = make_runner()
    runner = CudaGraphRunner(module.forward, torch.device("cuda"), name="affine", max_graphs=2)
    for rows in (1, 2, 3):
        runner(torch.randn(rows, 16, device="cuda"), torch.tensor(1.0, device="cuda"))
    assert runner.graphs_held == 2


def test_memory_cap_evicts_least_recently_used_graphs_and_frees_their_memory():
    weight = torch.randn(1024, 1024, device="cuda")

    def big(x):  # 4 KiB of float32 activations per row, several times over
        return ((x @ weight).relu() @ weight).sum(dim=1)

    sizes = (16384, 8192, 12288)
    # cuBLAS keeps one workspace per stream for the process's life: let the capture stream have its own
    # before counting, so what follows measures graphs only.
    # The eager calls below need the default stream's too.
    CudaGraphRunner(big, torch.device("cuda"), name="first", max_memory=2**40)(torch.randn(8, 1024, device="cuda"))
    big(torch.randn(8, 1024, device="cuda"))
    torch.cuda.empty_cache()
    start = torch.cuda.memory_reserved()
    probe = CudaGraphRunner(big, torch.device("cuda"), name="big", max_memory=2**40)  # own pools, no eviction
    for rows in sizes:
        probe(torch.randn(rows, 1024, device="cuda"))
    footprints = [c.bytes for c in probe._graphs.values()]
    assert probe.graphs_held == 3 and min(footprints) > 0
    del probe
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() - start < min(footprints)  # dropped graphs gave their pools back

    # Room for the largest graph with 10% to spare (a capture's growth varies with how blocks split), not
    # for two: footprints are about 1, 0.5 and 0.75 of the largest, so each capture drops the one before.
    cap = int(1.1 * max(footprints))
    capped = CudaGraphRunner(big, torch.device("cuda"), name="big", max_memory=cap)
    for rows in sizes:
        x = torch.randn(rows, 1024, device="cuda")
        torch.testing.assert_close(capped(x), big(x))
        assert capped.memory_held <= cap or capped.graphs_held == 1
    assert capped.graphs_held == 1 and capped.stats.captures == 3
    del x
    torch.cuda.empty_cache()  # warm-up runs outside the graphs leave blocks in the ordinary cache
    assert torch.cuda.memory_reserved() - start < cap + min(footprints)


def test_captures_share_one_side_stream():
    weight = torch.randn(256, 256, device="cuda")
    runners = [CudaGraphRunner(lambda x: x @ weight, torch.device("cuda"), name=f"r{i}") for i in range(2)]
    for runner in runners:
        runner(torch.randn(64, 256, device="cuda"))
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    for rows in (32, 96, 128, 160):  # four more captures, each with a cuBLAS call
        for runner in runners:
            x = torch.randn(rows, 256, device="cuda")
            torch.testing.assert_close(runner(x), x @ weight)
    assert sum(r.stats.captures for r in runners) == 10
    torch.cuda.empty_cache()
    # Eight small graphs in the shared pool take a few MiB; a stream per capture would add eight cuBLAS
    # workspaces (32 MiB each on Hopper).
    assert torch.cuda.memory_reserved() - before < 64 * 2**20


def test_compiled_pipeline_steady_state_captures_nothing_new():
    pipe = load_pipeline("tiny", device="cuda", dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    diffjet.compile(pipe, diffjet.Config.fast_startup())
    for _ in range(3):
        pipe("a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    stats = pipe.diffjet.runners["unet"].stats
    assert stats.captures == 1 and stats.eager_calls == 0 and stats.replays == 9


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_fidelity_rule_holds(model):
    verdict = verify(
        lambda dtype: load_pipeline(model, device="cuda", dtype=dtype),
        device=torch.device("cuda"), prompt="an astronaut riding a horse", steps=30,
        height=None, width=None, seed=0, compile_pipe=diffjet.compile,
    )
    print(verdict.table())
    assert verdict.passed


def test_controlnet_scale_is_a_graph_input_not_a_new_graph():
    from diffjet.models import control_inputs

    pipe = load_pipeline("tiny-controlnet", device="cuda", dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    diffjet.compile(pipe, diffjet.Config.fast_startup())
    for scale in (0.5, 0.7, 1.0):
        pipe("a cat", num_inference_steps=2, controlnet_conditioning_scale=scale, **control_inputs(pipe, 64, 64))
    stats = pipe.diffjet.runners["controlnet"].stats
    assert stats.captures == 1 and stats.replays == 6


def _tiny_compiled():
    pipe = load_pipeline("tiny", device="cuda", dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    return diffjet.compile(pipe, diffjet.Config(cache=False))


def _captures_and_dynamo_graphs(pipe):
    from torch._dynamo.utils import counters

    return sum(r.stats.captures for r in pipe.diffjet.runners.values()), counters["stats"]["unique_graphs"]


def test_each_shape_compiles_and_captures_once():
    pipe = _tiny_compiled()
    shapes = [(64, 64, 1), (48, 80, 1), (80, 48, 2)]

    def run_all():
        for height, width, batch in shapes:
            pipe("a cat", num_inference_steps=2, height=height, width=width, num_images_per_prompt=batch)

    run_all()
    warm = _captures_and_dynamo_graphs(pipe)
    run_all()
    assert _captures_and_dynamo_graphs(pipe) == warm
    assert pipe.diffjet.runners["unet"].graphs_held == len(shapes)


@pytest.mark.parametrize("base_copy", ["host", "device"])
def test_lora_switch_neither_recompiles_nor_recaptures(base_copy):
    import numpy as np

    from .conftest import lora_factors, peft_format

    pipe = _tiny_compiled()

    def run():
        return pipe("a cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images

    base = run()
    warm = _captures_and_dynamo_graphs(pipe)
    pinned_before = torch.cuda.host_memory_stats()["num_host_alloc"]
    diffjet.load_lora(pipe, peft_format(lora_factors(pipe, seed=1)), adapter_name="a", base_copy=base_copy)
    copies = pipe._diffjet_lora.base.values()
    assert {c.device.type for c in copies} == {"cuda" if base_copy == "device" else "cpu"}
    assert all(c.is_pinned() for c in copies) == (base_copy == "host")
    # The host copies share one pinned buffer (plus one for the LoRA's factors), not one buffer each.
    assert torch.cuda.host_memory_stats()["num_host_alloc"] - pinned_before <= 2 < len(copies)
    with_a = run()
    diffjet.unload_lora(pipe, "a")
    diffjet.load_lora(pipe, peft_format(lora_factors(pipe, seed=2)), adapter_name="b")
    with_b = run()
    diffjet.unload_lora(pipe)
    assert not np.allclose(with_a, base) and not np.allclose(with_b, with_a)
    assert np.array_equal(run(), base)
    assert _captures_and_dynamo_graphs(pipe) == warm


@pytest.mark.parametrize("base_copy", ["host", "device"])
def test_a_one_step_lora_switch_orders_its_side_stream_with_the_current_one(base_copy):
    # `load_lora(..., replacing=...)` writes the base copies back on a side stream: work queued before the
    # switch must still read the old weights, and work queued after it (no synchronisation) the new ones,
    # those that are only restored (B adapts fewer layers than A) included.
    from .conftest import TEXT_ENCODER_LAYERS, UNET_LAYERS, lora_factors, peft_format

    one_step, two_steps = _tiny_compiled(), _tiny_compiled()
    for pipe in (one_step, two_steps):
        diffjet.load_lora(pipe, peft_format(lora_factors(pipe, seed=1)), adapter_name="a", base_copy=base_copy)
    watched = [("text_encoder", TEXT_ENCODER_LAYERS[0]), ("unet", UNET_LAYERS[0])]

    def read(pipe):
        return [getattr(pipe, component).get_submodule(path).weight.clone() for component, path in watched]

    torch.cuda.synchronize()
    with_a = read(one_step)
    torch.cuda._sleep(200_000_000)  # the current stream busy for about a tenth of a second
    before = read(one_step)  # queued behind it
    diffjet.load_lora(one_step, peft_format(lora_factors(one_step, seed=2, layers={"unet": UNET_LAYERS})),
                      adapter_name="b", replacing="a")
    after = read(one_step)  # queued at once
    diffjet.unload_lora(two_steps, "a")
    diffjet.load_lora(two_steps, peft_format(lora_factors(two_steps, seed=2, layers={"unet": UNET_LAYERS})),
                      adapter_name="b")
    expected = read(two_steps)
    torch.cuda.synchronize()
    assert all(torch.equal(x, y) for x, y in zip(before, with_a))
    assert all(torch.equal(x, y) for x, y in zip(after, expected)) and not torch.equal(after[0], with_a[0])
    params = dict(two_steps.unet.named_parameters())
    assert all(torch.equal(w, params[n]) for n, w in one_step.unet.named_parameters())


_WARM_START = """
import json, sys
import torch
from torch._dynamo.utils import counters
import diffjet
from diffjet.bench.worker import runtime_autotune
from diffjet.models import load_pipeline

pipe = load_pipeline(sys.argv[3], device="cuda", dtype=torch.float16)
pipe.set_progress_bar_config(disable=True)
step_cache = json.loads(sys.argv[4])  # the step cache's parts are precompiled and saved too
diffjet.compile(pipe, diffjet.Config(cache_dir=sys.argv[1], kernels=tuple(json.loads(sys.argv[2])),
                                     step_cache=diffjet.StepCache(**step_cache) if step_cache else None,
                                     precompile=sys.argv[5]))
# Two resolutions: every signature after a component's first must be saved and loaded as well.
images = [pipe("a cat", num_inference_steps=2, output_type="np", height=h, width=w,
               generator=torch.Generator().manual_seed(0)).images for h, w in ((64, 64), (64, 96))]
image = images[0]
stats = pipe.diffjet.cache.stats
print(json.dumps({"frames": sum(counters["frames"].values()), "hits": stats.hits, "stored": stats.stored,
                  "autotuned": runtime_autotune()["kernels"], "image": image.tolist()}))
"""


def _partial_config_copy(folder):
    """The tiny preset with arguments left out of its UNet's config.json, as published configs leave some out
    (diffusers then lists them in `_use_default_values`, in an order that follows the hash seed)."""
    import json

    from diffjet.models import build

    path = build("tiny", folder)
    config_path = path / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    for left_out in ("act_fn", "center_input_sample", "dropout", "flip_sin_to_cos", "freq_shift",
                     "downsample_padding", "mid_block_scale_factor", "resnet_skip_time_act"):
        del config[left_out]
    config_path.write_text(json.dumps(config))
    return path


def _cold_then_warm(tmp_path, cache, model, kernels, step_cache=None, precompile="function"):
    """`_WARM_START`'s report from a process filling `cache`, then from one using it."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    cold_kind, warm_kind = (precompile, precompile) if isinstance(precompile, str) else precompile
    runs = []
    for process in ("cold", "warm"):
        # Each process with empty Inductor and Triton caches: only diffjet's cache carries over. At the same
        # path, as a server set up like the machine that compiled (a loaded function's kernels look for
        # their autotuning choices under the compiling process's Inductor folder; see autotune_choices.py).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path),
               "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "local" / "inductor"),
               "TRITON_CACHE_DIR": str(tmp_path / "local" / "triton"),
               "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED": "0",  # FlashAttention-4's kernels come from diffjet's cache
               "PYTHONHASHSEED": {"cold": "1", "warm": "2"}[process]}  # the key must not follow the hash seed
        proc = subprocess.run([sys.executable, "-c", _WARM_START, str(cache), json.dumps(kernels), model,
                               json.dumps(step_cache), {"cold": cold_kind, "warm": warm_kind}[process]],
                              capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        # As on a new machine: the warm process must not find the cold process's files.
        shutil.rmtree(tmp_path / "local", ignore_errors=True)
    return runs


@pytest.mark.parametrize("kernels, partial_config, step_cache, precompile",
                         [((), False, None, "function"), (("group_norm_silu",), False, None, "function"),
                          ((), True, None, "function"), ((), False, {"interval": 3}, "function"),
                          (("group_norm_silu",), False, None, "aoti"),
                          # `diffjet compile --precompile aoti`, then a process with the default setting
                          (("group_norm_silu",), False, None, ("aoti", "function"))],
                         ids=["inductor", "gn-silu-kernel", "partial-config", "step-cache", "aoti-gn-silu-kernel",
                              "aoti-then-default"])
def test_a_warm_process_loads_precompiled_functions_without_tracing(tmp_path, kernels, partial_config, step_cache,
                                                                    precompile):
    import json

    import numpy as np

    model = str(_partial_config_copy(tmp_path / "model")) if partial_config else "tiny"
    cache = tmp_path / "cache"
    cold, warm = _cold_then_warm(tmp_path, cache, model, kernels, step_cache, precompile)
    cold_kind = precompile if isinstance(precompile, str) else precompile[0]
    entries = [json.loads(meta.read_text()) for meta in cache.rglob("meta.json")]
    drivers = [entry for entry in entries if entry["about"]["component"] == "triton-driver"]
    entries = [entry for entry in entries if entry not in drivers]
    # Triton's driver module, built by the cold process's Triton, loaded by the warm one's (triton_cache.py).
    assert len(drivers) == 1 and all(name.startswith("triton/") for name in drivers[0]["files"] if name != "artifacts.bin")
    assert cold["hits"] == 0 and len(entries) >= 4  # the UNet's and the VAE decoder's, at two resolutions
    assert all("function.bin" in entry["files"] for entry in entries), "every signature is precompiled"
    triton_files = [name for entry in entries for name in entry["files"] if name.startswith("triton/")]
    if kernels:
        assert triton_files, "diffjet's kernels, compiled at the warm-up, are kept with the entry"
    # Inductor times the launch configurations of its kernels at their first call in the cold process;
    # the entries keep its choices, so a warm one, on a machine without the cold one's caches, times none.
    choices = [name for entry in entries for name in entry["files"] if name.startswith("inductor/")]
    if cold_kind == "function":
        assert bool(choices) == bool(cold["autotuned"]), (len(choices), cold["autotuned"])
    else:  # an AOTInductor package holds all of its code: nothing of Inductor's caches is kept beside it
        assert all(entry["files"]["artifacts.bin"]["size"] == 0 for entry in entries) and not choices
    assert warm["autotuned"] == 0, "a warm process must not time Inductor's kernels again"
    # Nothing new to store: no Triton kernel compiled again, no entry missing.
    assert warm["hits"] == len(entries) + len(drivers) and warm["stored"] == 0
    assert warm["frames"] == 0, "a warm process must not trace with Dynamo"
    assert np.abs(np.array(warm["image"]) - np.array(cold["image"])).max() < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available() or flash4.unavailable(torch.device("cuda")) is not None,
                    reason="FlashAttention-4 does not run here")
def test_a_warm_flux_process_loads_flashattention4s_kernels_from_the_cache(tmp_path):
    import json

    import numpy as np

    cache = tmp_path / "cache"
    cold, warm = _cold_then_warm(tmp_path, cache, "tiny-flux", DEFAULT_KERNELS)
    entries = [json.loads(meta.read_text()) for meta in cache.rglob("meta.json")]
    binaries = [name for entry in entries if entry["about"]["component"] == "transformer"
                for name in entry["files"] if name.startswith("flash_attn_4/")]
    # One forward kernel per resolution's attention shape, compiled in the cold process's warm-ups.
    assert binaries and all(name.endswith(".o") for name in binaries), binaries
    # The warm process loaded them: a kernel compiled again would be stored.
    assert warm["hits"] == len(entries) and warm["stored"] == 0 and warm["frames"] == 0
    assert np.abs(np.array(warm["image"]) - np.array(cold["image"])).max() < 1e-3


# -- thread safety ------------------------------------------------------------------------------------
def _hammer(runners, inputs, threads, calls, own_streams):
    """`threads` threads, each making `calls` calls; call k of thread t uses input (t + k) % len(inputs) on
    runner (t % len(runners)); the results by (runner, input) in call order."""
    import threading

    results, errors = [[] for _ in range(threads)], []

    def work(t):
        stream = torch.cuda.Stream() if own_streams else torch.cuda.current_stream()
        try:
            with torch.cuda.stream(stream):
                for k in range(calls):
                    i = (t + k) % len(inputs)
                    results[t].append((t % len(runners), i, runners[t % len(runners)](inputs[i], float(i))["out"]))
            stream.synchronize()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    return [r for per_thread in results for r in per_thread]


@pytest.mark.parametrize("own_streams", [False, True], ids=["default-stream", "a-stream-per-thread"])
@pytest.mark.parametrize("runners", [1, 2], ids=["one-runner", "two-runners-one-pool"])
def test_calls_from_many_threads_equal_sequential_calls(own_streams, runners):
    # Unserialized, two threads on one runner gave 169 wrong results in 40,000 calls.
    torch.manual_seed(0)
    modules = [Affine() for _ in range(runners)]
    made = [CudaGraphRunner(m.forward, torch.device("cuda"), name=f"affine{i}", weights=list(m.parameters()),
                            tensor_args=(1, "t")) for i, m in enumerate(modules)]
    # Two shapes, big enough that a replay overlaps the next call's copy-in when nothing orders them.
    inputs = [torch.randn(rows, 16, device="cuda") for rows in (4096, 8192) for _ in range(4)]
    torch.cuda.synchronize()  # the threads' streams read them
    threaded = _hammer(made, inputs, threads=8, calls=1000, own_streams=own_streams)  # captures happen in threads too
    sequential = {(r, i): made[r](inputs[i], float(i))["out"] for r in range(runners) for i in range(len(inputs))}
    wrong = sum(not torch.equal(out, sequential[r, i]) for r, i, out in threaded)
    assert wrong == 0, f"{wrong} of {len(threaded)} results differ from sequential calls"
    assert sum(runner.stats.captures for runner in made) == 2 * runners


# -- a cache that fails ---------------------------------------------------------------------------------
def test_a_cache_that_cannot_be_written_still_captures_and_runs_every_new_shape(tmp_path, caplog):
    import logging

    from diffjet.runtime.compile_cache import CompileCache
    from diffjet.runtime.warm_start import WarmStartStore

    cache = CompileCache(tmp_path, save_artifacts=lambda: (b"kernels", None), load_artifacts=lambda b: None)
    for shard in (f"{i:02x}" for i in range(256)):  # no entry folder can be made: as a full disk
        (tmp_path / shard).write_bytes(b"")
    module = Affine()
    runner = CudaGraphRunner(module.forward, torch.device("cuda"), name="affine", weights=list(module.parameters()),
                             tensor_args=(1, "t"), store=WarmStartStore(cache, {"component": "affine"}, name="affine"))
    with caplog.at_level(logging.WARNING, logger="diffjet"):
        for rows in (4, 8, 12):  # each call at a new shape
            x = torch.randn(rows, 16, device="cuda")
            torch.testing.assert_close(runner(x, 1.0)["out"], module(x, 1.0)["out"])
    assert runner.stats.captures == 3 and runner.graphs_held == 3 and runner.stats.eager_calls == 0
    assert not cache.writable and len([r for r in caplog.records if "compile cache" in r.getMessage()]) == 1


def test_a_read_only_cache_serves_its_shapes_and_compiles_new_ones_without_writing(tmp_path):
    cache = tmp_path / "cache"
    filling = load_pipeline("tiny", device="cuda", dtype=torch.float16)
    filling.set_progress_bar_config(disable=True)
    diffjet.compile(filling, diffjet.Config(cache_dir=str(cache)))
    filling("a cat", num_inference_steps=2, height=64, width=64)
    before = sorted((p, p.stat().st_mtime_ns) for p in cache.rglob("*"))
    pipe = load_pipeline("tiny", device="cuda", dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    diffjet.compile(pipe, diffjet.Config(cache_dir=str(cache), cache="read-only"))
    for height in (64, 96):  # the first is in the cache, the second is not
        pipe("a cat", num_inference_steps=2, height=height, width=64)
    stats = pipe.diffjet.cache.stats
    assert stats.hits >= 2 and stats.stored == 0 and pipe.diffjet.runners["unet"].graphs_held == 2
    assert sorted((p, p.stat().st_mtime_ns) for p in cache.rglob("*")) == before
