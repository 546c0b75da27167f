"""Triton binaries compiled during a warm-up, kept with the compile-cache entry they belong to.

diffjet's kernels (`diffjet/kernels/`) run as opaque ops that Triton compiles in-process at their first
call, outside the precompiled function (`precompiled.py`), so a new process compiled them again at every
warm start: 13.5 s of the SD1.5 UNet's warm-up with the GroupNorm kernel
(bench/results/h100-2026-11-26-sd15-side-by-side.json).

So a runner warms up with Triton's cache pointed at a directory of its own (`scope`), seeded from the
entry (`restore`), and adds what Triton wrote there to the entry (`collect`), under `triton/` with the
entry's size and SHA-256 checks. Triton's group files (`__grp__*.json`) name their member files by
absolute path; they are stored relative and written back with the new directory's path. A file Triton
cannot use only makes it compile again.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path, PurePosixPath
from typing import Iterator

from .files import plain_name

try:
    import triton
except ImportError:  # CPU-only installs have no Triton cache to keep
    triton = None

PREFIX = "triton/"
_GROUP = "__grp__"
#: Triton's driver modules, built at a process's first Triton launch wherever that happens: not of an entry.
_DRIVER_MODULES = ("cuda_utils.", "hip_utils.")


def available() -> bool:
    """Whether this Triton lets the cache directory be changed for a while (`triton.knobs`, 3.4+)."""
    return triton is not None and hasattr(getattr(getattr(triton, "knobs", None), "cache", None), "scope")


@contextlib.contextmanager
def scope(directory: Path) -> Iterator[None]:
    """Within the block, Triton reads and writes compiled kernels in `directory`."""
    if not available():
        yield
        return
    with triton.knobs.cache.scope():
        triton.knobs.cache.dir = str(directory)
        yield


def restore(files: dict[str, bytes], directory: Path) -> set[str]:
    """Write the entry's Triton files into `directory`; the names written."""
    written = set()
    for name, data in files.items():
        relative = name[len(PREFIX):]
        if not name.startswith(PREFIX) or not plain_name(relative):
            continue
        path = directory.joinpath(*PurePosixPath(relative).parts)
        if path.name.startswith(_GROUP):
            data = _rebase_group(data, lambda child: _under(directory, child))
            if data is None:
                continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.add(name)
    return written


def collect(directory: Path, known: set[str] = frozenset()) -> dict[str, bytes]:
    """Triton's files in `directory` by entry name, group files made relative; those in `known` left out."""
    found = {}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if not path.is_file() or any(part.startswith("tmp.") for part in relative.parts):
            continue  # Triton's half-written files live in tmp.pid_* folders
        name = PREFIX + relative.as_posix()
        if name in known or path.name.startswith(_DRIVER_MODULES):
            continue
        data = path.read_bytes()
        if path.name.startswith(_GROUP):
            data = _rebase_group(data, lambda child: _inside(Path(child), directory))
            if data is None:
                continue
        found[name] = data
    return found


def _under(directory: Path, child: str) -> str | None:
    return str(directory.joinpath(*PurePosixPath(child).parts)) if plain_name(child) else None


def _inside(path: Path, directory: Path) -> str | None:
    try:
        return path.relative_to(directory).as_posix()
    except ValueError:
        return None


def _rebase_group(data: bytes, rebase) -> bytes | None:
    """A group file with each member's path passed through `rebase`; None if it is not one Triton wrote
    or a member cannot be rebased."""
    try:
        children = json.loads(data)["child_paths"]
        rebased = {str(key): rebase(str(value)) for key, value in children.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if any(value is None for value in rebased.values()):
        return None
    return json.dumps({"child_paths": rebased}).encode()
