"""Pipeline calls one at a time, with diffjet's per-call hooks around each.

A diffusers pipeline keeps per-call state on shared objects (the scheduler's timesteps and step index,
the step cache's features), and diffjet's CUDA graphs read and write static buffers: two threads calling
one pipeline at once would interleave both and get wrong images without an error. So a compiled
pipeline's `__call__` takes a per-pipeline lock (re-entrant: a step callback may call it or
`diffjet.load_lora`), and concurrent callers are served one after another.

Python looks special methods up on the class, so the pipeline object gets a subclass of its own class
that only adds this `__call__` (same name, module and behaviour otherwise); diffusers' classes and other
pipeline objects are left alone.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

LOCK = "_diffjet_lock"
HOOKS = "_diffjet_call_hooks"  # objects with begin(pipeline) and end(), run around every call

_SUBCLASSES: dict[type, type] = {}
_SUBCLASSES_LOCK = threading.Lock()


def serialize(pipe: Any) -> None:
    """Make `pipe`'s calls take its lock and run its hooks; idempotent."""
    if LOCK not in pipe.__dict__:
        pipe.__dict__[LOCK] = threading.RLock()
        pipe.__dict__[HOOKS] = []
    if not getattr(type(pipe), "_diffjet_serialized", False):
        pipe.__class__ = _serialized(type(pipe))


def lock(pipe: Any) -> Any:
    """`pipe`'s call lock, to hold while changing what its calls read (a plain pipeline has none: then a
    no-op context)."""
    found = getattr(pipe, "__dict__", {}).get(LOCK)
    return found if found is not None else contextlib.nullcontext()


def add_hook(pipe: Any, hook: Any) -> None:
    hooks = pipe.__dict__[HOOKS]
    if hook not in hooks:
        hooks.append(hook)


def _serialized(cls: type) -> type:
    with _SUBCLASSES_LOCK:
        if cls not in _SUBCLASSES:

            def __call__(self, *args: Any, **kwargs: Any) -> Any:
                with self.__dict__[LOCK]:
                    hooks = list(self.__dict__[HOOKS])
                    for hook in hooks:
                        hook.begin(self)
                    try:
                        return super(subclass, self).__call__(*args, **kwargs)
                    finally:
                        for hook in hooks:
                            hook.end()

            subclass = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                                   "__qualname__": cls.__qualname__, "__doc__": cls.__doc__,
                                                   "_diffjet_serialized": True})
            _SUBCLASSES[cls] = subclass
        return _SUBCLASSES[cls]
