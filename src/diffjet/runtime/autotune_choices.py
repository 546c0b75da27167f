"""Inductor's autotuning choices for a compiled function's kernels, kept with its compile-cache entry.

Inductor times several launch configurations of many of its kernels at their first call and keeps the
winner next to the kernel's source in its cache folder (`<inductor cache>/<xx>/<key>.best_config`). A
precompiled function (`precompiled.py`) carries neither, so a new process without those files (a new
machine or container, a cleaned /tmp) timed every such kernel again: 139 kernels and 8.9 s of the SDXL
warm start on the H100 (bench/results/h100-2026-11-27-sdxl-kernels.json).

So the runner notes which choices exist before it loads and warms up a function (`snapshot`), adds the
ones the warm-up wrote to the entry (`collect`, under `inductor/` with the entry's size and SHA-256
checks), and writes the entry's choices into this process's own Inductor cache folder before the next
process loads the function (`restore`), never to a path an entry names: the cache must not let an entry
write files elsewhere. A loaded function's kernels look for their choices by absolute path, in the
compiling process's folder (bench/results/autotune-choices-diagnosis-h100-2026-11-27.txt), so only a
process whose Inductor folder has that path (same user and `TORCHINDUCTOR_CACHE_DIR`) finds them; the
entry records that folder (`ROOT`) so that `restore` can say which case it is. A choice's file name is
Inductor's key for it (kernel source hash and torch build), so a choice only ever applies to the kernel it
was measured for. Only plain choice files are written, none that exists is replaced, and choices an
earlier process on the same machine wrote are not new and stay out of the entry.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path, PurePosixPath

from .files import plain_name, write_atomically

logger = logging.getLogger(__name__)
_told: set[tuple[str, str]] = set()  # (recorded, own) folder pairs already logged

PREFIX = "inductor/"
SUFFIX = ".best_config"
ROOT = PREFIX + "ROOT"  # the compiling process's Inductor cache folder, as an absolute path (never written to)


def directory() -> Path | None:
    """Inductor's cache directory in this process (where it reads and writes choices); None without one."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:
        return None
    return Path(cache_dir())


def snapshot(root: Path | None) -> set[str]:
    """Entry names of the choices under `root` now."""
    if root is None or not root.is_dir():
        return set()
    return {PREFIX + path.relative_to(root).as_posix() for path in root.glob(f"*/*{SUFFIX}") if path.is_file()}


def restore(files: dict[str, bytes], root: Path | None) -> set[str]:
    """Write the entry's choices into `root` (this process's Inductor cache) unless a choice is there;
    the entry names written."""
    if root is None:
        return set()
    _tell_if_elsewhere(files, root)
    written: set[str] = set()
    for name, data in files.items():
        path = _path(name, root)
        if path is None or path.exists():
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Atomic: a process starting beside this one reads a whole file or none.
            write_atomically(path, lambda handle, data=data: handle.write(data))
        except OSError:  # a folder this process may not write: Inductor times those kernels again
            continue
        written.add(name)
    return written


def collect(root: Path | None, before: set[str]) -> dict[str, bytes]:
    """Choices under `root` whose entry names are not in `before`, by entry name, and `root` itself (as
    `ROOT`) when there are any."""
    found = {}
    for name in sorted(snapshot(root) - before):
        try:
            found[name] = _path(name, root).read_bytes()
        except OSError:  # removed by another process meanwhile: it is only a choice
            continue
    if found:
        found[ROOT] = os.path.abspath(root).encode()  # as Inductor spells the kernels' paths
    return found


def _tell_if_elsewhere(files: dict[str, bytes], root: Path) -> None:
    try:
        recorded = files[ROOT].decode()
    except (KeyError, UnicodeDecodeError):
        return
    own = os.path.abspath(root)
    if recorded != own and (recorded, own) not in _told:
        _told.add((recorded, own))
        logger.info("compile-cache entries were compiled with Inductor's cache in %s, this process's is %s: "
                    "Inductor may time the launch configurations of their kernels again (the same "
                    "TORCHINDUCTOR_CACHE_DIR on both avoids it)", recorded, own)


def _path(name: str, root: Path) -> Path | None:
    """Where the entry's file `name` belongs under `root`; None unless it is a choice file one folder down."""
    if not name.startswith(PREFIX) or not name.endswith(SUFFIX):
        return None
    relative = name[len(PREFIX):]
    parts = PurePosixPath(relative).parts
    if len(parts) != 2 or not plain_name(relative):
        return None
    return root.joinpath(*parts)
