"""Step caching for SD UNets (DeepCache) and DiTs (first-block cache), with every part compiled and captured.

DeepCache (Ma et al., 2023) reuses a UNet's deep features between denoising steps: a full step runs the
whole UNet and keeps the up path's input at a skip branch; the steps between run only the outer layers
and take that input from the full step. Its reference implementation swaps block forwards in Python at
every step, which torch.compile cannot capture (DeepCache issue #26). Here the UNet's forward is cut once
into parts (`unet_parts.py`), each part is an ordinary function of tensors that Inductor compiles and
the CUDA-graph runtime captures per input shape, and the choice between them is made outside the
compiled code, so skipping never recompiles, re-captures or falls back to eager.

Uniform schedule (DeepCache's): two parts, one launch per step.
- `full(*unet_args) -> (noise, feature)`;  `shallow(*unet_args, feature) -> noise`.
Adaptive schedule (first-block cache style): three parts, two launches and one host read per step.
- `head(*unet_args) -> state` (the first down layer included, the probe); `deep(state) -> feature`;
  `tail(state, feature) -> noise`. The probe's relative L1 change since the last full step decides.

DiTs (Flux.1, SD 3.x: `dit_parts.py`) cache the residual of every block after the first `branch + 1`:
- `head(*args) -> state` (those first blocks, the probe); `rest(state) -> (hidden, residual)`;
  `tail(hidden, residual) -> noise`. Full steps run all three; cached steps skip `rest`. The uniform
  schedule decides by step number; the adaptive one by the probe's change, as for UNets.

Steps are counted per pipeline call (the pipeline's call wrapper calls `begin`), one per UNet call, so
a second-order scheduler counts each of its UNet calls.
"""

from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..config import StepCache
from . import dit_parts, unet_parts
from .unet_parts import Plan, State

logger = logging.getLogger(__name__)

# UNet arguments the parts take, in forward's order: positional calls bind to them.
_ARGS = ("sample", "timestep", "encoder_hidden_states", "class_labels", "timestep_cond", "attention_mask",
         "cross_attention_kwargs", "added_cond_kwargs", "down_block_additional_residuals",
         "mid_block_additional_residual", "down_intrablock_additional_residuals", "encoder_attention_mask")


# -- the parts, as plain functions of the UNet and tensors ---------------------------------------


def full(unet: nn.Module, plan: Plan, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole UNet: (noise prediction, the feature the shallow steps reuse)."""
    state = unet_parts.prologue(unet, *args, **kwargs)
    unet_parts.run(unet, plan.layers[: plan.tail], state)
    feature = state.h
    unet_parts.run(unet, plan.layers[plan.tail :], state)
    return unet_parts.epilogue(unet, state.h), feature


def shallow(unet: nn.Module, plan: Plan, *args: Any, feature: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The layers above the branch, with the deep layers' output taken from `feature`."""
    state = unet_parts.prologue(unet, *args, **kwargs)
    unet_parts.run(unet, plan.layers[: plan.head], state)
    return _tail(unet, plan, state, feature)


def head(unet: nn.Module, plan: Plan, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """The layers every adaptive step runs, the probe (first down layer's output) among them."""
    state = unet_parts.prologue(unet, *args, **kwargs)
    unet_parts.run(unet, plan.layers[: plan.head], state)
    return {"h": state.h, "stack": state.stack, "context": state.context, "pushed": state.pushed,
            "probe": state.stack[1][1]}


def deep(unet: nn.Module, plan: Plan, h: torch.Tensor, stack: list, context: dict, pushed: int) -> torch.Tensor:
    """From the head's output to the feature (full steps only)."""
    state = State(h=h, stack=list(stack), context=context, pushed=pushed)
    unet_parts.run(unet, plan.layers[plan.head : plan.tail], state)
    return state.h


def tail(unet: nn.Module, plan: Plan, feature: torch.Tensor, stack: list, context: dict) -> torch.Tensor:
    """From the feature to the noise prediction, popping the head's fresh skip connections."""
    return _tail(unet, plan, State(h=feature, stack=list(stack), context=context), feature)


def _tail(unet: nn.Module, plan: Plan, state: State, feature: torch.Tensor) -> torch.Tensor:
    del state.stack[plan.fresh :]  # skip connections of the deep layers: the feature stands for them
    state.h = feature
    unet_parts.run(unet, plan.layers[plan.tail :], state)
    return unet_parts.epilogue(unet, state.h)


def module_first(function: Callable[..., Any], *extra: Any) -> Callable[..., Any]:
    """`function(module, *extra, ...)` as a function of the module and the call's arguments: the form
    `runtime/precompiled.py` saves (the extra values, a plan or a block count, travel as its closure; the
    entry's key holds the step-cache settings they come from)."""

    def part(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return function(module, *extra, *args, **kwargs)

    return part


#: The parts called with the UNet's own arguments (`timestep` among them); `deep` and `tail` take
#: intermediate state instead.
UNET_ARGUMENT_PARTS = ("full", "shallow", "head")


def relative_l1(x: torch.Tensor, reference: torch.Tensor) -> float:
    """mean |x − reference| / mean |reference| (one host read)."""
    x, reference = x.float(), reference.float()
    return float((x - reference).abs().mean() / reference.abs().mean().clamp_min(1e-12))


# -- what both step caches share ----------------------------------------------------------------


@dataclass
class _Branch:
    """One conditioning branch of a pipeline call (a UNet's calls are one; Flux's true CFG gives a DiT two):
    its model calls so far and what its last full step left (the UNet's feature or the DiT's residual, and
    the adaptive probe)."""

    calls: int = 0
    cached: torch.Tensor | None = None
    probe: torch.Tensor | None = None
    since_full: int = 0


class _PerCall:
    """What both step caches keep per pipeline call: the steps run so far (`steps`: "full" or "cached", one
    per model call), each branch's state (`_Branch`), the schedule that decides between the two
    (`_reuses`), and `audit`, which when set is called as audit(step, output, full_output) at every reused
    step, with the full model's output on the same inputs (how `diffjet verify` measures reuse)."""

    settings: StepCache

    def _reset(self) -> None:
        self.steps: list[str] = []
        self.audit: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None
        self._active = False
        self._pipeline: weakref.ref | None = None
        self._branches: dict[Any, _Branch] = {}
        self._warned = False

    # -- pipeline-call hooks ------------------------------------------------------------------
    def begin(self, pipeline: Any = None) -> None:
        self._active = True
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else None
        self._branches = {}
        self.steps = []

    def end(self) -> None:
        self._active = False
        self._branches = {}  # what they cached belongs to one trajectory

    def _branch(self, key: Any = None) -> _Branch:
        return self._branches.setdefault(key, _Branch())

    def _reuses(self, branch: _Branch, probe: torch.Tensor | None = None) -> bool:
        """Whether the branch's next model call reuses its cache (and counts that call). Uniform: all but
        every `interval`-th call. Adaptive: while the probe has changed by less than `threshold` since the
        last full step, within `interval` and never at the first `first_full` or last `last_full` steps."""
        s, step = self.settings, branch.calls
        branch.calls += 1
        if branch.cached is None:
            return False
        if not s.adaptive:
            return step % s.interval != 0
        total = getattr(self._pipeline() if self._pipeline else None, "_num_timesteps", None)
        if (step < s.first_full or branch.since_full + 1 >= s.interval
                or (isinstance(total, int) and step >= total - s.last_full)):
            return False
        return relative_l1(probe, branch.probe) < s.threshold


# -- the UNet's forward with a step cache ----------------------------------------------------------


class StepCachedUNet(_PerCall):
    """Replaces a UNet's `forward`: picks, per call, the full path or the cached one.

    `compile` turns each part function (`full`, `shallow`, ...: each its own code object, so Dynamo
    keeps one compiled graph per part) into its compiled form; `graph(name, part, saveable)` wraps a part,
    bound to the UNet, into what runs it (the CUDA-graph runner on a GPU); `saveable` is the same part as
    a function of the UNet alone (`module_first`), what the warm-start store precompiles and saves.
    Outside a pipeline call (`begin` … `end`) every call runs the full path, so a direct `pipe.unet(...)`
    is never lossy; inputs the parts do not cover (T2I-Adapter residuals, GLIGEN, sizes that need
    diffusers' explicit upsample sizes) run diffusers' own forward.
    """

    def __init__(self, unet: nn.Module, settings: StepCache, *, compile: Callable[[Callable], Callable] | None = None,
                 graph: Callable[[str, Callable, Callable], Callable] | None = None) -> None:
        self.settings = settings
        self.plan = unet_parts.plan(unet, settings.branch, probe=settings.adaptive)
        self._unet = weakref.ref(unet)
        self._plain = functools.partial(type(unet).forward, unet)
        functions = {"full": full, "shallow": shallow, "head": head, "deep": deep, "tail": tail}
        names = ("full", "head", "deep", "tail") if settings.adaptive else ("full", "shallow")
        self.parts = {}
        for name in names:
            function = compile(functions[name]) if compile is not None else functions[name]
            part = functools.partial(function, unet, self.plan)
            self.parts[name] = graph(name, part, module_first(functions[name], self.plan)) if graph else part
        self._reset()

    # -- the forward --------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return_dict = kwargs.pop("return_dict", True)
        kwargs.update(zip(_ARGS, args))
        if not self._covers(kwargs):
            return self._plain(**kwargs, return_dict=return_dict)
        kwargs.pop("down_intrablock_additional_residuals", None)
        if not self._active:
            noise = self.parts["full"](**kwargs)[0]
        elif self.settings.adaptive:
            noise = self._adaptive(kwargs)
        else:
            noise = self._uniform(kwargs)
        if not return_dict:
            return (noise,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=noise)

    def _uniform(self, kwargs: dict) -> torch.Tensor:
        branch = self._branch()
        if not self._reuses(branch):
            noise, branch.cached = self.parts["full"](**kwargs)
            self.steps.append("full")
            return noise
        noise = self.parts["shallow"](**kwargs, feature=branch.cached)
        self._record(kwargs, noise)
        return noise

    def _adaptive(self, kwargs: dict) -> torch.Tensor:
        branch = self._branch()
        state = self.parts["head"](**kwargs)
        reuse = self._reuses(branch, state["probe"])
        if not reuse:
            branch.cached = self.parts["deep"](state["h"], state["stack"], state["context"], state["pushed"])
            branch.probe, branch.since_full = state["probe"], 0
        noise = self.parts["tail"](branch.cached, state["stack"][: self.plan.fresh], state["context"])
        if reuse:
            branch.since_full += 1
            self._record(kwargs, noise)
        else:
            self.steps.append("full")
        return noise

    def _record(self, kwargs: dict, noise: torch.Tensor) -> None:
        """A reused step; with `audit` on, also its error against the full UNet on the same inputs."""
        self.steps.append("cached")
        if self.audit is not None:
            self.audit(len(self.steps) - 1, noise, self.parts["full"](**kwargs)[0])

    def _covers(self, kwargs: dict) -> bool:
        cross = kwargs.get("cross_attention_kwargs") or {}
        adapter = kwargs.get("down_intrablock_additional_residuals") is not None or (
            kwargs.get("down_block_additional_residuals") is not None
            and kwargs.get("mid_block_additional_residual") is None)  # diffusers reads that as T2I-Adapter
        covered = not adapter and "gligen" not in cross and unet_parts.fits(self._unet(), kwargs["sample"])
        if not covered and not self._warned:
            logger.warning("step cache: T2I-Adapter or GLIGEN inputs, or a size that is not a multiple of the "
                           "UNet's upsampling factor, run diffusers' own UNet forward, uncached")
            self._warned = True
        return covered


class StepCachedTransformer(_PerCall):
    """Replaces a DiT's `forward` (Flux.1, SD 3.x): per call, all blocks, or the first `branch + 1` and the
    residual of the rest from the last full step. `compile`, `graph`, `begin`/`end`, `steps` and `audit`
    are as for `StepCachedUNet`; calls outside a pipeline call, and inputs the parts do not cover
    (ControlNet residuals, IP-Adapter embeddings, skipped layers), run every block."""

    def __init__(self, transformer: nn.Module, settings: StepCache, *,
                 compile: Callable[[Callable], Callable] | None = None,
                 graph: Callable[[str, Callable, Callable], Callable] | None = None) -> None:
        self.settings = settings
        self.family = dit_parts.family(transformer)
        self.blocks = settings.branch + 1
        dit_parts.check_blocks(transformer, self.blocks)
        self._plain = functools.partial(type(transformer).forward, transformer)
        functions = {"head": dit_parts.head, "rest": dit_parts.rest, "tail": dit_parts.tail}
        self.parts = {}
        for name, plain in functions.items():
            function = compile(plain) if compile is not None else plain
            extra = () if name == "tail" else (self.blocks,)
            bound = functools.partial(function, transformer, *extra)
            self.parts[name] = graph(name, bound, module_first(plain, *extra)) if graph else bound
        self._zeros: torch.Tensor | None = None
        self._reset()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return_dict = kwargs.pop("return_dict", True)
        kwargs.update(zip(dit_parts.ARGS[self.family], args))
        if not dit_parts.covers(kwargs):
            if not self._warned:
                logger.warning("step cache: ControlNet, IP-Adapter or skip-layer inputs run diffusers' own "
                               "transformer forward, uncached")
                self._warned = True
            return self._plain(**kwargs, return_dict=return_dict)
        for name in ("joint_attention_kwargs", "controlnet_block_samples", "controlnet_single_block_samples",
                     "block_controlnet_hidden_states", "skip_layers", "controlnet_blocks_repeat"):
            kwargs.pop(name, None)
        size = tuple(kwargs["hidden_states"].shape[-2:]) if self.family == dit_parts.SD3 else (None, None)
        noise = self._step(kwargs, size)
        if not return_dict:
            return (noise,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=noise)

    def _step(self, kwargs: dict, size: tuple) -> torch.Tensor:
        state = self.parts["head"](**kwargs)
        if not self._active:
            return self._full(state, size, keep=None)
        # Flux's true CFG calls the transformer twice a step, with the prompt's and the negative prompt's
        # embeddings (each one tensor for the whole call): each keeps its own residual and step count.
        branch = self._branch(kwargs["encoder_hidden_states"].data_ptr())
        if not self._reuses(branch, state["probe"]):
            self.steps.append("full")
            return self._full(state, size, keep=branch)
        noise = self.parts["tail"](state["h"], branch.cached, state["temb"], *size)
        branch.since_full += 1
        self.steps.append("cached")
        if self.audit is not None:
            self.audit(len(self.steps) - 1, noise, self._full(state, size, keep=None))
        return noise

    def _full(self, state: dict, size: tuple, *, keep: _Branch | None) -> torch.Tensor:
        hidden, residual = self.parts["rest"](state["h"], state["e"], state["temb"], state["rotary"])
        if keep is not None:
            keep.cached, keep.probe, keep.since_full = residual, state["probe"], 0
        if self._zeros is None or self._zeros.shape != hidden.shape or self._zeros.dtype != hidden.dtype \
                or self._zeros.device != hidden.device:
            self._zeros = torch.zeros_like(hidden)
        return self.parts["tail"](hidden, self._zeros, state["temb"], *size)
