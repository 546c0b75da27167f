"""Inductor's autotuning choices kept with a compile-cache entry and found again by a new process (CPU).

The choices are written and read with Inductor's own `AutotuneCache`, as its kernels do at their first
call, in two different Inductor cache directories standing for two machines.
"""

import logging
import shutil
from pathlib import Path

import pytest

from diffjet.runtime import autotune_choices
from diffjet.runtime.compile_cache import CompileCache

autotune_cache = pytest.importorskip("torch._inductor.runtime.autotune_cache")
triton = pytest.importorskip("triton")  # Inductor's launch configurations are Triton's `Config`
from torch._inductor.runtime.triton_heuristics import hash_configs  # noqa: E402

CONFIGS = [triton.Config({"XBLOCK": 64, "R0_BLOCK": 8}, num_warps=2, num_stages=1),
           triton.Config({"XBLOCK": 1, "R0_BLOCK": 2048}, num_warps=8, num_stages=1)]
KERNEL = "cabcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopq.py"  # Inductor: <source hash>.py


def _cache(root):
    """Inductor's autotune cache of one kernel, whose source it keeps at `<cache>/<hash[1:3]>/<hash>.py`."""
    path = root / KERNEL[1:3] / KERNEL
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# kernel source\n")
    return autotune_cache.AutotuneCache.create({}, str(path), hash_configs(CONFIGS))


def _autotune(root, winner=1):
    """What a kernel does at its first call without a choice: time every config, write the winner."""
    _cache(root).save(CONFIGS[winner], time_taken_ns=5_000_000)


def _choice(root):
    """What a kernel does when it is loaded: the choice Inductor finds for it, or None (it will time them)."""
    return _cache(root).read_best({}, CONFIGS)


def test_choices_written_in_one_process_are_found_by_another_after_collect_and_restore(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    before = autotune_choices.snapshot(first)
    _autotune(first)
    files = autotune_choices.collect(first, before)
    assert files.pop(autotune_choices.ROOT) == str(first).encode(), "the compiling process's folder is recorded"
    assert len(files) == 1
    (name,) = files
    assert name.startswith("inductor/") and name.endswith(".best_config") and name.count("/") == 2

    assert _choice(second) is None, "a new Inductor cache has no choice: the kernel would be timed again"
    assert autotune_choices.restore(files, second) == set(files)
    found = _choice(second)
    assert found is not None, "Inductor must find the restored choice instead of timing the kernel"
    assert found.kwargs == CONFIGS[1].kwargs and found.num_warps == CONFIGS[1].num_warps


def test_restore_writes_only_into_this_process_folder_whatever_the_entry_records(tmp_path, caplog):
    # A precompiled function's kernels look for their choices next to their source in the process that
    # compiled them (torch 2.11 on the H100); the entry records that folder, but an entry must never make
    # this process write elsewhere than its own Inductor cache: a process whose folder is the compiling
    # one's (same path) finds the choices, another times those kernels again.
    compiling, here = tmp_path / "compiling" / "inductor", tmp_path / "here" / "inductor"
    _autotune(compiling)
    files = autotune_choices.collect(compiling, set())
    shutil.rmtree(compiling)  # a new machine, or the compiling process's temporary folder gone
    with caplog.at_level(logging.INFO, logger="diffjet"):
        autotune_choices.restore(files, here)
    assert _choice(here) is not None, "written where kernels compiled in this process look"
    assert not compiling.exists(), "nothing is written to the folder the entry names"
    assert str(compiling) in caplog.text and str(here) in caplog.text, "the process is told why kernels are timed"

    autotune_choices.restore(files, compiling)  # the same path as the compiling process: found again
    assert _choice(compiling) is not None
    for recorded in (b"relative/inductor", str(tmp_path / "x" / ".." / "y").encode(), b"/etc"):
        elsewhere = tmp_path / "elsewhere"
        autotune_choices.restore({**files, autotune_choices.ROOT: recorded}, elsewhere)
        assert not (tmp_path / "y").exists() and not Path("relative").exists()
        assert {p.parent.parent for p in tmp_path.rglob("*.best_config")} == {compiling, here, elsewhere}


def test_collect_takes_only_choices_written_after_the_snapshot(tmp_path):
    _autotune(tmp_path)
    before = autotune_choices.snapshot(tmp_path)
    assert len(before) == 1
    assert autotune_choices.collect(tmp_path, before) == {}
    (tmp_path / "zz").mkdir()
    (tmp_path / "zz" / "other.best_config").write_text("{}")
    (tmp_path / "zz" / "kernel.py").write_text("# not a choice")
    assert list(autotune_choices.collect(tmp_path, before)) == ["inductor/zz/other.best_config", autotune_choices.ROOT]


def test_restore_keeps_choices_inductor_already_has_and_refuses_other_paths(tmp_path):
    _autotune(tmp_path, winner=0)
    (name,) = autotune_choices.snapshot(tmp_path)
    mine = (tmp_path / name.removeprefix("inductor/")).read_bytes()
    files = {
        name: b'{"other": "choice"}',  # Inductor's own file stays
        "inductor/../escape.best_config": b"{}",
        "inductor/ab/cd/deep.best_config": b"{}",
        "inductor/ab/not-a-choice.py": b"",
        "triton/ab/kernel.cubin": b"",
        "inductor/ab/new.best_config": b'{"XBLOCK": 8}',
    }
    assert autotune_choices.restore(files, tmp_path / "elsewhere") == {name, "inductor/ab/new.best_config"}
    assert autotune_choices.restore(files, tmp_path) == {"inductor/ab/new.best_config"}
    assert (tmp_path / name.removeprefix("inductor/")).read_bytes() == mine
    assert (tmp_path / "ab" / "new.best_config").read_bytes() == b'{"XBLOCK": 8}'
    assert not (tmp_path.parent / "escape.best_config").exists()
    assert not [p for p in tmp_path.rglob(".*")], "no temporary file is left behind"


def test_choices_travel_inside_a_checked_entry(tmp_path):
    inductor = tmp_path / "inductor"
    _autotune(inductor)
    files = autotune_choices.collect(inductor, set())
    cache = CompileCache(tmp_path / "cache")
    parts = {"model": "unet", "signature": "(2, 4, 64, 64)"}
    cache.store(parts, files)
    assert cache.load_entry(parts).files == files

    entry = next((tmp_path / "cache").rglob("*.best_config"))
    entry.write_bytes(entry.read_bytes().replace(b"num_warps", b"num_wraps"))
    assert cache.load_entry(parts) is None, "a tampered choice is not handed to Inductor"
