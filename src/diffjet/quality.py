"""Fidelity: how far a pipeline's numbers are from eager float32 (DESIGN.md, "Measuring fidelity").

`error(x) = ‖x − ref‖ / ‖ref‖` on the UNet output of one step and on the final latents of a full run,
with the reference in float32. diffjet is lossless when its error is at most 1.5× the error of eager
half precision and nothing is NaN/Inf. On a CPU the "half precision" run is float32 again (same seed),
whose error is zero, so the bound there is the float32 rounding floor instead.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from .models import control_inputs

LOSSLESS_FACTOR = 1.5
# Reordered float32 sums (channels-last convolutions, fused projections) move results by ~1e-6
# relative per op; after a full tiny-model run that stays far below this floor.
FLOAT32_FLOOR = 1e-4


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
class Verdict:
    reference: str
    baseline: VariantResult
    candidate: VariantResult
    bound_unet: float
    bound_latents: float

    @property
    def passed(self) -> bool:
        c = self.candidate
        return c.finite and c.unet_error <= self.bound_unet and c.latents_error <= self.bound_latents

    def table(self) -> str:
        rows = [("variant", "unet step error", "final latents error", "finite")]
        for v in (self.baseline, self.candidate):
            rows.append((v.name, f"{v.unet_error:.3e}", f"{v.latents_error:.3e}", str(v.finite)))
        rows.append(("bound (diffjet)", f"{self.bound_unet:.3e}", f"{self.bound_latents:.3e}", "True"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def bound(baseline_error: float) -> float:
    return max(LOSSLESS_FACTOR * baseline_error, FLOAT32_FLOOR)


def record_unet_inputs(pipe, run: Callable[[], Any]) -> tuple[tuple, dict]:
    """Run `run()` and return (args, kwargs) of the first UNet call, cloned."""
    seen: dict[str, Any] = {}

    def hook(module, args, kwargs):
        if not seen:
            seen["inputs"] = pytree.tree_map_only(torch.Tensor, torch.clone, (args, kwargs))

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen["inputs"]


def unet_output(pipe, inputs: tuple[tuple, dict]) -> torch.Tensor:
    """The UNet's noise prediction for `inputs`, cast to the UNet's dtype and device.

    The timestep (a 0-d tensor) keeps its dtype, as in the pipeline's own calls (the scheduler's float32
    timesteps): a float16 one would be a new input signature for a compiled UNet, compiled only for this
    check."""
    dtype, device = pipe.unet.dtype, pipe.unet.device

    def cast(x: torch.Tensor) -> torch.Tensor:
        return x.to(device=device, dtype=dtype if x.is_floating_point() and x.dim() > 0 else x.dtype)

    args, kwargs = pytree.tree_map_only(torch.Tensor, cast, inputs)
    kwargs = {**kwargs, "return_dict": False}
    with torch.no_grad():
        return pipe.unet(*args, **kwargs)[0].float()


def final_latents(pipe, *, prompt: str, steps: int, height: int, width: int, seed: int) -> torch.Tensor:
    out = pipe(
        **control_inputs(pipe, height, width),
        prompt=prompt,
        num_inference_steps=steps,
        height=height,
        width=width,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="latent",
    )
    return out.images.float()


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
) -> Verdict:
    """Eager float32 reference, eager half precision (float32 again on CPU), then the compiled pipeline.

    `load(dtype)` returns a fresh pipeline on `device`; `compile_pipe(pipe)` compiles it, and
    `prepare_eager(pipe)`, when given, readies both eager pipelines the same way (e.g. loads a LoRA with
    diffusers' own loader). One pipeline is alive at a time, so full-size models fit next to their
    reference's cached outputs.
    """
    half = torch.float16 if device.type == "cuda" else torch.float32
    results = {}

    def evaluate(dtype: torch.dtype, prepare: Callable[[Any], Any] | None) -> tuple:
        pipe = load(dtype)
        pipe.set_progress_bar_config(disable=True)
        if prepare is not None:
            pipe = prepare(pipe)
        run = lambda: final_latents(pipe, prompt=prompt, steps=steps, height=height, width=width, seed=seed)  # noqa: E731
        holder: dict[str, torch.Tensor] = {}
        inputs = record_unet_inputs(pipe, lambda: holder.setdefault("latents", run()))
        outputs = (inputs, unet_output(pipe, results.get("inputs", inputs)), holder["latents"].cpu())
        del pipe
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return outputs

    inputs, ref_unet, ref_latents = evaluate(torch.float32, prepare_eager)
    results["inputs"] = inputs
    variants = []
    for name, dtype, prepare in (
        (f"eager {str(half).removeprefix('torch.')}", half, prepare_eager),
        ("diffjet", half, compile_pipe),
    ):
        _, unet, latents = evaluate(dtype, prepare)
        finite = bool(torch.isfinite(unet).all() and torch.isfinite(latents).all())
        variants.append(
            VariantResult(name, relative_error(unet, ref_unet), relative_error(latents, ref_latents), finite)
        )
    baseline, candidate = variants
    return Verdict(
        reference="eager float32",
        baseline=baseline,
        candidate=candidate,
        bound_unet=bound(baseline.unet_error),
        bound_latents=bound(baseline.latents_error),
    )
