"""Timing one pipeline variant: the measurement protocol of DESIGN.md.

- `first_call_s`: wall time from applying the variant to the end of the first generation (includes
  compilation and graph capture), synchronised.
- Warm-up calls follow (at least one) and are never counted.
- `its`: denoising-loop iterations per second. A CUDA event is recorded at the end of every step
  (pipeline callback); a run's rate is (steps - 1) / time between the first and the last step end, so it
  holds the whole step (UNet, guidance, scheduler, Python) and nothing before or after the loop.
  Median over the timed runs, min and max kept.
- `e2e_s`: prompt to decoded PIL image, host clock around a synchronised call. Median.
- `unet_ms`: the denoiser alone (the UNet, or a DiT pipeline's transformer: `quality.denoiser`) on the
  inputs of its first call in the loop, CUDA events around each call, median over `unet_repeats` calls.
- `peak_mem_gib`: `torch.cuda.max_memory_allocated` over the whole process.
On a CPU the same quantities are taken with the host clock.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from ..models import control_inputs
from ..quality import denoiser, record_unet_inputs


@dataclass
class RunResult:
    model: str
    compiler: str
    height: int
    width: int
    steps: int
    batch: int
    its: float
    its_min: float
    its_max: float
    unet_ms: float
    unet_ms_min: float
    unet_ms_max: float
    e2e_s: float
    peak_mem_gib: float | None
    first_call_s: float
    repeats: int
    unet_repeats: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(data.pop("extra"))
        return data


class _Clock:
    """CUDA events on a GPU, the host clock elsewhere; both synchronise before reading."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        return end - start

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def measure(
    pipe,
    *,
    model: str,
    compiler: str,
    apply_compiler: Callable[[Any], dict[str, Any]],
    prompt: str,
    steps: int,
    height: int,
    width: int,
    batch: int,
    seed: int,
    warmup: int,
    repeats: int,
    unet_repeats: int,
) -> RunResult:
    device = pipe.device
    clock = _Clock(device)
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats()

    step_marks: list[Any] = []

    def on_step_end(_pipe, _i, _t, callback_kwargs):
        step_marks.append(clock.mark())
        return callback_kwargs

    inputs = control_inputs(pipe, height, width)

    def generate() -> Any:
        step_marks.clear()
        return pipe(
            **inputs,
            prompt=[prompt] * batch,
            num_inference_steps=steps,
            height=height,
            width=width,
            generator=torch.Generator("cpu").manual_seed(seed),
            callback_on_step_end=on_step_end,
        )

    clock.sync()
    start = time.perf_counter()
    extra = apply_compiler(pipe)
    generate()
    clock.sync()
    first_call_s = time.perf_counter() - start

    # The hook sits on the outer module: for torch.compile's wrapper it runs outside the compiled code.
    unet_args, unet_kwargs = record_unet_inputs(pipe, generate)
    for _ in range(warmup - 1):
        generate()

    rates, e2e = [], []
    for _ in range(repeats):
        clock.sync()
        t0 = time.perf_counter()
        generate()
        clock.sync()
        e2e.append(time.perf_counter() - t0)
        if steps > 1:
            rates.append((steps - 1) / clock.seconds(step_marks[0], step_marks[-1]))

    unet_times = []
    step_module = denoiser(pipe)
    with torch.no_grad():
        for _ in range(unet_repeats):
            begin = clock.mark()
            step_module(*unet_args, **unet_kwargs)
            unet_times.append(clock.seconds(begin, clock.mark()) * 1000.0)

    if not rates:  # one step: the loop rate is the inverse of the whole-call time
        rates = [1.0 / t for t in e2e]
    peak = torch.cuda.max_memory_allocated() / 2**30 if clock.cuda else None
    return RunResult(
        model=model,
        compiler=compiler,
        height=height,
        width=width,
        steps=steps,
        batch=batch,
        its=statistics.median(rates),
        its_min=min(rates),
        its_max=max(rates),
        unet_ms=statistics.median(unet_times),
        unet_ms_min=min(unet_times),
        unet_ms_max=max(unet_times),
        e2e_s=statistics.median(e2e),
        peak_mem_gib=peak,
        first_call_s=first_call_s,
        repeats=repeats,
        unet_repeats=unet_repeats,
        extra=extra,
    )
