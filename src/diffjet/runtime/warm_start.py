"""The warm-start store: where a CUDA-graph runner's function for each input signature comes from, and
what of its compile is kept for the next process.

Per signature, a runner asks the store for the function to warm up and capture (`signature`) and, once
the capture worked, tells it to keep what that took (`keep`). Behind that one interface:
- the compile cache's entry (`compile_cache.py`), preloaded into Inductor's caches;
- the precompiled function (`precompiled.py`): loaded from the entry, else compiled ahead of the warm-up;
- Inductor's autotuning choices (`autotune_choices.py`), written back before the function is loaded;
- Triton's binaries of diffjet's own kernels (`triton_cache.py`), compiled during the warm-up into a
  folder of this signature's own;
- the binaries other kernel compilers write during the warm-up (`kernel_folders`: FlashAttention-4's), the same way.

Each signature is recorded on its own (`CompileCache.recording`), so its entry holds only what its own
compile produced. Every step can fail without failing the call: an entry that does not load is deleted
(`CompileCache.discard`) and compiled again, a signature that cannot be precompiled falls back to the
runner's own function (that signature only), and a write that fails makes the cache read-only.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, ContextManager, Iterator

from . import autotune_choices, triton_cache
from .compile_cache import FUNCTION, CompileCache, Entry
from .files import plain_name
from .precompiled import Precompiler

logger = logging.getLogger(__name__)

# PyTorch's artifact recorder is one per process: one signature is compiled and recorded at a time.
_RECORDING = threading.RLock()


@dataclass
class Compiling:
    """One signature being warmed up and captured: the function to use, and what `keep` will store."""

    function: Callable[..., Any]
    keep: Callable[[], None] = lambda: None


@dataclass
class _Prepared:
    """What `WarmStartStore` found for a signature before its warm-up."""

    function: Callable[..., Any]
    entry: Entry | None  # the entry read (None: there was none, or it was broken)
    new_files: dict[str, bytes] = field(default_factory=dict)  # a function precompiled now
    inductor_artifacts: bool = True  # whether the function runs Inductor's cached code (an AOTI package does not)
    parts: dict[str, Any] | None = None  # the entry's parts where they are not the store's (another kind's)


@dataclass
class OtherKind:
    """Another `Config.precompile`'s entries of a runner: the parts they have, and what loads their function."""

    parts: dict[str, Any]
    precompile: Precompiler


class WarmStartStore:
    """The compile-cache entries of one runner: `parts` name what its compiled code depends on (the runner
    adds each signature), `precompile` compiles whole functions ahead of the warm-up (None: only
    Inductor's artifacts are kept), `about` describes the entries for `diffjet cache ls`. `elsewhere` maps
    each other `Config.precompile` to its entries: a signature without an entry of this store's kind loads
    one of theirs, since a cache filled with another setting (`diffjet compile --precompile aoti`, then a
    server without the flag) holds the same compiled step, and compiling it again would make a warm start
    a cold one. `kernel_folders` maps an entry prefix (``"flash_attn_4/"``) to a context manager that has a
    kernel compiler load and save its binaries in a given folder during the warm-up; the entry keeps them under
    that prefix."""

    def __init__(self, cache: CompileCache, parts: dict[str, Any], *, name: str,
                 precompile: Precompiler | None = None, about: dict[str, Any] | None = None,
                 elsewhere: dict[str, OtherKind] | None = None,
                 kernel_folders: dict[str, Callable[[Path], ContextManager]] | None = None) -> None:
        self.cache = cache
        self.parts = parts
        self.name = name
        self.precompile = precompile
        self.about = about or {}
        self.elsewhere = elsewhere or {}
        self.kernel_folders = kernel_folders or {}
        self._functions: dict[str, Callable[..., Any]] = {}  # loaded or precompiled, by signature

    @contextlib.contextmanager
    def signature(self, signature: str, description: str, fn: Callable[..., Any], args: tuple,
                  kwargs: dict) -> Iterator[Compiling]:
        """For the block (the warm-up and capture of `signature`, shown as `description`): the function to
        use, `fn` unless the cache has or can make better, and its `keep`."""
        if signature in self._functions:  # captured before, then evicted or invalidated: nothing is new
            yield Compiling(self._functions[signature])
            return
        parts = {**self.parts, "signature": signature}
        with _RECORDING, self.cache.recording(), \
                tempfile.TemporaryDirectory(prefix="diffjet-triton-", ignore_cleanup_errors=True) as folder:
            triton_folder = Path(folder) / "triton"
            triton_folder.mkdir()
            kernel_folders = {prefix: Path(folder) / f"kernels-{i}" for i, prefix in enumerate(self.kernel_folders)}
            inductor_folder = autotune_choices.directory()
            try:
                choices_before = autotune_choices.snapshot(inductor_folder)
                prepared = self._prepare(parts, description, fn, args, kwargs, inductor_folder)
                files = prepared.entry.files if prepared.entry else {}
                restored = triton_cache.restore(files, triton_folder)
                for prefix, directory in kernel_folders.items():
                    restored |= _restore_folder(files, prefix, directory)
            except Exception as exc:  # noqa: BLE001 - the cache is an optimisation; the call must go on
                logger.warning("%s: compile cache not used for [%s]: %s", self.name, description, exc)
                yield Compiling(fn)
                return

            def keep() -> None:
                try:
                    # Triton compiles diffjet's kernels at their first call, into this signature's folder;
                    # Inductor times its kernels' launch configurations at theirs.
                    compiled = triton_cache.collect(triton_folder, restored)
                    for prefix, directory in kernel_folders.items():
                        compiled.update(_collect_folder(directory, prefix, restored))
                    # An AOTInductor package was tuned as it was built: the choices are for Inductor's own code.
                    choices = {name: data for name, data in
                               autotune_choices.collect(inductor_folder, choices_before).items()
                               if name not in files} if prepared.inductor_artifacts else {}
                    self._keep(prepared.parts or parts, description, prepared,
                               {**prepared.new_files, **compiled, **choices})
                except Exception as exc:  # noqa: BLE001 - keeping is an optimisation; the call must go on
                    logger.warning("%s: could not keep [%s] in the compile cache: %s", self.name, description, exc)

            if prepared.function is not fn:
                self._functions[signature] = prepared.function
            # Within the block only: Triton's cache folder (and the other compilers') is this process's setting.
            with contextlib.ExitStack() as scopes:
                scopes.enter_context(triton_cache.scope(triton_folder))
                for prefix, directory in kernel_folders.items():
                    scopes.enter_context(self.kernel_folders[prefix](directory))
                yield Compiling(prepared.function, keep)

    def _prepare(self, parts: dict, description: str, fn: Callable[..., Any], args: tuple, kwargs: dict,
                 inductor_folder: Path | None) -> _Prepared:
        if not self.cache.has(parts):  # only then another kind's entry: a miss here would count
            loaded = self._load_other_kind(parts["signature"], description, inductor_folder)
            if loaded is not None:
                return loaded
        entry = self.cache.load_entry(parts)
        # Before any kernel of the function is loaded: Inductor reads a kernel's choice when it loads it.
        autotune_choices.restore(entry.files if entry else {}, inductor_folder)
        if self.precompile is None:
            return _Prepared(fn, entry)
        if entry is not None and FUNCTION in entry.files:
            loaded = self._load(parts, entry, self.precompile, description)
            if loaded is not None:
                return loaded
            entry = None
        start = time.perf_counter()
        try:
            function, data = self.precompile.compile(args, kwargs)
        except Exception as exc:  # noqa: BLE001 - a traced-and-saved function is an optimisation only
            logger.warning("%s: no precompiled function for [%s], compiling it in this process instead: %s",
                           self.name, description, exc)
            return _Prepared(fn, entry)
        logger.info("%s: precompiled [%s] in %.1f s", self.name, description, time.perf_counter() - start)
        return _Prepared(function, entry, {FUNCTION: data}, self.precompile.INDUCTOR_ARTIFACTS)

    def _load_other_kind(self, signature: str, description: str, inductor_folder: Path | None) -> _Prepared | None:
        """The function of another precompile kind's entry for `signature`, or None (none, or none loads)."""
        for kind, other in self.elsewhere.items():
            parts = {**other.parts, "signature": signature}
            if not self.cache.has(parts):
                continue
            entry = self.cache.load_entry(parts, require=FUNCTION)  # one whose precompile failed is of no use here
            if entry is None:
                continue
            autotune_choices.restore(entry.files, inductor_folder)
            loaded = self._load(parts, entry, other.precompile, description, f" (an entry of precompile={kind!r})")
            if loaded is not None:
                return loaded
        return None

    def _load(self, parts: dict, entry: Entry, precompile: Precompiler, description: str,
              note: str = "") -> _Prepared | None:
        """The entry's function, loaded; None where it does not load (the entry is deleted)."""
        start = time.perf_counter()
        try:
            function = precompile.load(entry.files[FUNCTION])
        except Exception as exc:  # noqa: BLE001 - whatever unpickling raises, the entry is at fault
            self.cache.discard(parts, entry, f"its precompiled function does not load ({exc})")
            return None
        logger.info("%s: loaded the precompiled function for [%s] in %.1f s%s", self.name, description,
                    time.perf_counter() - start, note)
        return _Prepared(function, entry, inductor_artifacts=precompile.INDUCTOR_ARTIFACTS, parts=parts)

    def _keep(self, parts: dict, description: str, prepared: _Prepared, new: dict[str, bytes]) -> None:
        entry = prepared.entry
        if entry is not None and not new:
            return
        files = {**(entry.files if entry else {}), **new}
        # An entry that is extended keeps its artifacts: nothing of its signature was compiled again. A function
        # that does not run Inductor's cached code needs none (b"": none are recorded into the entry).
        artifacts = entry.artifacts if entry is not None and entry.artifacts else None
        if not prepared.inductor_artifacts:
            artifacts = b""
        start = time.perf_counter()
        stored = self.cache.store(parts, files, artifacts=artifacts, replacing=entry,
                                  about={**self.about, "component": self.name, "signature": description})
        if stored is not None:
            logger.info("%s: stored [%s] (%d file(s)) in %.1f s", self.name, description, len(files) + 1,
                        time.perf_counter() - start)


def _restore_folder(files: dict[str, bytes], prefix: str, directory: Path) -> set[str]:
    """Write the entry's files under `prefix` into `directory`; the names written."""
    written = set()
    for name, data in files.items():
        relative = name[len(prefix):]
        if name.startswith(prefix) and plain_name(relative):
            path = directory.joinpath(*PurePosixPath(relative).parts)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            written.add(name)
    return written


def _collect_folder(directory: Path, prefix: str, known: set[str]) -> dict[str, bytes]:
    """The files in `directory` by entry name (under `prefix`), less those in `known`, lock files and hidden (half-
    written) ones."""
    found = {}
    for path in sorted(directory.rglob("*")) if directory.is_dir() else ():
        relative = path.relative_to(directory)
        name = prefix + relative.as_posix()
        if (path.is_file() and name not in known and path.suffix != ".lock"
                and not any(part.startswith(".") for part in relative.parts)):
            found[name] = path.read_bytes()
    return found
