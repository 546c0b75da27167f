"""Triton binaries compiled during a warm-up, kept with the compile-cache entry they belong to.

diffjet's kernels (`diffjet/kernels/`) run as opaque ops that Triton compiles in-process at their first
call, outside the precompiled function (`precompiled.py`), so a new process compiled them again at every
warm start: 13.5 s of the SD1.5 UNet's warm-up with the GroupNorm kernel
(bench/results/h100-2026-11-26-sd15-side-by-side.json).

So a runner warms up with Triton's cache pointed at a directory of its own (`scope`), seeded from the
entry (`restore`), and adds what Triton wrote there to the entry (`collect`), under `triton/` with the
entry's size and SHA-256 checks. Triton's group files (`__grp__*.json`) name their member files by
absolute path; they are stored relative and written back with the new directory's path. A file Triton
cannot use only makes it compile again. Triton's driver module, which it builds at its first use in a
process, is kept apart, in one entry per environment (`keep_driver`); Triton's hash of its own
installation is made on a thread while the pipeline is prepared (`hash_triton_in_background`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import threading
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .files import plain_name

if TYPE_CHECKING:
    from .compile_cache import CompileCache

try:
    import triton
except ImportError:  # CPU-only installs have no Triton cache to keep
    triton = None

logger = logging.getLogger(__name__)

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


def collect(directory: Path, known: set[str] = frozenset(), *, driver: bool = False) -> dict[str, bytes]:
    """Triton's files in `directory` by entry name, group files made relative; those in `known` left out,
    and Triton's driver modules unless `driver`."""
    found = {}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if not path.is_file() or any(part.startswith("tmp.") for part in relative.parts):
            continue  # Triton's half-written files live in tmp.pid_* folders
        name = PREFIX + relative.as_posix()
        if name in known or path.name.startswith(_DRIVER_MODULES) != driver:
            continue
        data = path.read_bytes()
        if path.name.startswith(_GROUP):
            data = _rebase_group(data, lambda child: _inside(Path(child), directory))
            if data is None:
                continue
        found[name] = data
    return found


def hash_triton_in_background() -> threading.Thread | None:
    """Have Triton hash its own installation on a thread, once per process; the thread (None: nothing to do).

    That hash (`triton_key`, part of every kernel's cache key) is made at a process's first kernel launch
    and reads all of Triton's compiler library: 0.42 s of an sd15 warm start's first image under the
    profiler, with the GPU idle. Reading and hashing let the GIL go, so it goes on beside the pipeline's
    preparation; Triton keeps the result (`lru_cache`) where its launches look for it.
    """
    global _hashing
    key = getattr(getattr(getattr(triton, "runtime", None), "cache", None), "triton_key", None)
    if _hashing is not None or not hasattr(key, "cache_info") or key.cache_info().currsize:
        return None
    _hashing = threading.Thread(target=_quietly, args=(key,), name="diffjet-triton-key", daemon=True)
    _hashing.start()
    return _hashing


_hashing: threading.Thread | None = None


def _quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - the first launch hashes again, and says what is wrong
        pass


def keep_driver(cache: "CompileCache", environment: dict[str, Any],
                build: Callable[[], Any] = lambda: triton.runtime.driver.active.utils) -> None:
    """Load Triton's driver module from `cache`'s entry for `environment`, or have Triton `build` it (with
    the C compiler, at its first use in a process) and keep it there.

    Every new machine built it again inside the first image (0.7 s of gcc on a 2-core machine), since
    Triton's own cache folder does not travel with diffjet's. A driver already loaded builds nothing.
    """
    if not available():
        return
    parts = {"component": "triton-driver", "environment": environment}
    entry = cache.load_entry(parts)
    with tempfile.TemporaryDirectory(prefix="diffjet-triton-", ignore_cleanup_errors=True) as folder:
        directory = Path(folder)
        try:
            restored = restore(entry.files if entry else {}, directory)
            with scope(directory):
                build()
            built = collect(directory, restored, driver=True)
        except Exception as exc:  # noqa: BLE001 - Triton builds it in its own folder at first use instead
            logger.warning("Triton's driver module not taken from the compile cache: %s", exc)
            if entry is not None:
                cache.discard(parts, entry, f"Triton's driver module does not load ({exc})")
            return
        if built:
            cache.store(parts, built, artifacts=b"", about={"component": "triton-driver", "model": "-",
                                                            "signature": f"triton {environment.get('triton')}"})


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
