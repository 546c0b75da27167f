"""Triton's compiled kernels kept with a compile-cache entry and found again by a new process (CPU)."""

import json
import logging

import pytest

from diffjet.runtime import triton_cache
from diffjet.runtime.compile_cache import CompileCache

triton = pytest.importorskip("triton")
from triton.runtime.cache import FileCacheManager  # noqa: E402

KEY = "W3Z5QKXSAMPLEKEY"


def _compile_into(folder, name="_group_norm_stats", binary=b"\x7fELF cubin bytes"):
    """What Triton's `compile` does on a miss: the kernel's files, then a group file naming them."""
    with triton_cache.scope(folder):
        manager = FileCacheManager(KEY)
        paths = {
            f"{name}.cubin": manager.put(binary, f"{name}.cubin"),
            f"{name}.json": manager.put(json.dumps({"name": name, "num_warps": 4}), f"{name}.json"),
        }
        manager.put_group(f"{name}.json", paths)


def _lookup(folder, name="_group_norm_stats"):
    """What Triton's `compile` does first: the group of a kernel's files in the cache, or None."""
    with triton_cache.scope(folder):
        return FileCacheManager(KEY).get_group(f"{name}.json")


def test_scope_points_triton_at_the_folder_and_restores_it(tmp_path):
    before = triton.knobs.cache.dir
    with triton_cache.scope(tmp_path):
        assert triton.knobs.cache.dir == str(tmp_path)
    assert triton.knobs.cache.dir == before


def test_kernels_compiled_in_one_folder_are_found_in_another_after_collect_and_restore(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    _compile_into(first)
    files = triton_cache.collect(first)
    assert sorted(files) == [f"triton/{KEY}/__grp___group_norm_stats.json", f"triton/{KEY}/_group_norm_stats.cubin",
                             f"triton/{KEY}/_group_norm_stats.json"]
    group = json.loads(files[f"triton/{KEY}/__grp___group_norm_stats.json"])
    assert group == {"child_paths": {"_group_norm_stats.cubin": f"{KEY}/_group_norm_stats.cubin",
                                     "_group_norm_stats.json": f"{KEY}/_group_norm_stats.json"}}, "stored relative"

    assert _lookup(second) is None
    assert triton_cache.restore(files, second) == set(files)
    found = _lookup(second)
    assert found is not None, "Triton must find the restored kernel instead of compiling it again"
    assert all(path.startswith(str(second)) for path in found.values())
    assert open(found["_group_norm_stats.cubin"], "rb").read() == b"\x7fELF cubin bytes"


def test_collect_leaves_out_known_files_and_half_written_ones(tmp_path):
    _compile_into(tmp_path)
    known = set(triton_cache.collect(tmp_path))
    (tmp_path / KEY / "tmp.pid_1_abc").mkdir()
    (tmp_path / KEY / "tmp.pid_1_abc" / "x.cubin").write_bytes(b"partial")
    # Triton's driver module, built at a process's first launch: a warm process whose first launch fell
    # in a runner's folder re-stored every entry it used (AOTInductor packages, the H200).
    (tmp_path / "DRIVER").mkdir()
    (tmp_path / "DRIVER" / "cuda_utils.cpython-312-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    _compile_into(tmp_path, name="_group_norm_apply")
    new = triton_cache.collect(tmp_path, known)
    assert sorted(new) == [f"triton/{KEY}/__grp___group_norm_apply.json", f"triton/{KEY}/_group_norm_apply.cubin",
                           f"triton/{KEY}/_group_norm_apply.json"]


def test_restore_writes_nothing_outside_its_folder(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    evil_group = json.dumps({"child_paths": {"k.cubin": "../../outside.cubin"}}).encode()
    written = triton_cache.restore({
        "triton/../outside.cubin": b"x",
        "triton//etc/passwd": b"x",
        f"triton/{KEY}/__grp__k.json": evil_group,
        "function.bin": b"not Triton's",
        f"triton/{KEY}/k.cubin": b"fine",
    }, folder)
    assert written == {f"triton/{KEY}/k.cubin"}
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["k.cubin"]


def test_an_entry_keeps_triton_files_and_rejects_a_damaged_one(tmp_path, caplog):
    cache = CompileCache(tmp_path / "cache", save_artifacts=lambda: (b"kernels", None), load_artifacts=lambda b: None)
    parts = {"component": "unet", "signature": "s1"}
    _compile_into(tmp_path / "compiled")
    files = {"function.bin": b"fn", **triton_cache.collect(tmp_path / "compiled")}
    entry = cache.store(parts, files)
    assert cache.load_entry(parts).files == files

    (entry / "triton" / KEY / "_group_norm_stats.cubin").write_bytes(b"\x7fELF cubin bytez")  # same size, other bytes
    with caplog.at_level(logging.WARNING, logger="diffjet"):
        assert cache.load_entry(parts) is None
    assert "hash does not match" in caplog.text and not entry.exists()


def test_an_entry_naming_a_file_outside_its_folder_is_rejected(tmp_path, caplog):
    cache = CompileCache(tmp_path / "cache", save_artifacts=lambda: (b"kernels", None), load_artifacts=lambda b: None)
    parts = {"component": "unet", "signature": "s1"}
    entry = cache.store(parts, {"function.bin": b"fn"})
    (tmp_path / "cache" / "secret").write_bytes(b"s")
    meta = json.loads((entry / "meta.json").read_text())
    meta["files"]["../../secret"] = {"size": 1, "sha256": "0" * 64}
    (entry / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="diffjet"):
        assert cache.load_entry(parts) is None
    assert "outside its folder" in caplog.text


def test_the_driver_module_is_built_once_per_environment_and_loaded_after(tmp_path):
    # Triton builds its driver module with the C compiler at its first use in a process, into its own cache
    # folder, which a new machine does not have: diffjet keeps it in the compile cache instead.
    cache = CompileCache(tmp_path / "cache")
    builds = []

    def build():  # what Triton's driver does at its first use: load the module from its cache, else build it
        manager = FileCacheManager("DRIVERKEY")
        if manager.get_file("cuda_utils.cpython-312-x86_64-linux-gnu.so") is None:
            builds.append(triton.knobs.cache.dir)
            manager.put(b"\x7fELF driver", "cuda_utils.cpython-312-x86_64-linux-gnu.so")

    triton_cache.keep_driver(cache, {"triton": "3.6"}, build)
    assert len(builds) == 1 and cache.stats.stored == 1
    triton_cache.keep_driver(cache, {"triton": "3.6"}, build)  # a new process: restored, not built
    assert len(builds) == 1 and cache.stats.hits == 1 and cache.stats.stored == 1
    triton_cache.keep_driver(cache, {"triton": "3.7"}, build)  # another environment builds its own
    assert len(builds) == 2 and cache.stats.stored == 2
    assert not (tmp_path / "DRIVERKEY").exists() and all("diffjet-triton-" in b for b in builds)


def test_a_driver_module_that_does_not_load_is_dropped_and_the_start_goes_on(tmp_path, caplog):
    cache = CompileCache(tmp_path / "cache")

    def build():
        FileCacheManager("DRIVERKEY").put(b"\x7fELF driver", "cuda_utils.so")

    triton_cache.keep_driver(cache, {"triton": "3.6"}, build)

    def broken():
        raise ImportError("undefined symbol: cuLaunchKernelEx")

    with caplog.at_level(logging.WARNING):
        triton_cache.keep_driver(cache, {"triton": "3.6"}, broken)
    assert "driver module not taken from the compile cache" in caplog.text
    assert cache.stats.rejected == 1 and cache.entries() == []


def test_triton_hashes_its_installation_on_a_thread_once_per_process(monkeypatch):
    from triton.runtime.cache import triton_key

    monkeypatch.setattr(triton_cache, "_hashing", None)
    triton_key.cache_clear()
    thread = triton_cache.hash_triton_in_background()
    assert thread is not None and thread.name == "diffjet-triton-key"
    thread.join(timeout=60)
    assert triton_key.cache_info().currsize == 1, "the thread did not leave Triton's key where launches find it"
    assert triton_cache.hash_triton_in_background() is None
    monkeypatch.setattr(triton_cache, "_hashing", None)
    assert triton_cache.hash_triton_in_background() is None, "hashed again though Triton has the key"
