"""The `diffjet` command on CPU: generate, bench, verify, and every bad input."""

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import diffjet
from diffjet import cli
from diffjet.runtime.files import write_atomically

FAST = ["--model", "tiny", "--steps", "2", "--device", "cpu"]


def run(args, capsys):
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_is_deterministic_and_carries_its_parameters(tmp_path, capsys):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    for out, flag in ((first, "--out"), (second, "-o")):
        code, _, _ = run(["generate", *FAST, "--prompt", "a red cube", "--seed", "7", "--compiler", "eager",
                          flag, str(out)], capsys)
        assert code == 0
    assert first.read_bytes() == second.read_bytes()
    image = Image.open(first)
    assert image.size == (64, 64)
    params = json.loads(image.text["parameters"])
    assert params["prompt"] == "a red cube" and params["seed"] == 7 and params["steps"] == 2
    assert params["model"] == "tiny" and params["compiler"] == "eager"


def test_generate_seed_changes_the_image(tmp_path, capsys):
    outs = [tmp_path / f"{s}.png" for s in (1, 2)]
    for seed, out in zip((1, 2), outs):
        assert run(["generate", *FAST, "--seed", str(seed), "--compiler", "eager", "--out", str(out)], capsys)[0] == 0
    assert outs[0].read_bytes() != outs[1].read_bytes()


def test_generate_with_diffjet_matches_eager_pixels(tmp_path, capsys):
    outs = {c: tmp_path / f"{c}.png" for c in ("eager", "diffjet")}
    for compiler, out in outs.items():
        assert run(["generate", *FAST, "--scheduler", "dpm++", "--negative-prompt", "blur",
                    "--compiler", compiler, "--out", str(out)], capsys)[0] == 0
    import numpy as np

    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in outs.values())
    assert np.abs(a - b).max() <= 1


def test_generate_with_a_lora_changes_the_image_the_same_way_on_diffjet_and_on_eager(tmp_path, capsys):
    # diffjet's compilers merge it into the compiled pipeline (diffjet.load_lora), the others through
    # diffusers (load_lora_weights + fuse_lora): the same LoRA must give the same image either way.
    from safetensors.torch import save_file

    from diffjet.models import load_pipeline, random_lora

    lora = tmp_path / "style.safetensors"
    save_file(random_lora(load_pipeline("tiny", device="cpu"), seed=0, strength=0.5), str(lora))
    outs = {name: tmp_path / f"{name}.png" for name in ("plain", "eager", "diffjet")}
    for name, out in outs.items():
        extra = [] if name == "plain" else ["--lora", str(lora), "--lora-scale", "0.8"]
        compiler = "eager" if name == "plain" else name
        assert run(["generate", *FAST, "--compiler", compiler, *extra, "--out", str(out)], capsys)[0] == 0
    plain, eager, compiled = (np.asarray(Image.open(p), dtype=np.int16) for p in outs.values())
    assert np.abs(eager - compiled).max() <= 1
    assert np.abs(eager - plain).mean() > 2, "the LoRA must change the image"
    params = json.loads(Image.open(outs["diffjet"]).text["parameters"])
    assert params["lora"] == str(lora) and params["lora_scale"] == 0.8


def test_generate_refuses_a_missing_lora_before_work(tmp_path, capsys, no_work):
    code, _, err = run(["generate", *FAST, "--lora", str(tmp_path / "nope.safetensors"), "-o", str(tmp_path / "x.png")],
                       capsys)
    assert code == 2 and "--lora: no such file or folder" in err and no_work == []


BAD_INPUTS = [
    (["--height", "100"], "multiple of 8"),
    (["--width", "0"], "multiple of 8"),
    (["--steps", "0"], "at least 1"),
    (["--seed", "99999999999999999999999"], "--seed must be a whole number"),
    (["--seed", "-1"], "--seed must be a whole number"),
    (["--guidance", "nan"], "--guidance must be a finite number"),
    (["--guidance", "-1"], "--guidance must be from 0 to 50"),
    (["--guidance", "75"], "--guidance must be from 0 to 50"),
    (["--device", "cuda"], "CUDA"),
]
BAD_MODELS = [(["--model", "no-such-preset"], "no-such-preset"), (["--model", "/nonexistent/folder"], "/nonexistent/folder")]


@pytest.fixture
def no_work(monkeypatch):
    """Every way a command starts its work (building or loading a model, timing, verifying), recorded and
    refused: a check that comes after the work shows as a call here."""
    import diffjet.bench
    import diffjet.models
    import diffjet.quality

    calls = []

    def refuse(name):
        def work(*args, **kwargs):
            calls.append(name)
            raise diffjet.errors.DiffjetError(f"{name} started before the arguments were checked")
        return work

    for module, name in ((diffjet.models, "load_pipeline"), (diffjet.models, "resolve"),
                         (diffjet.bench, "run_bench"), (diffjet.quality, "verify")):
        monkeypatch.setattr(module, name, refuse(name))
    return calls


@pytest.mark.parametrize("extra, message", BAD_INPUTS + BAD_MODELS,
                         ids=[b[1] if b[1][0] != "/" else "missing-folder" for b in BAD_INPUTS + BAD_MODELS])
def test_bad_generate_input_is_one_clear_line(tmp_path, capsys, extra, message):
    if extra[:2] == ["--device", "cuda"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    out = tmp_path / "x.png"
    args = ["generate", "--model", "tiny", "--steps", "2", "--device", "cpu", "--out", str(out)]
    args = args + extra
    code, _, err = run(args, capsys)
    assert code == 2
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not out.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("extra, message", BAD_INPUTS, ids=[b[1] for b in BAD_INPUTS])
def test_bad_generate_arguments_are_refused_before_work(tmp_path, capsys, extra, message, no_work):
    if extra[:2] == ["--device", "cuda"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    code, _, err = run(["generate", *FAST, "--out", str(tmp_path / "x.png"), *extra], capsys)
    assert code == 2 and message in err and no_work == []


def _unwritable(tmp_path, kind):
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "a-folder.out").mkdir()
    if kind == "/proc" and not os.path.isdir("/proc/self"):
        pytest.skip("no /proc file system here")
    return {"missing-folder": tmp_path / "missing-dir" / "x.out", "under-a-file": tmp_path / "a-file" / "x.out",
            "a-folder": tmp_path / "a-folder.out", "/proc": Path("/proc/x.out")}[kind]


UNWRITABLE = ["missing-folder", "under-a-file", "a-folder", "/proc"]


@pytest.mark.parametrize("kind", UNWRITABLE)
def test_unwritable_png_is_refused_before_work(tmp_path, capsys, kind, no_work):
    out = str(_unwritable(tmp_path, kind)).replace(".out", ".png")
    (tmp_path / "a-folder.png").mkdir()
    code, _, err = run(["generate", *FAST, "--out", out], capsys)
    assert code == 2 and err.startswith("diffjet: error:") and err.count("\n") == 1
    assert no_work == []


def test_an_output_of_the_wrong_kind_is_refused_before_work(tmp_path, capsys, no_work):
    code, _, err = run(["generate", *FAST, "--out", str(tmp_path / "x.jpg")], capsys)
    assert code == 2 and "must end in .png" in err and no_work == []


@pytest.mark.parametrize("kind", UNWRITABLE)
@pytest.mark.parametrize("command", [["bench", "--json"], ["bench", "--plot"], ["verify", "--json"]],
                         ids=["bench-json", "bench-plot", "verify-json"])
def test_unwritable_results_file_is_refused_before_work(tmp_path, capsys, command, kind, no_work):
    suffix = ".png" if command[1] == "--plot" else ".json"
    out = str(_unwritable(tmp_path, kind)).replace(".out", suffix)
    (tmp_path / f"a-folder{suffix}").mkdir(exist_ok=True)
    code, _, err = run([command[0], *FAST, command[1], out], capsys)
    assert code == 2 and err.startswith("diffjet: error:") and err.count("\n") == 1
    assert no_work == []


@pytest.mark.parametrize("extra, message", [(["--steps", "0"], "at least 1"), (["--seed", "-5"], "--seed"),
                                            (["--lora-scale", "inf"], "--lora-scale")], ids=["steps-0", "seed", "lora-scale"])
def test_bad_verify_input_is_refused_before_work(capsys, extra, message, no_work):
    code, _, err = run(["verify", "--model", "tiny", "--device", "cpu", *extra], capsys)
    assert code == 2 and message in err and err.count("\n") == 1 and no_work == []


@pytest.mark.parametrize("extra, message", [(["--warmup", "0"], "--warmup"), (["--timeout", "0"], "--timeout"),
                                            (["--seed", str(2**64)], "--seed")], ids=["warmup", "timeout", "seed"])
def test_bad_bench_input_is_refused_before_work(capsys, extra, message, no_work):
    code, _, err = run(["bench", *FAST, *extra], capsys)
    assert code == 2 and message in err and err.count("\n") == 1 and no_work == []


@pytest.mark.parametrize("command", [["bench", *FAST, "--compiler", "eager,diffjet-fp8"],
                                     ["verify", *FAST, "--compiler", "diffjet-fp8-no-geglu-fp8"],
                                     ["verify", *FAST, "--compiler", "diffjet-fp8-max"]], ids=["bench", "verify", "max"])
def test_an_fp8_variant_is_refused_before_work_where_fp8_cannot_run(capsys, command, no_work):
    """`Config(fp8=True)` fails where the GPU has no fp8 GEMMs: the CLI says so before loading anything (it
    used to fail each bench row after building its pipeline, with a traceback's last lines)."""
    code, _, err = run(command, capsys)
    variant = command[-1].split(",")[-1]
    assert code == 2 and err.count("\n") == 1 and no_work == []
    assert f"--compiler {variant}" in err and "compute capability 8.9" in err and "diffjet-fast" in err


def test_a_results_file_that_cannot_be_written_after_the_run_is_one_line_after_the_table(tmp_path, capsys, monkeypatch):
    import shutil

    import diffjet.bench

    folder = tmp_path / "out"
    folder.mkdir()

    def run_then_lose_the_folder(specs, on_result, timeout):
        shutil.rmtree(folder)  # what a cleaned temporary folder does during a long run
        return [{"model": "tiny", "compiler": "eager", "height": 64, "width": 64, "steps": 2, "batch": 1, "its": 9.5}]

    monkeypatch.setattr(diffjet.bench, "run_bench", run_then_lose_the_folder)
    code, out, err = run(["bench", *FAST, "--compiler", "eager", "--json", str(folder / "r.json")], capsys)
    assert code == 2 and "9.5" in out
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("diffjet: error: cannot write") and last.endswith("the results are printed above")


def test_bench_checks_every_model_before_building_a_preset(capsys, monkeypatch):
    import diffjet.models.loading

    monkeypatch.setattr(diffjet.models.loading, "build", lambda *a, **k: pytest.fail("built a preset first"))
    code, _, err = run(["bench", "--model", "sd15,no-such-model", "--device", "cpu"], capsys)
    assert code == 2 and "no-such-model" in err


@pytest.mark.parametrize("text, message", [("1,a", "whole numbers"), ("0", "at least 1"), (",", "at least one")])
def test_bad_compile_batches_are_refused(text, message):
    with pytest.raises(diffjet.errors.ConfigError, match=message):
        cli._batches(text)
    assert cli._batches(" 1, 2") == [1, 2]


def test_failed_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "x.png"

    def explode(handle):
        handle.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomically(target, explode)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)],
                         ids=["umask-022", "umask-077", "umask-002"])
def test_a_new_output_file_follows_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        write_atomically(tmp_path / "x.png", lambda handle: handle.write(b"png"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "x.png").stat().st_mode) == mode


def test_an_overwritten_output_file_keeps_its_mode(tmp_path):
    target = tmp_path / "x.json"
    target.write_bytes(b"old")
    target.chmod(0o640)
    previous = os.umask(0o077)
    try:
        write_atomically(target, lambda handle: handle.write(b"new"))
    finally:
        os.umask(previous)
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o640


def test_console_script_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffjet.cli", "generate", "--model", "tiny", "--steps", "-3",
                           "--out", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "diffjet: error: --steps must be at least 1, got -3"


@pytest.mark.slow  # several seconds on a CPU; CI runs it in its -m slow step
def test_bench_json_schema(tmp_path, capsys):
    path = tmp_path / "bench.json"
    plot = tmp_path / "bench.png"
    code, out, _ = run(["bench", *FAST, "--compiler", "eager", "--repeats", "2", "--unet-repeats", "3",
                        "--warmup", "1", "--json", str(path), "--plot", str(plot)], capsys)
    assert code == 0
    data = json.loads(path.read_text())
    assert {"device", "torch", "diffusers", "date", "command", "runs"} <= set(data)
    assert data["device"] == "cpu" and data["command"].startswith("diffjet bench")
    (run_,) = data["runs"]
    for key in ("model", "compiler", "height", "width", "steps", "batch"):
        assert key in run_
    assert (run_["model"], run_["compiler"], run_["height"], run_["width"], run_["steps"], run_["batch"]) == \
        ("tiny", "eager", 64, 64, 2, 1)
    for key in ("its", "unet_ms", "e2e_s", "first_call_s"):
        assert isinstance(run_[key], float) and run_[key] > 0
    assert run_["peak_mem_gib"] is None  # no CUDA memory on a CPU
    assert run_["its_min"] <= run_["its"] <= run_["its_max"]
    assert "tiny" in out and "eager" in out
    assert Image.open(plot).size[0] > 100
    assert f"wrote {path}" in out and f"wrote {plot}" in out


def test_bench_rejects_unknown_compiler(capsys):
    code, _, err = run(["bench", *FAST, "--compiler", "eager,tensorrt"], capsys)
    assert code == 2 and "tensorrt" in err


def test_verify_passes_on_tiny(capsys):
    code, out, _ = run(["verify", *FAST], capsys)
    assert code == 0 and "PASS" in out


def test_verify_with_a_lora_switched_in_on_the_compiled_pipeline(capsys, tmp_path):
    pytest.importorskip("peft")
    code, out, _ = run(["verify", *FAST, "--lora", "random", "--lora-scale", "0.7", "--json", str(tmp_path / "v.json")], capsys)
    record = json.loads((tmp_path / "v.json").read_text())
    assert code == 0 and "PASS" in out and "LoRA random at scale 0.7" in out
    assert record["lora"] == "random" and record["lora_scale"] == 0.7 and record["passed"]


def test_verify_rejects_a_missing_lora_file(capsys, tmp_path):
    code, _, err = run(["verify", *FAST, "--lora", str(tmp_path / "nope.safetensors")], capsys)
    assert code == 2 and "nope.safetensors" in err


def _scale_conv_out(pipe):
    pipe.unet.conv_out.weight.mul_(1.05)


def _poison_conv_out(pipe):
    pipe.unet.conv_out.bias.fill_(float("nan"))


@pytest.mark.parametrize("damage, message", [(_scale_conv_out, "error above"), (_poison_conv_out, "NaN")],
                         ids=["numbers-changed", "nan"])
def test_verify_fails_when_diffjet_breaks_the_rule(capsys, monkeypatch, damage, message):
    import torch

    compile_ = diffjet.compile

    def broken(pipe, config=None):
        with torch.no_grad():
            damage(pipe)
        return compile_(pipe, config)

    monkeypatch.setattr(diffjet, "compile", broken)
    code, _, err = run(["verify", *FAST], capsys)
    assert code == 1 and message in err


def test_compile_needs_a_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run(["compile", "--model", "tiny", "--resolutions", "64x64"], capsys)
    assert code == 2 and "no CUDA GPU" in err


@pytest.mark.parametrize("text", ["512", "512x", "axb", "500x512", ""])
def test_bad_resolutions_are_refused(text):
    with pytest.raises(diffjet.errors.ConfigError):
        cli._resolutions(text)


def test_resolutions_are_width_by_height():
    assert cli._resolutions("512x768, 1216x832") == [(512, 768), (1216, 832)]


@pytest.mark.slow  # several seconds on a CPU; CI runs it in its -m slow step
def test_bench_over_several_resolutions_records_each_and_a_warm_second_pass(tmp_path, capsys):
    path = tmp_path / "bench.json"
    code, out, _ = run(["bench", *FAST, "--compiler", "diffjet", "--resolutions", "64x64,80x48", "--repeats", "2",
                        "--unet-repeats", "2", "--warmup", "1", "--json", str(path)], capsys)
    assert code == 0
    runs = json.loads(path.read_text())["runs"]
    assert [(r["width"], r["height"]) for r in runs] == [(64, 64), (80, 48)]
    for r in runs:
        assert r["its_second_pass"] > 0
        assert r["recompiles_after_warmup"] == 0 and r["captures_after_warmup"] == 0
        assert r["first_call_s"] > 0
        assert "fidelity" not in r  # lossless: no cost to record
    assert "80x48" in out


def test_generate_feeds_a_control_image_to_controlnet_presets(tmp_path, capsys):
    out = tmp_path / "c.png"
    code, _, _ = run(["generate", "--model", "tiny-controlnet", "--steps", "2", "--device", "cpu",
                      "--out", str(out)], capsys)
    assert code == 0 and Image.open(out).size == (64, 64)


def test_warm_start_worker_feeds_a_control_image_to_controlnet_presets():
    from diffjet.bench import worker

    spec = dict(model="tiny-controlnet", compiler="diffjet", device="cpu", prompt="a cat", steps=2, scheduler="euler",
                height=64, width=64, seed=0, warm_start=True, spawned_at=worker.IMPORTED_AT - 1.0)
    result = worker.run(spec)
    assert result["warm_start_s"] > 1.0 and "warm_cache" in result
    phases = result["warm_start_phases_s"]
    assert phases["imports"] == 1.0 and min(phases.values()) >= 0
    assert sum(phases.values()) == pytest.approx(result["warm_start_s"])
    # diffjet's own log of the start, each line with its time since the start: the compile summary at least
    assert any(re.fullmatch(r"\d+\.\d\d s diffjet\.compiler: diffjet on cpu.*", line, re.S)
               for line in result["warm_start_log"]), result["warm_start_log"]


@pytest.mark.slow  # several seconds; CI runs it in its -m slow step
def test_bench_diffjet_no_kernels_variant_records_its_passes(tmp_path, capsys):
    path = tmp_path / "bench.json"
    code, _, _ = run(["bench", *FAST, "--compiler", "diffjet-no-kernels", "--repeats", "1", "--unet-repeats", "1",
                      "--warmup", "1", "--json", str(path)], capsys)
    run_ = json.loads(path.read_text())["runs"][0]
    assert code == 0 and run_["compiler"] == "diffjet-no-kernels"
    # On a CPU the kernels do not apply: the passes say so instead of claiming them.
    assert not any(p.startswith("kernels") for passes in run_["passes"].values() for p in passes)
    assert "fused_qkv_sdpa" in run_["passes"]["unet"]


def test_bench_diffjet_variants_put_in_their_kernels(monkeypatch):
    import types

    import diffjet
    from diffjet.bench import recipes

    used = []

    def compile_(pipe, config):
        used.append(config.kernels)
        pipe.diffjet = types.SimpleNamespace(passes={}, left_alone={}, off=[])
        return pipe

    monkeypatch.setattr(diffjet, "compile", compile_)
    for name in ("diffjet", "diffjet-no-kernels", "diffjet-no-geglu", "diffjet-fp8", "diffjet-fp8-no-geglu-fp8",
                 "diffjet-no-dit-kernels", "diffjet-no-flash-attn-4"):
        recipes.apply(types.SimpleNamespace(), name)
    dit = ("qk_norm_rope", "gelu_epilogue", "flash_attn_4")
    assert used == [("group_norm_silu", "geglu", "geglu_fp8", *dit), (), ("group_norm_silu", *dit),
                    ("group_norm_silu", "geglu", "geglu_fp8", *dit), ("group_norm_silu", "geglu", *dit),
                    ("group_norm_silu", "geglu", "geglu_fp8"), ("group_norm_silu", "geglu", "geglu_fp8", *dit[:2])]


def test_verify_covers_a_controlnet_pipeline(capsys, tmp_path):
    code, out, _ = run(["verify", "--model", "tiny-controlnet", "--steps", "2", "--device", "cpu",
                        "--json", str(tmp_path / "v.json")], capsys)
    record = json.loads((tmp_path / "v.json").read_text())
    assert code == 0 and "PASS" in out and record["model"] == "tiny-controlnet"
    # On a CPU the "half precision" baseline is float32 again (error 0), so diffjet meets the floor bound.
    assert record["candidate"]["finite"] and record["baseline"]["unet_error"] == 0.0
    assert record["candidate"]["unet_error"] <= record["bound_unet"]


HEAVY = ("torch", "diffusers", "transformers")


def test_help_imports_neither_torch_nor_diffusers():
    # `diffjet --help` is the console script's import of diffjet.cli, then the parser: both without the
    # seconds that importing torch and diffusers takes.
    script = ("import sys\nfrom diffjet import cli\ncli.build_parser().format_help()\n"
              f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
    proc = subprocess.run([sys.executable, "-m", "diffjet.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "generate" in proc.stdout and proc.stderr == ""


def test_the_package_names_load_on_first_use():
    import diffjet.api
    import diffjet.config
    import diffjet.lora

    assert diffjet.compile is diffjet.api.compile and diffjet.Config is diffjet.config.Config
    assert diffjet.load_lora is diffjet.lora.load_lora and diffjet.DiffjetError is diffjet.errors.DiffjetError
    assert {"compile", "Config", "CompileReport", "load_lora", "unload_lora", "set_lora_scales"} <= set(dir(diffjet))
    with pytest.raises(AttributeError, match="no_such_name"):
        diffjet.no_such_name  # noqa: B018


@pytest.mark.parametrize("compilers, note", [("eager,diffjet", True), ("eager", False)], ids=["with-diffjet", "eager-only"])
def test_cpu_bench_says_in_one_line_why_diffjet_is_not_faster_there(capsys, monkeypatch, compilers, note):
    import diffjet.bench

    monkeypatch.setattr(diffjet.bench, "run_bench", lambda specs, on_result, timeout: [])
    code, _, err = run(["bench", *FAST, "--compiler", compilers], capsys)
    lines = [line for line in err.splitlines() if line.startswith("diffjet: note:")]
    assert code == 0 and len(lines) == int(note)
    if note:
        assert "CPU" in lines[0] and "GPU" in lines[0]


LONG_PROMPT = " ".join(f"word{i}" for i in range(5000))


def test_generate_is_quiet_by_default(tmp_path):
    # A new process: transformers says a thing once per process. The default compiler on a CPU warns
    # that only device-independent passes apply; a 5,000-word prompt is truncated to CLIP's 77 tokens.
    args = [sys.executable, "-m", "diffjet.cli", "generate", *FAST, "--steps", "1", "--prompt", LONG_PROMPT,
            "--out", str(tmp_path / "x.png")]
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "it/s]" not in line]  # but the progress bar
    truncated = [line for line in lines if "was truncated" in line]
    assert len(truncated) == 1 and len(truncated[0]) < 300
    assert "torchvision" not in proc.stderr
    assert [line for line in lines if "device-independent" in line][0].startswith("diffjet: pipeline is on cpu")
    assert not any("diffjet.compile(" in line for line in lines), "a warning's source line is echoed"
    assert len("\n".join(lines)) < 1000, lines


def test_verbose_hides_nothing_and_logs_diffjet():
    import logging
    import warnings

    from diffjet import console

    def quiet_filters():
        loggers = (logging.getLogger(), logging.getLogger("diffusers"), logging.getLogger("transformers"))
        return [f for lg in loggers for h in lg.handlers for f in h.filters if isinstance(f, console.QuietFilter)]

    shown = warnings.showwarning
    with console.terminal(verbose=True):
        assert quiet_filters() == [] and warnings.showwarning is shown
        assert logging.getLogger("diffjet").getEffectiveLevel() == logging.INFO
    with console.terminal(verbose=False):
        assert len(quiet_filters()) >= 2 and warnings.showwarning is console._one_line
    assert quiet_filters() == [] and warnings.showwarning is shown, "a command leaves logging as it found it"


def _record(message):
    import logging

    return logging.LogRecord("diffusers.models.modeling_utils", logging.WARNING, __file__, 1, message, (), None)


def test_the_quiet_filter_drops_only_the_known_harmless_lines():
    from diffjet.console import QuietFilter

    quiet = QuietFilter()
    assert not quiet.filter(_record("There are modules in UNet2DConditionModel that should be kept in float32: []. "
                                    "Casting directly with `to()` can lead to inconsistent results"))
    assert quiet.filter(_record("There are modules in T5 that should be kept in float32: ['wo']. Casting ..."))
    assert quiet.filter(_record("Some weights of the model checkpoint were not used"))
    truncated = _record("The following part of your input was truncated because CLIP can only handle sequences "
                        "up to 77 tokens: ['" + "a very long prompt " * 500 + "']")
    assert quiet.filter(truncated) and len(truncated.getMessage()) < 300 and "\n" not in truncated.getMessage()


def _filled_cache(folder):
    from diffjet.runtime.compile_cache import CompileCache

    cache = CompileCache(folder, save_artifacts=lambda: (os.urandom(100_000), None), load_artifacts=lambda b: None)
    return [cache.store({"signature": f"s{i}"}, about={"component": "unet", "model": "/models/sd15",
                                                       "signature": f"(2, 4, {64 + 8 * i}, 64):float16"})
            for i in range(3)]


def test_cache_ls_verify_and_prune(tmp_path, capsys):
    entries = _filled_cache(tmp_path / "cache")
    code, out, _ = run(["cache", "ls", "--cache", str(tmp_path / "cache")], capsys)
    assert code == 0 and "3 entries" in out
    rows = [line for line in out.splitlines() if "/models/sd15" in line]
    assert len(rows) == 3 and all("unet" in row and "MiB" in row for row in rows)
    assert {entry.name[:12] for entry in entries} == {row.split()[0] for row in rows}

    assert run(["cache", "verify", "--cache", str(tmp_path / "cache")], capsys)[0] == 0
    (entries[1] / "artifacts.bin").write_bytes(os.urandom(100_000))
    code, out, err = run(["cache", "verify", "--cache", str(tmp_path / "cache")], capsys)
    assert code == 1 and out.count(" ok") == 2 and "BROKEN: entry's hash does not match" in out and "1 broken" in err
    assert entries[1].exists(), "verify deletes nothing"

    code, out, _ = run(["cache", "prune", "--cache", str(tmp_path / "cache"), "--max-gib", "0.0001"], capsys)
    assert code == 0 and "pruned 2 entries" in out and "1 left" in out
    assert [entry.exists() for entry in entries] == [False, False, True], "the broken one, then the oldest"


def test_cache_commands_refuse_an_unsafe_folder_and_bad_options(tmp_path, capsys):
    _filled_cache(tmp_path / "cache")
    (tmp_path / "cache").chmod(0o777)
    code, _, err = run(["cache", "ls", "--cache", str(tmp_path / "cache")], capsys)
    assert code == 2 and "not safe to load code from" in err and "writable by other users" in err
    code, _, err = run(["cache", "ls", "--max-gib", "3"], capsys)
    assert code == 2 and "--max-gib goes with prune" in err


@pytest.mark.parametrize("action", ["ls", "verify", "prune"])
def test_cache_commands_on_a_cache_not_created_yet_say_so_and_create_nothing(tmp_path, capsys, action):
    code, out, err = run(["cache", action, "--cache", str(tmp_path / "none")], capsys)
    assert code == 0 and "not created yet, 0 entries" in out and err == ""
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("resolutions", [[], ["--resolutions", "64x64,80x48"]], ids=["one-size", "two-sizes"])
def test_bench_keeps_the_runs_finished_so_far_in_its_json(tmp_path, capsys, monkeypatch, resolutions):
    # A bench stopped part-way (a time limit, a crash in a later variant's worker) keeps what it measured;
    # a variant over several resolutions gives a run for each.
    import diffjet.bench

    out = tmp_path / "r.json"
    seen = []
    sizes = [(64, 80), (48, 80)] if resolutions else [(64, 64)]

    def two_variants(specs, on_result, timeout):
        runs = []
        for spec in specs:
            runs.extend({"model": spec["model"], "compiler": spec["compiler"], "height": h, "width": w,
                         "steps": 2, "batch": 1, "its": 9.5} for w, h in sizes)
            on_result(runs)
            seen.append(json.loads(out.read_text()))
        return runs

    monkeypatch.setattr(diffjet.bench, "run_bench", two_variants)
    code, _, _ = run(["bench", *FAST, "--compiler", "eager,diffjet", *resolutions, "--json", str(out)], capsys)
    assert code == 0
    assert {r["compiler"] for r in seen[0]["runs"]} == {"eager"} and seen[0]["incomplete"] is True
    assert len(seen[0]["runs"]) == len(sizes)
    final = json.loads(out.read_text())
    assert [r["compiler"] for r in final["runs"]] == ["eager"] * len(sizes) + ["diffjet"] * len(sizes)
    assert "incomplete" not in final


def test_serve_and_compile_default_to_the_size_the_models_pipeline_generates(tiny_path, tiny_sd3_path, tiny_flux_path,
                                                                      tmp_path):
    # The pipelines' own default: sample size in latent pixels × the VAE's scale; Flux's transformer config
    # has no sample size and its pipeline uses 128 (1024² images).
    from diffjet.cli import _folder_native_size, _model_native_size

    assert _model_native_size("sdxl") == (1024, 1024) and _model_native_size("tiny-flux") == (64, 64)
    assert _model_native_size(str(tiny_flux_path)) == (1024, 1024)
    assert _folder_native_size(str(tiny_path)) == (64, 64)
    assert _folder_native_size(str(tiny_sd3_path)) == (64, 64)
    assert _folder_native_size(str(tiny_flux_path)) == (1024, 1024)
    assert _folder_native_size(str(tmp_path)) == (512, 512)


def test_bench_refuses_an_sd_scheduler_for_a_flow_matching_model_before_any_variant(tiny_flux_path, capsys,
                                                                                   monkeypatch):
    import diffjet.bench

    started = []
    monkeypatch.setattr(diffjet.bench, "run_bench", lambda *a, **k: started.append(a) or [])
    code, _, err = run(["bench", "--model", str(tiny_flux_path), "--scheduler", "dpm++", "--device", "cpu"], capsys)
    assert code == 2 and "--scheduler dpm++" in err and "flow-matching" in err and started == []


@pytest.mark.parametrize("extra, message", [(["--negative-prompt", "blurry"], "--negative-prompt: FluxPipeline ignores"),
                                            (["--scheduler", "dpm++"], "--scheduler dpm++: FluxPipeline is a flow-matching")])
def test_generate_refuses_what_flux_cannot_do_before_loading(tmp_path, capsys, no_work, extra, message):
    out = tmp_path / "x.png"
    code, _, err = run(["generate", "--model", "tiny-flux", "--steps", "2", "--device", "cpu", "--out", str(out),
                        *extra], capsys)
    assert code == 2 and message in err and no_work == [] and not out.exists()


@pytest.mark.slow  # two generations, seconds each
def test_generate_uses_the_models_own_guidance_by_default(tiny_flux_path, tmp_path, capsys):
    images = {}
    for name, extra in (("default", []), ("sd", ["--guidance", "7.5"])):
        out = tmp_path / f"{name}.png"
        code, _, _ = run(["generate", "--model", str(tiny_flux_path), "--steps", "2", "--device", "cpu",
                          "--out", str(out), *extra], capsys)
        assert code == 0
        images[name] = Image.open(out)
    assert json.loads(images["default"].text["parameters"])["guidance"] == 3.5  # FluxPipeline's, not SD's 7.5
    pixels = {name: np.asarray(image) for name, image in images.items()}
    assert not np.array_equal(pixels["default"], pixels["sd"])


@pytest.mark.parametrize("command", ["compile", "serve"])
def test_precompile_choices_are_the_configs_own(command):
    # The CLI names them itself (it does not import torch to print its help); they must not drift apart.
    from diffjet.config import PRECOMPILE_KINDS

    subparsers = next(a for a in cli.build_parser()._actions if a.dest == "command")
    option = next(a for a in subparsers.choices[command]._actions if a.dest == "precompile")
    assert tuple(option.choices) == PRECOMPILE_KINDS and option.default == "function"


def test_verify_says_when_only_the_one_step_error_decides(capsys, monkeypatch, tmp_path):
    from diffjet import quality

    drifted = quality.Verdict(
        reference="eager float32", baseline=quality.VariantResult("eager float32", 0.07, 1.405, True),
        candidate=quality.VariantResult("diffjet", 0.01, 1.41, True), bound_unet=0.105, bound_latents=2.1)
    monkeypatch.setattr(quality, "verify", lambda *a, **k: drifted)
    code, out, _ = run(["verify", *FAST, "--json", str(tmp_path / "v.json")], capsys)
    assert code == 0 and "PASS (lossless, by the one-step error; the final latents cannot tell at 2 steps)" in out
    assert "only the one-step error decides" in out
    assert json.loads((tmp_path / "v.json").read_text())["final_latents_decide"] is False
