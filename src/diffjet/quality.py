"""Fidelity: how far a pipeline's numbers are from eager float32 (DESIGN.md, "Measuring fidelity").

`error(x) = ‖x − ref‖ / ‖ref‖` on the UNet output of one step and on the final latents of a full run,
with the reference in float32. diffjet is lossless when its error is at most 1.5× the error of eager
half precision and nothing is NaN/Inf. On a CPU the "half precision" run is float32 again (same seed),
whose error is zero, so the bound there is the float32 rounding floor instead.

A lossy configuration (step cache, fp8) is not held to that rule: its cost is measured and printed
instead (`LossyCost`): the one-step UNet error against float32, the error of every reused step's UNet
output against the full UNet on the same trajectory, and the final latents and decoded image against
the lossless output (eager half precision, same seed) as relative error, PSNR and SSIM. With the
random-weight presets these are approximation errors, not image quality.
"""

from __future__ import annotations

import gc
import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from .models import control_inputs

LOSSLESS_FACTOR = 1.5
# Reordered float32 sums (channels-last convolutions, fused projections) move results by ~1e-6
# relative per op; after a full tiny-model run that stays far below this floor.
FLOAT32_FLOOR = 1e-4
#: `relative_error` of latents unrelated to the reference (same norm, uncorrelated): √2. A bound at or above it
#: admits any such latents, so the final-latent check cannot fail there.
UNRELATED = math.sqrt(2)


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖ / ‖ref‖ in float64; inf when x has NaN/Inf."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(x).all():
        return float("inf")
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))


@dataclass
class VariantResult:
    name: str
    unet_error: float
    latents_error: float
    finite: bool


@dataclass
class LossyCost:
    """What the lossy options of a compiled pipeline cost, against the lossless output at the same seed."""

    options: list[str]
    latents_error: float  # final latents against eager half precision's
    psnr_db: float  # decoded image against eager half precision's
    ssim: float
    reused_steps: list[tuple[int, float]]  # (step, error of its UNet output against the full UNet's)
    denoiser: str = "UNet"  # what the steps run: "UNet", or "transformer" for a DiT

    def table(self) -> str:
        rows = [f"LOSSY: {', '.join(self.options)}",
                f"  final latents vs lossless: relative error {self.latents_error:.3e}",
                f"  decoded image vs lossless: PSNR {self.psnr_db:.2f} dB, SSIM {self.ssim:.4f}"]
        if self.reused_steps:
            errors = [e for _, e in self.reused_steps]
            rows.append(f"  reused steps: {len(errors)}, {self.denoiser} output error vs the full {self.denoiser}: "
                        f"median {statistics.median(errors):.3e}, max {max(errors):.3e}")
            rows.append("    " + ", ".join(f"step {i}: {e:.2e}" for i, e in self.reused_steps))
        return "\n".join(rows)


@dataclass
class Verdict:
    reference: str
    baseline: VariantResult
    candidate: VariantResult
    bound_unet: float
    bound_latents: float
    lossy: LossyCost | None = None
    denoiser: str = "UNet"

    @property
    def passed(self) -> bool:
        c = self.candidate
        return c.finite and c.unet_error <= self.bound_unet and c.latents_error <= self.bound_latents

    @property
    def latents_decide(self) -> bool:
        """Whether the final-latent check can fail. Not where eager half precision has itself left float32's
        trajectory so far over the run (chaotic ones: random-weight DiTs at full size, 28 steps) that the bound
        admits unrelated latents; then only the one-step error decides."""
        return self.bound_latents < UNRELATED

    def table(self) -> str:
        rows = [("variant", f"{self.denoiser.lower()} step error", "final latents error", "finite")]
        for v in (self.baseline, self.candidate):
            rows.append((v.name, f"{v.unet_error:.3e}", f"{v.latents_error:.3e}", str(v.finite)))
        if self.lossy is None:
            rows.append(("bound (diffjet)", f"{self.bound_unet:.3e}", f"{self.bound_latents:.3e}", "True"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        if self.lossy is None and not self.latents_decide:
            lines.append(f"final latents: {self.baseline.name} is {self.baseline.latents_error:.3f} from float32's, "
                         f"so its bound admits unrelated latents ({UNRELATED:.3f}): half precision alone has left "
                         "float32's trajectory over these steps, and only the one-step error decides "
                         "(fewer steps make the final latents count)")
        return "\n".join(lines)


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images with values in [0, 1]; inf when they are equal."""
    mse = float(torch.mean((image.double().cpu() - reference.double().cpu()) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(image: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean structural similarity (Wang et al. 2004: 11×11 Gaussian window, σ 1.5, K1 0.01, K2 0.03) of
    (N, C, H, W) images with values in [0, 1], over every channel."""
    x, y = image.double().cpu(), reference.double().cpu()
    channels = x.shape[1]
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2).expand(channels, 1, 11, 11)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, window, groups=channels)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(value.mean())


def bound(baseline_error: float) -> float:
    return max(LOSSLESS_FACTOR * baseline_error, FLOAT32_FLOOR)


def denoiser_component(pipe) -> str:
    """The name of the component a pipeline calls at every step: "unet", or "transformer" for a DiT pipeline."""
    return "unet" if getattr(pipe, "unet", None) is not None else "transformer"


def denoiser(pipe) -> torch.nn.Module:
    """The module a pipeline calls at every step (`denoiser_component`). `unet_error` and `unet_ms` in results
    are this module's, whichever it is."""
    return getattr(pipe, denoiser_component(pipe))


def denoiser_name(pipe) -> str:
    """What `denoiser` is, as reports name it: "UNet" or "transformer"."""
    return {"unet": "UNet"}.get(denoiser_component(pipe), "transformer")


def record_unet_inputs(pipe, run: Callable[[], Any]) -> tuple[tuple, dict]:
    """Run `run()` and return (args, kwargs) of the first denoiser call (`denoiser`), cloned."""
    seen: dict[str, Any] = {}

    def hook(module, args, kwargs):
        if not seen:
            seen["inputs"] = pytree.tree_map_only(torch.Tensor, torch.clone, (args, kwargs))

    handle = denoiser(pipe).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen["inputs"]


def unet_output(pipe, inputs: tuple[tuple, dict]) -> torch.Tensor:
    """The denoiser's (`denoiser`) noise prediction for `inputs`, cast to its dtype and device.

    Timesteps (a 0-d tensor for a UNet, one per image for a DiT) and a DiT's guidance keep their dtype, as
    in the pipeline's own calls (the scheduler's float32 values): a half-precision one would be a new input
    signature for a compiled denoiser, compiled only for this check."""
    model = denoiser(pipe)
    dtype, device = model.dtype, model.device

    def cast(x: torch.Tensor) -> torch.Tensor:
        return x.to(device=device, dtype=dtype if x.is_floating_point() and x.dim() > 1 else x.dtype)

    args, kwargs = pytree.tree_map_only(torch.Tensor, cast, inputs)
    kwargs = {**kwargs, "return_dict": False}
    with torch.no_grad():
        return model(*args, **kwargs)[0].float()


def final_outputs(pipe, *, prompt: str, steps: int, height: int, width: int, seed: int,
                  decode: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(final latents, decoded image in [0, 1] as (N, C, H, W) when `decode`), both float32 on the CPU."""
    seen: dict[str, torch.Tensor] = {}

    def keep_latents(_pipe, _i, _t, callback_kwargs):
        seen["latents"] = callback_kwargs["latents"]
        return callback_kwargs

    out = pipe(
        **control_inputs(pipe, height, width),
        prompt=prompt,
        num_inference_steps=steps,
        height=height,
        width=width,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="pt" if decode else "latent",
        callback_on_step_end=keep_latents if decode else None,
    )
    if not decode:
        return out.images.float().cpu(), None
    return seen["latents"].float().cpu(), out.images.float().cpu()


def lossy_cost(options: list[str], latents: torch.Tensor, image: torch.Tensor, lossless_latents: torch.Tensor,
               lossless_image: torch.Tensor, reused_steps: list[tuple[int, float]], model: str = "UNet") -> LossyCost:
    return LossyCost(options=options, latents_error=relative_error(latents, lossless_latents),
                     psnr_db=psnr(image, lossless_image), ssim=ssim(image, lossless_image),
                     reused_steps=reused_steps, denoiser=model)


def audit_reused_steps(pipe) -> list[tuple[int, float]]:
    """A list that fills, during the pipeline's next calls, with (step, error) of every reused step's
    UNet output against the full UNet on the same inputs; stays empty without a step cache."""
    reused: list[tuple[int, float]] = []
    cached = getattr(getattr(pipe, "diffjet", None), "step_cache", None)
    if cached is not None:
        cached.audit = lambda step, noise, full: reused.append((step, relative_error(noise, full)))
    return reused


def verify(
    load: Callable[[torch.dtype], Any],
    *,
    device: torch.device,
    prompt: str,
    steps: int,
    height: int,
    width: int,
    seed: int,
    compile_pipe: Callable[[Any], Any],
    prepare_eager: Callable[[Any], Any] | None = None,
    half: torch.dtype = torch.float16,
) -> Verdict:
    """Eager float32 reference, eager `half` precision (float32 again on CPU), then the compiled pipeline.

    `load(dtype)` returns a fresh pipeline on `device`; `compile_pipe(pipe)` compiles it, and
    `prepare_eager(pipe)`, when given, readies both eager pipelines the same way (e.g. loads a LoRA with
    diffusers' own loader). One pipeline is alive at a time, so full-size models fit next to their
    reference's cached outputs. When the compiled pipeline is lossy (`pipe.diffjet.lossy`), the verdict
    also holds its `LossyCost`.
    """
    half = half if device.type == "cuda" else torch.float32
    results: dict[str, Any] = {}

    def evaluate(dtype: torch.dtype, prepare: Callable[[Any], Any] | None, decode: bool | None) -> tuple:
        """decode=None: decode only if the prepared pipeline is lossy (images are compared only then, and
        decoding would compile the VAE for nothing)."""
        pipe = load(dtype)
        pipe.set_progress_bar_config(disable=True)
        if prepare is not None:
            pipe = prepare(pipe)
        options = list(getattr(getattr(pipe, "diffjet", None), "lossy", []))
        results["denoiser"] = denoiser_name(pipe)
        decode = bool(options) if decode is None else decode
        reused = audit_reused_steps(pipe)
        run = lambda: final_outputs(pipe, prompt=prompt, steps=steps, height=height,  # noqa: E731
                                    width=width, seed=seed, decode=decode)
        holder: dict[str, Any] = {}
        inputs = record_unet_inputs(pipe, lambda: holder.setdefault("outputs", run()))
        unet = unet_output(pipe, results.get("inputs", inputs))
        del pipe
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return inputs, unet, *holder["outputs"], options, reused

    inputs, ref_unet, ref_latents, _, _, _ = evaluate(torch.float32, prepare_eager, decode=False)
    results["inputs"] = inputs
    _, unet, latents, image, options, reused = evaluate(half, compile_pipe, decode=None)
    _, half_unet, half_latents, half_image, _, _ = evaluate(half, prepare_eager, decode=bool(options))
    variants = []
    for name, u, lat in ((f"eager {str(half).removeprefix('torch.')}", half_unet, half_latents),
                         ("diffjet", unet, latents)):
        finite = bool(torch.isfinite(u).all() and torch.isfinite(lat).all())
        variants.append(VariantResult(name, relative_error(u, ref_unet), relative_error(lat, ref_latents), finite))
    baseline, candidate = variants
    return Verdict(
        reference="eager float32",
        baseline=baseline,
        candidate=candidate,
        bound_unet=bound(baseline.unet_error),
        bound_latents=bound(baseline.latents_error),
        lossy=lossy_cost(options, latents, image, half_latents, half_image, reused, results["denoiser"])
        if options else None,
        denoiser=results["denoiser"],
    )
