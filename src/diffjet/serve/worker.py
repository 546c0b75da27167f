"""The GPU worker: the one thread of a serving process that owns the pipeline and runs its batches.

A diffusers pipeline keeps per-call state on shared objects: the scheduler's timesteps and step index
(diffusers#7851), the tokenizer's Rust state ("Already borrowed", diffusers#9362). A compiled pipeline
serializes its calls (compiler/calls.py), and here one thread is its only caller anyway, so swapping
`pipe.scheduler` or the merged LoRA set between two batches can never land inside another call.

A batch is one pipeline call with a list of prompts and one CPU `torch.Generator` per image, seeded
with that image's seed: diffusers draws each image's starting latents (and an ancestral scheduler's
noise) from its own generator, so an image is the one it would be alone with that seed, up to the
rounding of a batched matmul (the tests hold it to 1e-5 relative on the tiny preset, CPU float32).
CPU generators also make a seed give the same image on any device, as `diffjet generate` does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..lora import lora_scales
from .batcher import Batcher, BatchKey, Item
from .metrics import Metrics
from .settings import ServeSettings

logger = logging.getLogger(__name__)

#: Denoising steps of each warm-up call: enough to run every compiled part once.
WARM_UP_STEPS = 2
WARM_UP_GUIDANCE = 7.5  # guidance above 1: classifier-free guidance on, the UNet batch a request gets


@dataclass
class Image:
    """One generated image as float RGB in [0, 1], shape (height, width, 3), and how it was made."""

    pixels: np.ndarray
    seed: int
    batch_images: int
    queued_s: float
    run_s: float


class BatchFailed(Exception):
    """The pipeline call of a request's batch raised; the message is the error's first line."""


def load_served_pipeline(settings: ServeSettings) -> Any:
    """The pipeline as `diffjet serve` runs it: loaded on its device (on CUDA in its family's half
    precision: float16 for UNets, bfloat16 for DiTs), compiled with
    `settings.compiler` (and `settings.precompile`), progress bars off."""
    import torch

    from ..bench import recipes
    from ..models import half_precision, load_pipeline

    dtype = half_precision(settings.model) if settings.device.startswith("cuda") else torch.float32
    pipe = load_pipeline(settings.model, device=settings.device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    recipes.apply(pipe, settings.compiler, precompile=settings.precompile)
    return pipe


class PipelineWorker:
    """Loads (through `load`), warms every served size at every batch size, then runs batches until the
    batcher is closed and empty. `ready` is set once warm; `failure` holds what stopped it from getting there."""

    def __init__(self, settings: ServeSettings, batcher: Batcher, metrics: Metrics,
                 load: Callable[[ServeSettings], Any] = load_served_pipeline,
                 on_failure: Callable[[BaseException], None] | None = None):
        self.settings, self.batcher, self.metrics = settings, batcher, metrics
        self.loras = settings.loras  # read once: the names requests may use for the life of the process
        self._load, self._on_failure = load, on_failure
        self.ready = threading.Event()
        self.failure: BaseException | None = None
        self.pipe: Any = None
        self._thread = threading.Thread(target=self._run, name="diffjet-pipeline-worker", daemon=True)
        self._scheduler = "default"
        self._default_scheduler: Any = None
        self._loras: tuple[tuple[str, float], ...] = ()  # the merged set, sorted (name, scale)

    def start(self) -> PipelineWorker:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Finish every queued image, then end the thread."""
        self.batcher.close()
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self.pipe = self._load(self.settings)
            self._default_scheduler = self.pipe.scheduler
            self._loras = tuple(sorted(lora_scales(self.pipe).items()))
            if self.settings.warm_up:
                self._warm_up()
        except BaseException as error:  # noqa: BLE001 - reported through /healthz and on_failure
            logger.error("the pipeline could not be loaded or warmed: %s", error, exc_info=True)
            self.failure = error
            self.batcher.close()
            while (batch := self.batcher.next_batch()) is not None:
                for item in batch:
                    item.job.fail(error)
            if self._on_failure is not None:
                self._on_failure(error)
            return
        self.ready.set()
        while (batch := self.batcher.next_batch(self._loras)) is not None:
            self._run_batch(batch)
        # The pipeline goes back as it came: its own scheduler, no LoRA merged.
        self._set_scheduler("default")
        self._switch_loras(())

    def _warm_up(self) -> None:
        """Each served size at each batch size the batcher forms (each is a shape a request can meet, and
        its first call compiles and captures), then each LoRA of `--lora-dir` loaded and unloaded once, so
        that one that does not fit the model fails now."""
        for width, height in self.settings.sizes:
            for batch in self.settings.warm_batches:
                start = time.perf_counter()
                key = BatchKey(width, height, WARM_UP_STEPS, WARM_UP_GUIDANCE, "default", False)
                self._call(key, ["warm-up"] * batch, None, list(range(batch)))
                logger.info("warm: %dx%d, batch %d (%.1f s)", width, height, batch, time.perf_counter() - start)
        from ..errors import LoraError

        for name in self.loras:
            try:
                self._switch_loras(((name, 1.0),))
            except LoraError as error:
                raise LoraError(f"--lora-dir: {name}.safetensors does not fit {self.settings.model_name}: {error}") from error
        self._switch_loras(())

    def _run_batch(self, batch: list[Item]) -> None:
        batch = [item for item in batch if not item.job.cancelled]
        if not batch:
            return
        key = batch[0].key
        start = time.monotonic()
        for item in batch:
            self.metrics.queue_seconds.observe(start - item.enqueued)
        try:
            self._switch_loras(key.loras)
            # A batch size that was not warmed runs as the next one that was, the last image repeated (and
            # its copies thrown away): a wasted slot costs less than a compile in the middle of serving.
            size = min(b for b in self.settings.warm_batches if b >= len(batch))
            padded = batch + batch[-1:] * (size - len(batch))
            negative = [i.negative_prompt for i in padded] if key.negative_prompt else None
            images = self._call(key, [i.prompt for i in padded], negative, [i.seed for i in padded])
        except Exception as error:  # noqa: BLE001 - the batch's requests get it; the worker goes on
            logger.error("batch of %d (%s) failed: %s", len(batch), key, error, exc_info=True)
            self.metrics.errors.inc()
            failure = BatchFailed(f"the pipeline failed: {(str(error).strip().splitlines() or [type(error).__name__])[0]}")
            for item in batch:
                item.job.fail(failure)
            return
        seconds = time.monotonic() - start
        self.batcher.images_per_second = len(batch) / seconds if seconds > 0 else 0.0
        self.metrics.batch_images.observe(len(batch))
        self.metrics.batch_seconds.observe(seconds)
        self.metrics.record_memory(self.settings.device)
        for item, pixels in zip(batch, images):
            item.job.deliver(item.index, Image(pixels, item.seed, len(batch), start - item.enqueued, seconds))

    def _call(self, key: BatchKey, prompts: list[str], negative: list[str] | None, seeds: list[int]) -> np.ndarray:
        """One pipeline call: the images as a float array (batch, height, width, 3)."""
        import torch

        from ..models import control_inputs

        self._set_scheduler(key.scheduler)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        output = self.pipe(
            prompt=prompts,
            negative_prompt=negative,
            num_inference_steps=key.steps,
            **({} if key.guidance is None else {"guidance_scale": key.guidance}),
            height=key.height,
            width=key.width,
            generator=generators,
            output_type="np",
            **control_inputs(self.pipe, key.height, key.width),
        )
        return output.images

    def _set_scheduler(self, name: str) -> None:
        if name != self._scheduler:
            from ..bench import recipes

            self.pipe.scheduler = self._default_scheduler
            recipes.set_scheduler(self.pipe, name)
            self._scheduler = name

    def _switch_loras(self, wanted: tuple[tuple[str, float], ...]) -> None:
        """Make the merged adapters `wanted` (by name from `--lora-dir`, at those scales), changing only
        what differs: rescale the kept ones, load the new ones in place of the ones not wanted (or unload
        those)."""
        if wanted == self._loras:
            return
        import diffjet

        merged, target = lora_scales(self.pipe), dict(wanted)
        unwanted = [name for name in merged if name not in target]
        new = [(name, scale) for name, scale in target.items() if name not in merged]
        try:
            if not new:
                for name in unwanted:
                    diffjet.unload_lora(self.pipe, name)
            rescaled = {name: scale for name, scale in target.items() if name in merged and merged[name] != scale}
            if rescaled:
                diffjet.set_lora_scales(self.pipe, rescaled)
            for i, (name, scale) in enumerate(new):  # the first takes the unwanted ones' place in one step
                diffjet.load_lora(self.pipe, str(self.loras[name]), scale=scale, adapter_name=name,
                                  base_copy=self.settings.lora_base_copy, replacing=unwanted if i == 0 else ())
        finally:  # what is merged now, also after a failed switch
            self._loras = tuple(sorted(lora_scales(self.pipe).items()))
        self.metrics.lora_switches.inc()
