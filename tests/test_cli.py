"""The `diffjet` command on CPU: generate, bench, verify, and every bad input."""

import json
import os
import re
import stat
import subprocess
import sys

import pytest
from PIL import Image

import diffjet
from diffjet import cli
from diffjet.runtime.compile_cache import write_atomically

FAST = ["--model", "tiny", "--steps", "2", "--device", "cpu"]


def run(args, capsys):
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_is_deterministic_and_carries_its_parameters(tmp_path, capsys):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    for out in (first, second):
        code, _, _ = run(["generate", *FAST, "--prompt", "a red cube", "--seed", "7", "--compiler", "eager",
                          "--out", str(out)], capsys)
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


BAD_INPUTS = [
    (["--height", "100"], "multiple of 8"),
    (["--width", "0"], "multiple of 8"),
    (["--steps", "0"], "at least 1"),
    (["--model", "no-such-preset"], "no-such-preset"),
    (["--model", "/nonexistent/folder"], "/nonexistent/folder"),
    (["--device", "cuda"], "CUDA"),
]


@pytest.mark.parametrize("extra, message", BAD_INPUTS, ids=[b[1] if b[1][0] != "/" else "missing-folder" for b in BAD_INPUTS])
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


@pytest.mark.parametrize("out", ["missing-dir/x.png", "a-file/x.png", "x.jpg"])
def test_unwritable_output_is_refused_before_work(tmp_path, capsys, out):
    (tmp_path / "a-file").write_text("not a folder")
    code, _, err = run(["generate", *FAST, "--out", str(tmp_path / out)], capsys)
    assert code == 2 and err.startswith("diffjet: error:") and err.count("\n") == 1


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
    for name in ("diffjet", "diffjet-no-kernels", "diffjet-no-geglu"):
        recipes.apply(types.SimpleNamespace(), name)
    assert used == [("group_norm_silu", "geglu"), (), ("group_norm_silu",)]


def test_verify_covers_a_controlnet_pipeline(capsys, tmp_path):
    code, out, _ = run(["verify", "--model", "tiny-controlnet", "--steps", "2", "--device", "cpu",
                        "--json", str(tmp_path / "v.json")], capsys)
    record = json.loads((tmp_path / "v.json").read_text())
    assert code == 0 and "PASS" in out and record["model"] == "tiny-controlnet"
    # On a CPU the "half precision" baseline is float32 again (error 0), so diffjet meets the floor bound.
    assert record["candidate"]["finite"] and record["baseline"]["unet_error"] == 0.0
    assert record["candidate"]["unet_error"] <= record["bound_unet"]
