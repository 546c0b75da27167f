"""File helpers of the runtime: atomic writes, entry file names, and who may have written a folder.

A compile-cache entry is code (pickled functions, native kernels), so a folder that holds one is only
read when nobody but this user (or root, who can change anything this process runs anyway) can have
written it: `folder_problem` checks the folder and every folder above it, as ssh checks `~/.ssh`.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path, PurePosixPath
from typing import Any, Callable


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


def make_private_folder(folder: Path) -> None:
    """Create `folder` and every missing folder above it, readable and writable by this user only."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing.append(path)
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:  # another process made it meanwhile: `folder_problem` judges it
            continue


def _owner_problem(path: Path, info: os.stat_result) -> str | None:
    if info.st_uid not in (os.getuid(), 0):
        return f"{path} belongs to another user (uid {info.st_uid})"
    return None


def private_problem(path: Path) -> str | None:
    """Why `path` is not a folder that only this user (or root) can write, or None."""
    try:
        info = os.stat(path)
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror or exc.__class__.__name__})"
    if not stat.S_ISDIR(info.st_mode):
        return f"{path} is not a folder"
    problem = _owner_problem(path, info)
    if problem is None and info.st_mode & 0o022:
        problem = f"{path} is writable by other users (mode {stat.S_IMODE(info.st_mode):o}; chmod go-w it)"
    return problem


def folder_problem(folder: Path) -> str | None:
    """Why code in `folder` may have been written by someone else, or None.

    `folder` must belong to this user or root and be writable by nobody else. So must every folder
    above it (as written and as resolved through links), except that those may be writable by others
    when their sticky bit keeps others from renaming what is not theirs (as on /tmp).
    """
    if not hasattr(os, "getuid"):  # no POSIX owners to check (Windows)
        return None
    problem = private_problem(folder)
    if problem is not None:
        return problem
    absolute = Path(os.path.abspath(folder))
    above = {*absolute.parents, *Path(os.path.realpath(folder)).parents}
    for path in sorted(above, key=lambda p: len(p.parts)):
        try:
            info = os.stat(path)
        except OSError as exc:
            return f"{path} cannot be read ({exc.strerror or exc.__class__.__name__})"
        problem = _owner_problem(path, info)
        if problem is None and info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            problem = f"{path} is writable by other users without the sticky bit (mode {stat.S_IMODE(info.st_mode):o})"
        if problem is not None:
            return problem
    return None
