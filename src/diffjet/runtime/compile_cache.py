"""A persistent compile cache: what Inductor built for one component and input shape, kept on disk.

Compiling the SD1.5 UNet cold takes about a minute (bench/results). PyTorch can serialise what a process
compiled (Inductor's FX-graph and AOTAutograd caches, Triton kernels, autotuning choices) with
`torch.compiler.save_cache_artifacts()`, and preload it into a new process with `load_cache_artifacts()`,
after which Dynamo still traces but nothing is compiled again. Dynamo's tracing is skipped too where an
entry also holds a precompiled function (`precompiled.py`). `warm_start.py` decides what goes in.

`CompileCache` stores those bytes per entry, under a key that names everything the compiled code depends
on: the module's architecture (class and public config), its weights' names, shapes, dtypes and layouts,
the input signature, the passes applied, the torch/triton/diffusers/diffjet versions and the GPU's
architecture. An entry is a folder holding `artifacts.bin`, any further files (`function.bin`, Triton's
binaries under `triton/`, Inductor's choices under `inductor/`) and `meta.json` (its key parts, a
description, and each file's size and SHA-256). Each entry holds only what its own signature's compile
produced (`recording`): PyTorch's recorder otherwise returns everything since the process started, and
the fourth of four sd15 shapes stored all four.

The cache is code, so (docs/compile-cache.md):
- its folder is created readable by this user only, and one that another user owns or can write (or
  that sits in such a folder) is refused (`CacheError`), never read;
- with a signing key (`DIFFJET_CACHE_KEY` names a key file outside the cache), every entry carries an
  HMAC-SHA256 of its `meta.json` (`meta.sig`), which lists every file's SHA-256; it is checked before
  anything of the entry is unpickled, and an unsigned or badly signed entry is never loaded;
- the size and SHA-256 checks catch corruption (a truncated write, a flipped bit), not tampering.
A broken entry is deleted and rebuilt, except in a read-only cache, where it is only skipped.

Writes are atomic: an entry is written into a staging folder beside its final place and renamed; when
two processes fill the same entry at once, one rename wins. An entry is only ever replaced or deleted
after checking that it is still the one this process read (its `meta.json` bytes), so a process never
removes what another has just written. Staging folders left by killed processes are swept after an hour.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from ..errors import CacheError
from .files import folder_problem, make_private_folder, plain_name, private_problem

logger = logging.getLogger(__name__)

ARTIFACTS = "artifacts.bin"
FUNCTION = "function.bin"
META = "meta.json"
SIGNATURE = "meta.sig"
KEY_VARIABLE = "DIFFJET_CACHE_KEY"
STALE_AFTER_S = 3600  # a staging folder this old belongs to a process that died while writing


def default_cache_dir() -> Path:
    """`$DIFFJET_CACHE_DIR/compile`, else `~/.cache/diffjet/compile`."""
    root = os.environ.get("DIFFJET_CACHE_DIR") or Path.home() / ".cache" / "diffjet"
    return Path(root) / "compile"


def _canonical(value: Any) -> Any:
    """`value` as JSON data in one order whatever the process: mappings by key, sets sorted."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda item: str(item[0]))}
    if isinstance(value, (set, frozenset)):
        return sorted((_canonical(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def module_key(module: nn.Module) -> dict[str, Any]:
    """Architecture and weights layout of `module` (not the weight values: compiled code reads them).

    diffusers' private config keys are left out: `_use_default_values` lists the arguments a
    `config.json` leaves out in the order of a set, which changes with each process's hash seed (the
    published SD1.5 UNet config leaves some out), and `_name_or_path` is where the files were loaded from.
    """
    config = getattr(module, "config", None)
    config_dict = dict(config) if isinstance(config, Mapping) else getattr(config, "to_dict", lambda: {})()
    public = {k: v for k, v in config_dict.items() if not str(k).startswith("_")}
    layout = hashlib.sha256()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        layout.update(f"{name}:{tuple(tensor.shape)}:{tuple(tensor.stride())}:{tensor.dtype};".encode())
    return {
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        "config": json.dumps(_canonical(public), sort_keys=True),
        "weights_layout": layout.hexdigest(),
    }


def entry_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(_canonical(parts), sort_keys=True).encode()).hexdigest()


def signing_key(cache_dir: Path) -> bytes | None:
    """The key in the file `$DIFFJET_CACHE_KEY` names, or None when it names none.

    Raises `CacheError` when the file is inside the cache (whoever can write the cache could then
    forge signatures), readable or writable by other users, or shorter than 16 bytes.
    """
    name = os.environ.get(KEY_VARIABLE)
    if not name:
        return None
    path = Path(name).expanduser()
    try:
        inside = Path(os.path.realpath(path)).is_relative_to(os.path.realpath(cache_dir))
        info = path.stat()
        key = path.read_bytes()
    except OSError as exc:
        raise CacheError(f"{KEY_VARIABLE}={name}: cannot read the key file ({exc.strerror}); "
                         "point it at a file this user can read") from None
    if inside:
        raise CacheError(f"{KEY_VARIABLE}={name} is inside the cache folder {cache_dir}; keep the key elsewhere")
    if hasattr(os, "getuid") and (info.st_uid not in (os.getuid(), 0) or info.st_mode & 0o077):
        raise CacheError(f"{KEY_VARIABLE}={name}: other users can read or write the key file (or own it); "
                         f"chmod 600 it")
    if len(key) < 16:
        raise CacheError(f"{KEY_VARIABLE}={name}: the key has {len(key)} bytes; use at least 16 random bytes")
    return key


def open_cache(directory: str | os.PathLike | None = None, *, read_only: bool = False) -> "CompileCache":
    """The compile cache in `directory` (default `default_cache_dir()`), signed when `$DIFFJET_CACHE_KEY`
    names a key; raises `CacheError` when the folder or the key cannot be trusted."""
    folder = Path(directory) if directory is not None else default_cache_dir()
    return CompileCache(folder, read_only=read_only, key=signing_key(folder))


def _fresh_artifacts() -> ContextManager:
    """PyTorch's artifact recorder emptied for the block and put back afterwards; where this torch cannot
    put it back, emptied (what the process recorded before is then gone from its own recorder)."""
    from torch.compiler._cache import CacheArtifactManager

    fresh = getattr(CacheArtifactManager, "with_fresh_cache", None)
    if fresh is not None:
        return fresh()
    CacheArtifactManager.clear()
    return contextlib.nullcontext()


def _meta_of(folder: Path) -> bytes | None:
    try:
        return (folder / META).read_bytes()
    except OSError:
        return None


def _sign(key: bytes, meta: bytes) -> str:
    return hmac.new(key, meta, hashlib.sha256).hexdigest()


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    stored: int = 0
    rejected: int = 0  # entries found broken (deleted and rebuilt, unless the cache is read-only)


@dataclass
class Entry:
    """An entry as read and checked: its artifacts, its further files by name, and its `meta.json` bytes
    (what a replace compares with the entry it is about to remove)."""

    artifacts: bytes
    files: dict[str, bytes]
    meta: bytes


@dataclass
class EntryInfo:
    """An entry as `diffjet cache ls` shows it, from its `meta.json` alone (nothing else is read)."""

    path: Path
    bytes: int
    last_used: float  # when a process last loaded it (or wrote it), seconds since the epoch; 0: unreadable
    about: dict[str, Any] = field(default_factory=dict)
    meta: bytes | None = None  # as read (None: missing)
    readable: bool = True  # False: its meta.json is missing or is not an entry's


class CompileCache:
    """Entries of compiled artifacts in `directory`, keyed by `entry_key(parts)`.

    Raises `CacheError` if the folder cannot be trusted (see the module's docstring); creates it, private
    to this user, if it is missing. `read_only` (or a folder this process cannot write) loads entries
    but stores and deletes nothing. With a `key`, entries are signed and only signed entries are loaded.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        read_only: bool = False,
        key: bytes | None = None,
        save_artifacts: Callable[[], Any] = torch.compiler.save_cache_artifacts,
        load_artifacts: Callable[[bytes], Any] = torch.compiler.load_cache_artifacts,
        fresh_artifacts: Callable[[], ContextManager] = _fresh_artifacts,
    ) -> None:
        self.directory = Path(directory)
        self.key = key
        self._save, self._load, self._fresh = save_artifacts, load_artifacts, fresh_artifacts
        self.stats = CacheStats()
        self.read_only_reason = "read-only as configured" if read_only else None
        self._swept = self._said_not_kept = False
        if not self.directory.exists():
            if read_only:
                raise CacheError(f"compile cache {self.directory} does not exist (it is to be read only)")
            try:
                make_private_folder(self.directory)
            except OSError as exc:
                raise CacheError(f"cannot create compile cache {self.directory} ({exc.strerror}); "
                                 "set Config(cache_dir=...) or DIFFJET_CACHE_DIR to a folder you own") from None
        problem = folder_problem(self.directory)
        if problem is not None:
            raise CacheError(f"compile cache {self.directory} is not safe to load code from: {problem}")
        if not read_only and not os.access(self.directory, os.W_OK):
            self.read_only_reason = "read-only (the folder is not writable)"

    @property
    def writable(self) -> bool:
        return self.read_only_reason is None

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / key

    def recording(self) -> ContextManager:
        """Within the block, `store` saves only what was compiled in it (not everything since the start)."""
        return self._fresh()

    # -- reading ----------------------------------------------------------------------------------
    def load(self, parts: dict[str, Any]) -> bool:
        """Preload the entry for `parts` into this process's compiler caches; False on a miss."""
        return self.load_entry(parts) is not None

    def has(self, parts: dict[str, Any]) -> bool:
        """Whether an entry for `parts` is there (not read, checked or counted: `load_entry` does that)."""
        return self.path(entry_key(parts)).exists()

    def load_entry(self, parts: dict[str, Any], *, require: str | None = None) -> Entry | None:
        """Check the entry for `parts`, preload its artifacts and return it; None on a miss or a broken one.
        With `require`, an entry without that file is passed over: None, its artifacts not loaded, the entry
        left as it is and nothing counted (the caller looks for that file elsewhere, and counts there)."""
        key = entry_key(parts)
        folder = self.path(key)
        if not folder.exists():
            self.stats.misses += 1
            return None
        problem, entry, meta = self._read(folder, key)
        if problem is None and require is not None and require not in entry.files:
            return None
        if problem is None:
            try:
                if entry.artifacts:
                    self._load(entry.artifacts)
            except Exception as exc:  # noqa: BLE001 - whatever breaks in unpickling, the entry is at fault
                problem = f"its artifacts do not load ({exc.__class__.__name__}: {exc})"
        if problem is not None:
            self._reject(folder, meta, problem)
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        if self.writable:
            with contextlib.suppress(OSError):
                os.utime(folder / META)  # last use, for `prune`
        return entry

    def discard(self, parts: dict[str, Any], entry: Entry, problem: str) -> None:
        """Reject `entry` (read from this cache for `parts`) because of `problem`: delete it unless the cache
        is read-only or another process has replaced it meanwhile."""
        self._reject(self.path(entry_key(parts)), entry.meta, problem)

    def _reject(self, folder: Path, meta: bytes | None, problem: str) -> None:
        self.stats.rejected += 1
        if not self.writable:
            logger.warning("diffjet compile cache: %s; skipping %s (the cache is read-only)", problem, folder)
            return
        logger.warning("diffjet compile cache: %s; rebuilding %s", problem, folder)
        removed = self._take_out(folder, meta)
        if removed is not None:
            shutil.rmtree(removed.parent, ignore_errors=True)

    def _read(self, folder: Path, key: str) -> tuple[str | None, Entry | None, bytes | None]:
        """(what is wrong with the entry or None, the entry once checked, its `meta.json` bytes as read)."""
        problem = private_problem(folder) or private_problem(folder.parent)
        if problem is not None:
            return f"entry not safe to load: {problem}", None, None
        meta_bytes = _meta_of(folder)
        if meta_bytes is None:
            return "entry has no meta.json", None, None
        if self.key is not None:
            try:
                signature = (folder / SIGNATURE).read_text().strip()
            except (OSError, UnicodeDecodeError):
                return "entry is not signed (a signing key is set)", None, meta_bytes
            if not hmac.compare_digest(signature, _sign(self.key, meta_bytes)):
                return "entry's signature does not match (another key, or altered)", None, meta_bytes
        try:
            meta = json.loads(meta_bytes)
            expected = {name: (int(f["size"]), str(f["sha256"])) for name, f in meta["files"].items()}
            if any(not plain_name(name) for name in expected):
                return "entry names a file outside its folder", None, meta_bytes
            if meta.get("key") != key:
                return "entry belongs to another key", None, meta_bytes
            if ARTIFACTS not in expected:
                return "entry has no artifacts", None, meta_bytes
            files = {name: (folder / name).read_bytes() for name in expected}
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
            return f"unreadable entry ({exc.__class__.__name__})", None, meta_bytes
        for name, data in files.items():
            size, digest = expected[name]
            if len(data) != size:
                return f"truncated entry ({name}: {len(data)} of {size} bytes)", None, meta_bytes
            if hashlib.sha256(data).hexdigest() != digest:
                return f"entry's hash does not match its contents ({name})", None, meta_bytes
        return None, Entry(files.pop(ARTIFACTS), files, meta_bytes), meta_bytes

    # -- writing ----------------------------------------------------------------------------------
    def store(
        self,
        parts: dict[str, Any],
        files: dict[str, bytes] | None = None,
        *,
        artifacts: bytes | None = None,
        replacing: Entry | None = None,
        about: dict[str, Any] | None = None,
    ) -> Path | None:
        """Write the entry for `parts`: `artifacts` (default: what was compiled since `recording` began)
        and further `files`; `about` describes it for `diffjet cache ls`. An entry there already is kept,
        unless it is `replacing` (the entry this process read and extends). None if nothing is written.

        A write that fails (disk full, folder gone read-only) makes the cache read-only for this process,
        with one warning: a cache is an optimisation, and a new shape must run all the same.
        """
        if not self.writable:
            self._say_not_kept()
            return None
        if artifacts is None:
            saved = self._save()
            artifacts = (saved[0] if isinstance(saved, tuple) else saved) if saved else b""
        if not artifacts and not files:
            return None
        data = {ARTIFACTS: artifacts, **(files or {})}
        if any(not plain_name(name) for name in data):
            raise ValueError(f"entry file names must be relative paths without '..': {sorted(data)}")
        try:
            return self._write(entry_key(parts), parts, data, replacing, about or {})
        except OSError as exc:
            self.read_only_reason = f"read-only since writing failed ({exc.strerror or exc})"
            self._say_not_kept()
            return None

    def _say_not_kept(self) -> None:
        if not self._said_not_kept:
            self._said_not_kept = True
            logger.warning("diffjet compile cache %s is %s: shapes that are not in it compile in this process "
                           "and are not kept", self.directory, self.read_only_reason)

    def _write(self, key: str, parts: dict, data: dict[str, bytes], replacing: Entry | None, about: dict) -> Path | None:
        final = self.path(key)
        make_private_folder(final.parent)
        if not self._swept:
            self.sweep()
        staging = Path(tempfile.mkdtemp(prefix=f".{key[:12]}.", dir=final.parent))
        try:
            for name, blob in data.items():
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                (staging / name).write_bytes(blob)
            meta = json.dumps({"key": key, "parts": parts, "about": about,
                               "files": {name: {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
                                         for name, blob in data.items()}},
                              indent=1, sort_keys=True, default=str).encode()
            (staging / META).write_bytes(meta)
            if self.key is not None:
                (staging / SIGNATURE).write_text(_sign(self.key, meta))
            try:
                os.rename(staging, final)
            except OSError:
                if not final.exists():
                    raise
                # Another process stored this entry first: its copy is as good, unless this one extends it.
                if replacing is None or not self._swap(staging, final, replacing.meta):
                    return final if final.exists() else None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.stats.stored += 1
        return final

    def _swap(self, staging: Path, final: Path, expected: bytes) -> bool:
        """Put the entry in `staging` in place of the one at `final`, if that is still the one whose
        `meta.json` read `expected`; False if another process got in between."""
        removed = self._take_out(final, expected)
        if removed is None:
            return False
        try:
            os.rename(staging, final)
            return True
        except OSError:
            return False
        finally:
            shutil.rmtree(removed.parent, ignore_errors=True)

    def _take_out(self, final: Path, expected: bytes | None) -> Path | None:
        """Move the entry at `final` into a trash folder beside it and return its new path, if it is the one
        whose `meta.json` read `expected` (None: had none); otherwise leave it (or put it back) and return None."""
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name[:12]}.old.", dir=final.parent))
        try:
            os.rename(final, trash / "entry")  # out of the way first: what is in place now is checked after
        except OSError:  # gone already: another process removed or is replacing it
            shutil.rmtree(trash, ignore_errors=True)
            return None
        if _meta_of(trash / "entry") == expected:
            return trash / "entry"
        with contextlib.suppress(OSError):  # a third process's entry in place meanwhile is as good
            os.rename(trash / "entry", final)
        shutil.rmtree(trash, ignore_errors=True)
        return None

    # -- upkeep (`diffjet cache`) -----------------------------------------------------------------
    def sweep(self, older_than_s: float = STALE_AFTER_S) -> list[Path]:
        """Delete staging and trash folders older than `older_than_s` (left by killed processes)."""
        self._swept = True
        if not self.writable:
            return []
        swept, now = [], time.time()
        for shard in self._shards():
            for path in shard.iterdir():
                with contextlib.suppress(OSError):
                    if path.name.startswith(".") and now - path.lstat().st_mtime > older_than_s:
                        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                        swept.append(path)
        return swept

    def entries(self) -> list[EntryInfo]:
        """Every entry, least recently used first."""
        found = []
        for shard in self._shards():
            for folder in shard.iterdir():
                if folder.name.startswith(".") or not folder.is_dir():
                    continue
                meta = _meta_of(folder)
                with contextlib.suppress(OSError):  # removed meanwhile
                    info = EntryInfo(folder, _size(folder), 0.0, meta=meta, readable=False)  # listed first
                    with contextlib.suppress(ValueError, AttributeError, TypeError, OSError):
                        about = json.loads(meta).get("about") or {}
                        info.about, info.readable = dict(about), True
                        info.last_used = (folder / META).stat().st_mtime
                    found.append(info)
        return sorted(found, key=lambda info: info.last_used)

    def verify(self, info: EntryInfo) -> str | None:
        """What is wrong with the entry `info` (sizes, hashes, signature), or None; nothing is loaded."""
        return self._read(info.path, info.path.name)[0]

    def prune(self, max_bytes: int | None = None) -> list[EntryInfo]:
        """Delete stale staging folders, broken entries (those `verify` rejects: every file is read) and,
        with `max_bytes`, the least recently used entries until the rest fit; the entries deleted."""
        if not self.writable:
            raise CacheError(f"compile cache {self.directory} is {self.read_only_reason}; nothing can be pruned")
        self.sweep()
        infos = self.entries()
        broken = [info for info in infos if not info.readable or self.verify(info) is not None]
        removed = [info for info in broken if self._delete(info)]
        kept = [info for info in infos if info not in broken]
        total = sum(info.bytes for info in kept)
        for info in kept:  # least recently used first
            if max_bytes is None or total <= max_bytes:
                break
            if self._delete(info):
                total -= info.bytes
                removed.append(info)
        return removed

    def _delete(self, info: EntryInfo) -> bool:
        taken = self._take_out(info.path, info.meta)
        if taken is not None:
            shutil.rmtree(taken.parent, ignore_errors=True)
        return taken is not None

    def _shards(self) -> list[Path]:
        try:
            return sorted(p for p in self.directory.iterdir() if len(p.name) == 2 and p.is_dir() and not p.is_symlink())
        except OSError:
            return []
