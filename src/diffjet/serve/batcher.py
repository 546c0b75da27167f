"""The request queue and how it is cut into batches; plain Python, no torch.

A request for n images becomes n `Item`s of one `Job`. Items that share a `BatchKey` (size, steps,
guidance, scheduler, LoRA set) can run as one pipeline call. The worker asks `next_batch` for work: the
batch is formed around the oldest waiting item's key, closes when it holds `max_batch` images or when
that item has waited `max_wait_s`, whichever comes first; an item that waited while the worker was busy
is past its window, so its batch leaves at once with what has gathered.

LoRA switches cost a merge (51.5 ms for a full rank-16 LoRA on sd15, H100, docs/lora.md), so while
images for the LoRA set already merged are waiting they go first, unless the oldest image has waited
`LORA_PATIENCE_S` longer than its window: no image waits for ever behind another adapter set.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

#: How much longer than its batch window an image may wait while others run with the merged LoRA set.
LORA_PATIENCE_S = 0.5


@dataclass(frozen=True)
class BatchKey:
    """The settings images must share to run in one pipeline call."""

    width: int
    height: int
    steps: int
    guidance: float | None  # None: the pipeline's own default
    scheduler: str
    # Whether the images have negative prompts: SDXL encodes a missing one as zeros and an empty one as
    # the text "", so the two never share a call.
    negative_prompt: bool = False
    loras: tuple[tuple[str, float], ...] = ()  # sorted (name, scale) pairs


@dataclass(eq=False)
class Job:
    """One request: its images, and the future that gets them (a list of `Image`s, in order)."""

    images: int
    future: Future = field(default_factory=Future)
    results: list[Any] = field(default_factory=list)
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.results = [None] * self.images
        self._left = self.images
        self._lock = threading.Lock()

    def deliver(self, index: int, result: Any) -> None:
        """Called by the worker for each image; the future resolves when the last one arrives."""
        with self._lock:
            self.results[index] = result
            self._left -= 1
            done = self._left == 0
        if done:
            with contextlib.suppress(InvalidStateError):  # a request that timed out may have cancelled it
                self.future.set_result(self.results)

    def fail(self, error: BaseException) -> None:
        with contextlib.suppress(InvalidStateError):
            self.future.set_exception(error)


@dataclass(eq=False)
class Item:
    """One image to make: the prompt and seed it alone decides, the key it shares with its batch."""

    key: BatchKey
    prompt: str
    negative_prompt: str
    seed: int
    job: Job
    index: int  # its place in the job's results
    enqueued: float = 0.0  # time.monotonic() when queued


class QueueFull(Exception):
    """The queue cannot take a request's images; `retry_after` is the seconds to wait before trying again."""

    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class Batcher:
    """A queue of items, at most `capacity` waiting, cut into batches of at most `max_batch`; thread-safe."""

    def __init__(self, max_batch: int, max_wait_s: float, capacity: int):
        self.max_batch, self.max_wait_s, self.capacity = max_batch, max_wait_s, capacity
        self._items: list[Item] = []  # in arrival order
        self._closed = False
        self._changed = threading.Condition()
        self.images_per_second = 0.0  # the worker's last rate, for Retry-After

    @property
    def waiting(self) -> int:
        with self._changed:
            return len(self._items)

    def submit(self, items: list[Item]) -> None:
        """Queue a job's items, all or none; raises `QueueFull` (or `RuntimeError` once closed)."""
        with self._changed:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            if len(self._items) + len(items) > self.capacity:
                rate = self.images_per_second
                raise QueueFull(max(1, math.ceil(len(self._items) / rate)) if rate > 0 else 1)
            now = time.monotonic()
            for item in items:
                item.enqueued = now
            self._items.extend(items)
            self._changed.notify_all()

    def cancel(self, job: Job) -> int:
        """Drop a job's waiting items (its client left or timed out); returns how many were dropped."""
        with self._changed:
            job.cancelled = True
            kept = [i for i in self._items if i.job is not job]
            dropped = len(self._items) - len(kept)
            self._items = kept
            self._changed.notify_all()
            return dropped

    def close(self) -> None:
        """Take no more items; `next_batch` returns what is queued without waiting, then None."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def next_batch(self, merged_loras: tuple[tuple[str, float], ...] = ()) -> list[Item] | None:
        """Block until a batch is due and return it (same key, oldest first); None when closed and empty."""
        with self._changed:
            while True:
                while not self._items:
                    if self._closed:
                        return None
                    self._changed.wait()
                key, oldest = self._pick(merged_loras)
                deadline = oldest.enqueued + self.max_wait_s
                batch = self._gather(key)
                now = time.monotonic()
                if len(batch) >= self.max_batch or self._closed or now >= deadline:
                    taken = set(map(id, batch))
                    self._items = [i for i in self._items if id(i) not in taken]
                    return batch
                self._changed.wait(deadline - now)

    def _pick(self, merged_loras: tuple) -> tuple[BatchKey, Item]:
        """The key of the next batch and the item whose window decides when it leaves."""
        oldest = self._items[0]
        if oldest.key.loras != merged_loras and time.monotonic() - oldest.enqueued < self.max_wait_s + LORA_PATIENCE_S:
            same_loras = next((i for i in self._items if i.key.loras == merged_loras), None)
            if same_loras is not None:
                return same_loras.key, same_loras
        return oldest.key, oldest

    def _gather(self, key: BatchKey) -> list[Item]:
        return [i for i in self._items if i.key == key][: self.max_batch]
