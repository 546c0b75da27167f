"""Lossy fast modes from the user's side: `Config.fast()`, `diffjet generate --fast`, `diffjet verify`
printing LOSSY with what it costs, `diffjet bench` recording the cost next to the speed, and the fidelity
measures themselves (PSNR, SSIM)."""

import json

import pytest
import torch
from PIL import Image

from diffjet import Config, StepCache, cli, quality

STEPS = ["--model", "tiny", "--steps", "6", "--device", "cpu"]


def run(args, capsys):
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_lossless_stays_the_default_and_fast_turns_every_lossy_option_on_where_supported():
    assert Config().lossy == [] and Config.lossless().lossy == []
    assert Config.fast().step_cache == StepCache(interval=3, branch=0) and Config.fast().fp8 == "auto"
    assert Config.fast().lossy == ["step_cache(full every 3 steps, branch 0)", "fp8"]


def test_verify_on_a_lossy_config_prints_lossy_and_its_cost(capsys, tmp_path):
    code, out, err = run(["verify", *STEPS, "--fast", "--json", str(tmp_path / "v.json")], capsys)
    assert code == 0, err
    assert "LOSSY" in out and "PASS" not in out
    record = json.loads((tmp_path / "v.json").read_text())
    cost = record["lossy"]
    assert record["compiler"] == "diffjet-fast" and record["passed"] is None
    assert cost["options"] == ["step_cache(full every 3 steps, branch 0)"]
    # Six steps, full every third: steps 1, 2, 4 and 5 reuse the cache, each measured against the full UNet.
    assert [step for step, _ in cost["reused_steps"]] == [1, 2, 4, 5]
    assert all(error > 1e-3 for _, error in cost["reused_steps"])
    assert 1e-3 < cost["latents_error"] < 1 and 10 < cost["psnr_db"] < 80 and 0 < cost["ssim"] < 1
    assert f"{cost['psnr_db']:.2f} dB" in out


@pytest.mark.slow  # several seconds on a CPU; CI runs it in its -m slow step
def test_verify_fast_on_a_dit_measures_the_first_block_cache_against_the_full_transformer(capsys, tmp_path):
    code, out, err = run(["verify", "--model", "tiny-flux", "--steps", "6", "--device", "cpu", "--fast",
                          "--json", str(tmp_path / "v.json")], capsys)
    assert code == 0, err
    cost = json.loads((tmp_path / "v.json").read_text())["lossy"]
    assert cost["options"] == ["step_cache(full every 3 steps, branch 0)"]
    assert [step for step, _ in cost["reused_steps"]] == [1, 2, 4, 5]
    assert all(0 < error < 1 for _, error in cost["reused_steps"]) and cost["latents_error"] > 0
    assert "transformer step error" in out and "transformer output error vs the full transformer" in out


def test_verify_still_passes_the_lossless_default(capsys, tmp_path):
    code, out, _ = run(["verify", *STEPS, "--json", str(tmp_path / "v.json")], capsys)
    record = json.loads((tmp_path / "v.json").read_text())
    assert code == 0 and "PASS (lossless)" in out and "LOSSY" not in out
    assert record["passed"] is True and record["lossy"] is None


def test_generate_fast_says_what_is_lossy_and_records_it(capsys, tmp_path):
    out_path = tmp_path / "fast.png"
    code, _, err = run(["generate", *STEPS, "--fast", "--out", str(out_path)], capsys)
    assert code == 0
    assert "LOSSY option on: step_cache(full every 3 steps, branch 0)" in err
    assert json.loads(Image.open(out_path).text["parameters"])["compiler"] == "diffjet-fast"


@pytest.mark.slow  # several seconds on a CPU; CI runs it in its -m slow step
def test_bench_records_the_cost_of_lossy_variants_next_to_their_speed(capsys, tmp_path):
    path = tmp_path / "bench.json"
    # (A lossless run records none: test_cli's bench over several resolutions checks that.)
    code, out, _ = run(["bench", *STEPS, "--compiler", "diffjet-deepcache,deepcache", "--repeats", "1",
                        "--unet-repeats", "1", "--warmup", "1", "--json", str(path)], capsys)
    assert code == 0
    runs = {r["compiler"]: r for r in json.loads(path.read_text())["runs"]}
    ours, package = runs["diffjet-deepcache"]["fidelity"], runs["deepcache"]["fidelity"]
    assert [s for s, _ in ours["reused_steps"]] == [1, 2, 4, 5]
    # The same schedule as DeepCache's own helper: the same cost, to float32 rounding.
    assert abs(ours["latents_error"] - package["latents_error"]) < 1e-4 * package["latents_error"] + 1e-6
    assert ours["latents_error"] > 1e-3
    assert "dB" in out
    assert ours["denoiser"] == "UNet"


@pytest.mark.slow  # several seconds on a CPU; CI runs it in its -m slow step
def test_bench_of_a_fast_dit_records_its_transformers_reused_steps(capsys, tmp_path):
    path = tmp_path / "bench.json"
    code, _, _ = run(["bench", "--model", "tiny-flux", "--steps", "6", "--device", "cpu", "--compiler",
                      "diffjet-fast", "--repeats", "1", "--unet-repeats", "1", "--warmup", "1", "--json", str(path)],
                     capsys)
    assert code == 0
    fidelity = json.loads(path.read_text())["runs"][0]["fidelity"]
    assert fidelity["denoiser"] == "transformer" and [s for s, _ in fidelity["reused_steps"]] == [1, 2, 4, 5]
    assert fidelity["latents_error"] > 0


def test_psnr_and_ssim_of_known_images():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 32, 32)
    assert quality.psnr(image, image) == float("inf") and quality.ssim(image, image) == pytest.approx(1.0)
    noisy = (image + 0.1 * torch.randn_like(image)).clamp(0, 1)
    mse = float(((noisy - image) ** 2).mean())
    assert quality.psnr(noisy, image) == pytest.approx(10 * torch.log10(torch.tensor(1 / mse)).item())
    assert 0.2 < quality.ssim(noisy, image) < 0.95
    # SSIM sees structure: a constant image with the same mean scores near 0 however close its PSNR.
    flat = torch.full_like(image, float(image.mean()))
    assert quality.ssim(flat, image) < 0.05
