"""A persistent compile cache: what Inductor built for one component and input shape, kept on disk.

Compiling the SD1.5 UNet cold takes about a minute (bench/results). PyTorch can serialise everything a
process compiled (Inductor's FX-graph and AOTAutograd caches, Triton kernels, autotuning choices) with
`torch.compiler.save_cache_artifacts()`, and preload it into a new process with
`load_cache_artifacts()`, after which Dynamo still traces but nothing is compiled again.

Dynamo's tracing is skipped too where an entry also holds a precompiled function (`precompiled.py`):
the traced and compiled forward itself, which a new process loads and calls directly.

`CompileCache` stores those bytes per entry, under a key that names everything the compiled code depends
on: the module's architecture (class and config), its weights' names, shapes, dtypes and layouts, the
input signature, the passes applied, the torch/triton/diffusers/diffjet versions and the GPU's
architecture. An entry is a folder holding `artifacts.bin`, any further files (`function.bin`, Triton's
binaries under `triton/`, see `triton_cache.py`) and `meta.json` (its key parts, and each file's size and
SHA-256). Loading checks sizes and hashes first: a truncated, tampered or foreign entry is deleted with a
warning and rebuilt, never loaded. Entries are only ever read from the directory the user configured
(`Config.cache_dir` or the `DIFFJET_CACHE_DIR` environment variable), because loading them deserialises
Python objects.

Writes are atomic: an entry is written into a temporary folder beside its final place and renamed; when
two processes fill the same entry at once, one rename wins and the other process drops its copy.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import secrets
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)

ARTIFACTS = "artifacts.bin"
FUNCTION = "function.bin"
META = "meta.json"
FORMAT = 3  # 3: meta.json lists every file of an entry under "files"


def default_cache_dir() -> Path:
    """`$DIFFJET_CACHE_DIR/compile`, else `~/.cache/diffjet/compile`."""
    root = os.environ.get("DIFFJET_CACHE_DIR") or Path.home() / ".cache" / "diffjet"
    return Path(root) / "compile"


def package_version(package: str) -> str | None:
    """The installed version of `package`, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_key(device: torch.device) -> dict[str, Any]:
    """Versions and GPU architecture: compiled kernels are valid only where these match."""
    gpu = None
    if device.type == "cuda":
        gpu = {"name": torch.cuda.get_device_name(device), "capability": list(torch.cuda.get_device_capability(device))}
    return {
        "format": FORMAT,
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "diffusers": package_version("diffusers"),
        "diffjet": package_version("diffjet"),
        "cuda": torch.version.cuda,
        "gpu": gpu,
    }


def module_key(module: nn.Module) -> dict[str, Any]:
    """Architecture and weights layout of `module` (not the weight values: compiled code reads them)."""
    config = getattr(module, "config", None)
    config_dict = dict(config) if isinstance(config, dict) else getattr(config, "to_dict", lambda: {})()
    layout = hashlib.sha256()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        layout.update(f"{name}:{tuple(tensor.shape)}:{tuple(tensor.stride())}:{tensor.dtype};".encode())
    return {
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        "config": json.dumps(config_dict, sort_keys=True, default=str),
        "weights_layout": layout.hexdigest(),
    }


def entry_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    stored: int = 0
    rejected: int = 0  # entries found broken, deleted and rebuilt


class CompileCache:
    """Entries of compiled artifacts in `directory`, keyed by `entry_key(parts)`."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_artifacts: Callable[[], Any] = torch.compiler.save_cache_artifacts,
        load_artifacts: Callable[[bytes], Any] = torch.compiler.load_cache_artifacts,
    ) -> None:
        self.directory = Path(directory)
        self._save = save_artifacts
        self._load = load_artifacts
        self.stats = CacheStats()

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / key

    def load(self, parts: dict[str, Any]) -> bool:
        """Preload the entry for `parts` into this process's compiler caches; False on a miss."""
        return self.load_entry(parts) is not None

    def load_entry(self, parts: dict[str, Any]) -> dict[str, bytes] | None:
        """Preload the entry for `parts` and return its further files by name; None on a miss."""
        key = entry_key(parts)
        folder = self.path(key)
        if not folder.exists():
            self.stats.misses += 1
            return None
        problem, files = self._read(folder, key)
        if problem is not None:
            logger.warning("diffjet compile cache: %s; rebuilding %s", problem, folder)
            shutil.rmtree(folder, ignore_errors=True)
            self.stats.rejected += 1
            self.stats.misses += 1
            return None
        artifacts = files.pop(ARTIFACTS)
        if artifacts:
            self._load(artifacts)
        self.stats.hits += 1
        return files

    def store(self, parts: dict[str, Any], extra: dict[str, bytes] | None = None, replace: bool = False) -> Path | None:
        """Write what this process compiled so far, and `extra` files, as the entry for `parts`; None if
        there is nothing to write. An existing entry is kept, unless `replace` (this one has more in it)."""
        saved = self._save()
        artifacts = (saved[0] if isinstance(saved, tuple) else saved) if saved else b""
        if not artifacts and not extra:
            return None
        files = {ARTIFACTS: artifacts, **(extra or {})}
        key = entry_key(parts)
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key[:12]}.", dir=final.parent))
        try:
            for name, data in files.items():
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                (staging / name).write_bytes(data)
            meta = {"key": key, "parts": parts,
                    "files": {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                              for name, data in files.items()}}
            (staging / META).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
            try:
                os.rename(staging, final)
            except OSError:
                if not final.exists():
                    raise
                # Another process stored the same entry first: its copy is as good, unless this one has more.
                if not (replace and _swap(staging, final)):
                    return final if final.exists() else None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.stats.stored += 1
        return final

    @staticmethod
    def _read(folder: Path, key: str) -> tuple[str | None, dict[str, bytes]]:
        """(what is wrong with the entry or None, its files by name once checked)."""
        try:
            meta = json.loads((folder / META).read_text())
            expected = {name: (int(f["size"]), str(f["sha256"])) for name, f in meta["files"].items()}
            if any(not plain_name(name) for name in expected):
                return "entry names a file outside its folder", {}
            files = {name: (folder / name).read_bytes() for name in expected}
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
            return f"unreadable entry ({exc.__class__.__name__})", {}
        if ARTIFACTS not in files:
            return "entry has no artifacts", {}
        if meta.get("key") != key:
            return "entry belongs to another key", {}
        for name, data in files.items():
            size, digest = expected[name]
            if len(data) != size:
                return f"truncated entry ({name}: {len(data)} of {size} bytes)", {}
            if hashlib.sha256(data).hexdigest() != digest:
                return f"entry's hash does not match its contents ({name})", {}
        return None, files


def write_atomically(target: Path, write: Callable[[Any], Any]) -> None:
    """Write through a temporary file in the same folder and rename it over `target`: a reader sees the
    whole file or none, and a failed write leaves nothing behind.

    The file gets the mode any new file would (0666 less the umask), or keeps the mode of the file it
    replaces; `tempfile.mkstemp` alone would leave every output 0600."""
    target = Path(target)
    folder = target.parent
    for _ in range(100):
        tmp = folder / f".{target.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"no free temporary name beside {target}")
    try:
        with os.fdopen(fd, "wb") as handle:
            try:
                os.fchmod(handle.fileno(), stat.S_IMODE(os.stat(target).st_mode))
            except FileNotFoundError:
                pass
            write(handle)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def plain_name(name: str) -> bool:
    """A file name an entry may hold: a relative path without `..` (Triton's files sit in subfolders)."""
    parts = PurePosixPath(name).parts
    return bool(parts) and not PurePosixPath(name).is_absolute() and ".." not in parts


def _swap(staging: Path, final: Path) -> bool:
    """Put the entry in `staging` in place of the one at `final`; False if another process got in between."""
    old = Path(tempfile.mkdtemp(prefix=f".{final.name[:12]}.old.", dir=final.parent))
    try:
        os.rename(final, old / "entry")  # out of the way first: a folder cannot be renamed over another
        os.rename(staging, final)
        return True
    except OSError:
        return False
    finally:
        shutil.rmtree(old, ignore_errors=True)
