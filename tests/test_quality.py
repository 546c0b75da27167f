"""The fidelity check's own plumbing (`diffjet.quality`), on CPU."""

import types

import torch

from diffjet import quality


class _RecordingUNet(torch.nn.Module):
    """Stands in for a half-precision UNet: records the dtypes it is called with."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1, dtype=torch.float16))
        self.seen = []

    @property
    def dtype(self):
        return self.weight.dtype

    @property
    def device(self):
        return self.weight.device

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=True):
        self.seen.append((sample.dtype, timestep.dtype, encoder_hidden_states.dtype))
        return (sample * self.weight,)


def test_unet_output_keeps_the_timestep_dtype_the_pipeline_calls_with():
    # The inputs recorded from the float32 reference, replayed on a float16 UNet: the latents and text
    # states become float16, the 0-d timestep stays float32 as the scheduler gives it, so a compiled UNet
    # sees the signature it was compiled for instead of compiling another.
    unet = _RecordingUNet()
    pipe = types.SimpleNamespace(unet=unet)
    inputs = ((torch.randn(2, 4, 8, 8), torch.tensor(999.0)), {"encoder_hidden_states": torch.randn(2, 77, 32)})
    out = quality.unet_output(pipe, inputs)
    assert unet.seen == [(torch.float16, torch.float32, torch.float16)]
    assert out.dtype == torch.float32 and out.shape == (2, 4, 8, 8)


def test_the_lossy_cost_table_gives_the_median_and_max_of_the_reused_steps():
    cost = quality.LossyCost(options=["step_cache"], latents_error=0.06, psnr_db=37.0, ssim=0.99,
                             reused_steps=[(1, 0.4), (2, 0.5)])
    assert "reused steps: 2, UNet output error vs the full UNet: median 4.500e-01, max 5.000e-01" in cost.table()
    cost.reused_steps = [(1, 0.1), (2, 0.3), (4, 0.2)]
    assert "reused steps: 3, UNet output error vs the full UNet: median 2.000e-01, max 3.000e-01" in cost.table()


def _verdict(baseline_latents: float, candidate_latents: float) -> quality.Verdict:
    baseline = quality.VariantResult("eager bfloat16", 0.07, baseline_latents, True)
    candidate = quality.VariantResult("diffjet", 0.01, candidate_latents, True)
    return quality.Verdict(reference="eager float32", baseline=baseline, candidate=candidate,
                           bound_unet=quality.bound(0.07), bound_latents=quality.bound(baseline_latents),
                           denoiser="transformer")


def test_final_latents_decide_only_while_their_bound_excludes_unrelated_latents():
    # Latents drawn independently of the reference, with its norm, are √2 from it: a bound above that lets
    # any output through, which a full-size random-weight Flux run at 28 steps reaches (eager bf16 1.405).
    ref, unrelated = torch.randn(2, 16, 64, 64, generator=torch.Generator().manual_seed(0)).unbind(0)
    assert abs(quality.relative_error(unrelated, ref) - quality.UNRELATED) < 0.02
    drifted = _verdict(baseline_latents=1.405, candidate_latents=1.405)
    assert drifted.passed and not drifted.latents_decide
    assert "only the one-step error decides" in drifted.table()
    held = _verdict(baseline_latents=0.04, candidate_latents=0.05)
    assert held.passed and held.latents_decide
    assert "one-step error decides" not in held.table()
    # The edge: a baseline error whose 1.5x bound just reaches √2.
    assert not _verdict(quality.UNRELATED / 1.5, 0.1).latents_decide
    assert _verdict(quality.UNRELATED / 1.5 - 1e-3, 0.1).latents_decide
