"""The persistent compile cache on CPU: keys, integrity and trust checks, signing, read-only use, atomic and
concurrent writes, upkeep."""

import copy
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffjet import Config
from diffjet.errors import CacheError, ConfigError
from diffjet.runtime import compile_cache
from diffjet.runtime.compile_cache import ARTIFACTS, META, SIGNATURE, CompileCache, entry_key, module_key, open_cache
from diffjet.runtime.environment import environment_key

KEY = b"0123456789abcdef-a signing key"


class FakeCompiler:
    """Stands in for torch.compiler's artifact save/load, which need a compiled model."""

    def __init__(self, payload=b"compiled kernels"):
        self.payload = payload
        self.loaded = []

    def cache(self, directory, **options):
        return CompileCache(directory, save_artifacts=lambda: (self.payload, None), load_artifacts=self.loaded.append,
                            **options)


@pytest.fixture
def unet(tiny_path):
    return UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet")


def parts_for(module, **overrides):
    parts = {"component": "unet", "module": module_key(module), "environment": environment_key(torch.device("cpu")),
             "passes": ["precision(float16)", "channels_last"], "compile": {"mode": "default"}, "signature": "(2, 4, 64, 64)"}
    parts.update(overrides)
    return parts


def test_a_component_on_another_device_index_has_its_own_entries(unet, monkeypatch):
    # Inductor's code names its device's index, and saved functions do not guard the weights' device:
    # an entry compiled on cuda:0 must not be what a process with the component on cuda:1 loads.
    import diffjet.compiler as compiler

    monkeypatch.setattr(compiler, "environment_key", lambda device: {"gpu": "same card"})
    keys = []
    for device in ("cuda:0", "cuda:1", "cuda:0"):
        monkeypatch.setattr(compiler, "_device_of", lambda module, d=device: torch.device(d))
        keys.append(entry_key(compiler._cache_parts("unet", unet, Config(), ["channels_last"], "forward")))
    assert keys[0] != keys[1] and keys[0] == keys[2]


def test_round_trip_preloads_the_stored_artifacts(tmp_path, unet):
    fake = FakeCompiler()
    cache = fake.cache(tmp_path)
    parts = parts_for(unet)
    assert cache.load(parts) is False and cache.stats.misses == 1
    folder = cache.store(parts)
    assert folder.is_dir() and (folder / ARTIFACTS).read_bytes() == fake.payload
    assert fake.cache(tmp_path).load(parts) is True
    assert fake.loaded == [fake.payload]


def test_key_changes_with_every_part(unet):
    base = parts_for(unet)
    changed = copy.deepcopy(unet)
    changed.register_to_config(cross_attention_dim=99)
    variants = {
        "architecture": parts_for(changed),
        "dtype": parts_for(copy.deepcopy(unet).half()),
        "layout": parts_for(copy.deepcopy(unet).to(memory_format=torch.channels_last)),
        "signature": {**base, "signature": "(2, 4, 96, 96)"},
        "passes": {**base, "passes": ["channels_last"]},
        "compile mode": {**base, "compile": {"mode": "max-autotune-no-cudagraphs"}},
        "torch version": {**base, "environment": {**base["environment"], "torch": "0.0"}},
        "gpu": {**base, "environment": {**base["environment"], "gpu": {"name": "H100", "capability": [9, 0]}}},
    }
    keys = {name: entry_key(p) for name, p in variants.items()}
    assert entry_key(base) == entry_key(parts_for(unet)), "the key must be stable"
    assert len(set(keys.values()) | {entry_key(base)}) == len(keys) + 1


def test_weight_values_do_not_change_the_key(unet):
    other = copy.deepcopy(unet)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    assert entry_key(parts_for(other)) == entry_key(parts_for(unet))


KEY_OF_A_FOLDER = textwrap.dedent(
    """
    import sys
    from diffusers import UNet2DConditionModel
    from diffjet.runtime.compile_cache import entry_key, module_key
    unet = UNet2DConditionModel.from_pretrained(sys.argv[1])
    assert unet.config._use_default_values, "the config must leave arguments out, as published ones do"
    print(entry_key(module_key(unet)))
    """
)


def test_a_partial_config_gives_one_key_whatever_the_hash_seed_and_folder(tiny_path, tmp_path):
    # diffusers lists the arguments a config.json leaves out in `_use_default_values`, in the order of a
    # set: with it in the key, every process started on the published SD1.5 UNet had a key of its own.
    first, second = tmp_path / "unet", tmp_path / "elsewhere" / "unet"
    shutil.copytree(tiny_path / "unet", first)
    config = json.loads((first / "config.json").read_text())
    for left_out in ("act_fn", "center_input_sample", "dropout", "flip_sin_to_cos", "freq_shift",
                     "downsample_padding", "mid_block_scale_factor", "resnet_skip_time_act"):
        del config[left_out]
    (first / "config.json").write_text(json.dumps(config))
    shutil.copytree(first, second)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    keys = []
    procs = [subprocess.Popen([sys.executable, "-c", KEY_OF_A_FOLDER, str(folder)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**env, "PYTHONHASHSEED": seed})
             for seed, folder in (("1", first), ("2", second))]  # both at once: each is mostly imports
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        keys.append(out.split()[-1])
    keys.append(entry_key(module_key(UNet2DConditionModel.from_pretrained(first))))  # this process's own seed
    assert len(set(keys)) == 1, keys
    full = UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet")
    assert keys[0] == entry_key(module_key(full)), "left-out arguments take their defaults: the same UNet"


def _stored(tmp_path, unet, **options):
    fake = FakeCompiler(payload=os.urandom(4096))
    parts = parts_for(unet)
    folder = fake.cache(tmp_path, **options).store(parts)
    return fake, parts, folder


@pytest.mark.parametrize("damage", ["flip", "truncate", "no-meta", "bad-meta", "foreign"])
def test_broken_entries_are_rejected_and_rebuilt(tmp_path, unet, caplog, damage):
    fake, parts, folder = _stored(tmp_path, unet)
    artifacts, meta = folder / ARTIFACTS, folder / META
    if damage == "flip":
        data = bytearray(artifacts.read_bytes())
        data[100] ^= 0xFF
        artifacts.write_bytes(bytes(data))
    elif damage == "truncate":
        artifacts.write_bytes(artifacts.read_bytes()[:1000])
    elif damage == "no-meta":
        meta.unlink()
    elif damage == "bad-meta":
        meta.write_text("{not json")
    elif damage == "foreign":
        other = {**parts, "signature": "something else"}
        record = json.loads(meta.read_text())
        record["key"] = entry_key(other)
        meta.write_text(json.dumps(record))
    cache = fake.cache(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert cache.load(parts) is False
    assert fake.loaded == [], "a broken entry must never be handed to the compiler"
    assert cache.stats.rejected == 1 and "rebuilding" in caplog.text
    assert not folder.exists()
    cache.store(parts)
    assert fake.cache(tmp_path).load(parts) is True


def test_an_entry_whose_artifacts_do_not_load_is_deleted(tmp_path, unet):
    _, parts, folder = _stored(tmp_path, unet)

    def unpickling_fails(data):
        raise EOFError("Ran out of input")

    cache = CompileCache(tmp_path, save_artifacts=lambda: None, load_artifacts=unpickling_fails)
    assert cache.load_entry(parts) is None and cache.stats.rejected == 1 and not folder.exists()


def test_a_failed_write_leaves_no_entry(tmp_path, unet):
    cache = CompileCache(tmp_path, save_artifacts=lambda: (object(), None), load_artifacts=lambda b: None)
    with pytest.raises(TypeError):
        cache.store(parts_for(unet))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_nothing_compiled_stores_nothing(tmp_path, unet):
    cache = CompileCache(tmp_path, save_artifacts=lambda: None, load_artifacts=lambda b: None)
    assert cache.store(parts_for(unet)) is None and not any(tmp_path.iterdir())


WRITER = textwrap.dedent(
    """
    import os, sys
    from diffjet.runtime.compile_cache import CompileCache
    cache = CompileCache(sys.argv[1], save_artifacts=lambda: (os.urandom(1 << 20), None), load_artifacts=lambda b: None)
    for round in range(20):
        for key in range(4):
            cache.store({"key": key, "round": round % 2})
    """
)


def test_two_processes_filling_one_cache_leave_it_valid(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], env=env) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    entries = [m.parent for m in tmp_path.rglob(META)]
    assert len(entries) == 8
    for folder in entries:
        meta = json.loads((folder / META).read_text())
        assert hashlib.sha256((folder / ARTIFACTS).read_bytes()).hexdigest() == meta["files"][ARTIFACTS]["sha256"]
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".")]
    assert leftovers == []


def test_default_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFJET_CACHE_DIR", str(tmp_path))
    assert compile_cache.default_cache_dir() == tmp_path / "compile"


# -- replacing and deleting never removes what another process has just written ----------------------
def _cache(tmp_path, payload, **options):
    return CompileCache(tmp_path, save_artifacts=lambda: (payload, None), load_artifacts=lambda b: None, **options)


def test_a_replace_keeps_the_entry_another_process_wrote_after_the_read(tmp_path):
    parts = {"component": "unet", "signature": "s1"}
    _cache(tmp_path, b"first").store(parts)
    mine, theirs = _cache(tmp_path, b"mine"), _cache(tmp_path, b"theirs")
    read_by_me, read_by_them = mine.load_entry(parts), theirs.load_entry(parts)
    assert theirs.store(parts, {"function.bin": b"theirs"}, replacing=read_by_them) is not None
    mine.store(parts, {"function.bin": b"mine"}, replacing=read_by_me)  # what I read is gone: theirs stays
    entry = _cache(tmp_path, b"").load_entry(parts)
    assert entry.files == {"function.bin": b"theirs"} and entry.artifacts == b"theirs"
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")], "no staging or trash folder is left"


def test_rejecting_an_entry_another_process_has_just_rebuilt_keeps_the_new_one(tmp_path):
    parts = {"component": "unet", "signature": "s1"}
    folder = _cache(tmp_path, b"first").store(parts)
    reader = _cache(tmp_path, b"")
    stale = reader.load_entry(parts)
    shutil.rmtree(folder)  # another process rebuilt it meanwhile
    _cache(tmp_path, b"rebuilt").store(parts)
    reader.discard(parts, stale, "its precompiled function does not load")
    assert _cache(tmp_path, b"").load_entry(parts).artifacts == b"rebuilt"


def test_staging_folders_of_killed_processes_are_swept_after_an_hour(tmp_path):
    parts = {"component": "unet", "signature": "s1"}
    folder = _cache(tmp_path, b"x").store(parts)
    old, young = folder.parent / ".0123456789ab.killed", folder.parent / ".0123456789ab.writing"
    for staging in (old, young):
        staging.mkdir()
        (staging / ARTIFACTS).write_bytes(b"half")
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    _cache(tmp_path, b"y").store({"component": "unet", "signature": "s2"})
    assert not old.exists() and young.exists(), "only the stale one goes; the other may be a live writer's"


# -- trust: the cache is code ------------------------------------------------------------------------
def test_created_folders_are_private_to_the_user(tmp_path):
    cache_dir = tmp_path / "home" / ".cache" / "diffjet" / "compile"
    cache = _cache(cache_dir, b"x")
    for folder in (tmp_path / "home", cache_dir.parent.parent, cache_dir.parent, cache_dir):
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    entry = cache.store({"component": "unet", "signature": "s1"})
    assert entry.stat().st_mode & 0o777 == 0o700 and entry.parent.stat().st_mode & 0o777 == 0o700


def _untrusted(tmp_path, how):
    cache_dir = tmp_path / "shared" / "compile"
    _cache(cache_dir, b"x").store({"component": "unet", "signature": "s1"})
    if how == "world-writable":
        cache_dir.chmod(0o777)
    elif how == "group-writable":
        cache_dir.chmod(0o770)
    elif how == "in-a-world-writable-folder":
        cache_dir.parent.chmod(0o777)
    elif how == "through-a-link-into-a-world-writable-folder":
        public = tmp_path / "public"
        public.mkdir()
        shutil.move(cache_dir, public / "compile")
        public.chmod(0o777)
        (tmp_path / "shared" / "compile").symlink_to(public / "compile")
    elif how == "another-user's":
        if os.getuid() != 0:
            pytest.skip("only root can give a folder to another user")
        os.chown(cache_dir, 12345, 12345)
    return cache_dir


@pytest.mark.parametrize("how", ["world-writable", "group-writable", "in-a-world-writable-folder",
                                 "through-a-link-into-a-world-writable-folder", "another-user's"])
def test_a_folder_someone_else_could_have_written_is_refused(tmp_path, how):
    cache_dir = _untrusted(tmp_path, how)
    loaded = []
    with pytest.raises(CacheError, match="not safe to load code from"):
        CompileCache(cache_dir, save_artifacts=lambda: None, load_artifacts=loaded.append)
    assert loaded == []


def test_sticky_world_writable_folders_above_the_cache_are_fine(tmp_path):
    public = tmp_path / "public"
    public.mkdir()
    public.chmod(0o1777)  # as /tmp
    _cache(public / "mine" / "compile", b"x")


def test_an_entry_folder_others_can_write_is_not_loaded(tmp_path, unet):
    fake, parts, folder = _stored(tmp_path, unet)
    folder.chmod(0o777)
    cache = fake.cache(tmp_path)
    assert cache.load(parts) is False and fake.loaded == [] and cache.stats.rejected == 1


def test_compile_turns_an_unsafe_cache_off_with_one_warning(tmp_path, caplog):
    from diffjet.compiler import CompileReport, _open_cache

    cache_dir = _untrusted(tmp_path, "world-writable")
    config = Config(cache_dir=str(cache_dir))
    reports = [CompileReport(device="cuda", config=config) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="diffjet"):
        assert [_open_cache(config, report) for report in reports] == [None, None]
    assert len([r for r in caplog.records if "not safe to load code from" in r.getMessage()]) == 1
    assert all("compile cache" in report.off[0] and "writable by other users" in report.off[0] for report in reports)


# -- signing -----------------------------------------------------------------------------------------
@pytest.fixture
def key_file(tmp_path, monkeypatch):
    path = tmp_path / "keys" / "cache.key"
    path.parent.mkdir()
    path.write_bytes(KEY)
    path.chmod(0o600)
    monkeypatch.setenv(compile_cache.KEY_VARIABLE, str(path))
    return path


def test_signed_entries_round_trip_and_carry_a_signature(tmp_path, key_file):
    parts = {"component": "unet", "signature": "s1"}
    folder = open_cache(tmp_path / "cache").store(parts, {"function.bin": b"fn"}, artifacts=b"kernels")
    assert (folder / SIGNATURE).read_text() == compile_cache._sign(KEY, (folder / META).read_bytes())
    entry = CompileCache(tmp_path / "cache", key=KEY, load_artifacts=lambda b: None).load_entry(parts)
    assert entry.files == {"function.bin": b"fn"} and entry.artifacts == b"kernels"


def _forged(cache_dir, parts):
    """An entry whose artifacts someone replaced and whose meta.json they updated to match: the size and
    SHA-256 checks pass, because they only catch corruption."""
    folder = CompileCache(cache_dir, key=KEY).store(parts, artifacts=b"kernels")
    evil = b"pickled code"
    (folder / ARTIFACTS).write_bytes(evil)
    meta = json.loads((folder / META).read_text())
    meta["files"][ARTIFACTS] = {"size": len(evil), "sha256": hashlib.sha256(evil).hexdigest()}
    (folder / META).write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
def test_a_forged_or_unsigned_entry_is_never_loaded(tmp_path, read_only, caplog):
    parts, unsigned_parts = {"component": "unet", "signature": "s1"}, {"component": "unet", "signature": "s2"}
    forged = _forged(tmp_path, parts)
    unsigned = CompileCache(tmp_path).store(unsigned_parts, artifacts=b"kernels")
    unpickled = []
    assert CompileCache(tmp_path, load_artifacts=unpickled.append).load(parts), "without a key the forgery passes"
    unpickled.clear()
    cache = CompileCache(tmp_path, key=KEY, read_only=read_only, load_artifacts=unpickled.append)
    with caplog.at_level(logging.WARNING, logger="diffjet"):
        assert cache.load_entry(parts) is None and cache.load_entry(unsigned_parts) is None
    assert unpickled == [], "nothing of an entry is unpickled before its signature is checked"
    assert "signature does not match" in caplog.text and "not signed" in caplog.text
    assert forged.exists() == read_only and unsigned.exists() == read_only, "a read-only cache deletes nothing"


@pytest.mark.parametrize("problem, match", [("inside", "inside the cache folder"), ("readable", "chmod 600"),
                                            ("short", "at least 16"), ("missing", "cannot read")])
def test_a_key_file_that_cannot_be_trusted_is_refused(tmp_path, key_file, problem, match):
    cache_dir = tmp_path / "cache"
    if problem == "inside":
        cache_dir.mkdir()
        shutil.move(key_file, cache_dir / "cache.key")
        os.environ[compile_cache.KEY_VARIABLE] = str(cache_dir / "cache.key")
    elif problem == "readable":
        key_file.chmod(0o644)
    elif problem == "short":
        key_file.write_bytes(b"short")
    elif problem == "missing":
        key_file.unlink()
    with pytest.raises(CacheError, match=match):
        open_cache(cache_dir)


# -- read-only caches and writes that fail ------------------------------------------------------------
def test_config_cache_takes_true_false_or_read_only():
    assert Config(cache="read-only").cache == "read-only" and Config(cache=False).cache is False
    for bad in ("yes", 1, None):
        with pytest.raises(ConfigError, match="read-only"):
            Config(cache=bad)


def test_a_read_only_cache_loads_entries_and_writes_nothing_with_one_warning(tmp_path, caplog):
    parts = {"component": "unet", "signature": "s1"}
    _cache(tmp_path, b"kernels").store(parts)
    before = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    cache = _cache(tmp_path, b"new kernels", read_only=True)
    assert cache.load_entry(parts).artifacts == b"kernels"
    with caplog.at_level(logging.WARNING, logger="diffjet"):
        for signature in ("s2", "s3", "s4"):
            assert cache.store({"component": "unet", "signature": signature}) is None
    assert len(caplog.records) == 1 and "read-only" in caplog.text
    assert sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before


def test_a_folder_this_process_cannot_write_is_used_read_only(tmp_path, monkeypatch):
    _cache(tmp_path, b"kernels").store({"component": "unet", "signature": "s1"})
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and not (
        mode & os.W_OK and os.path.samefile(path, tmp_path)))  # root may write anywhere: say it may not
    cache = _cache(tmp_path, b"new")
    assert not cache.writable and "not writable" in cache.read_only_reason
    assert cache.load({"component": "unet", "signature": "s1"}) and cache.store({"signature": "s2"}) is None


def test_a_failing_write_makes_the_cache_read_only_instead_of_raising(tmp_path, caplog):
    cache = _cache(tmp_path, b"kernels")
    parts = {"component": "unet", "signature": "s1"}
    (tmp_path / entry_key(parts)[:2]).write_bytes(b"")  # where its folder goes: as a full or broken disk would
    with caplog.at_level(logging.WARNING, logger="diffjet"):
        assert cache.store(parts) is None
        assert cache.store({"component": "unet", "signature": "s2"}) is None
    assert not cache.writable and len(caplog.records) == 1 and "writing failed" in caplog.text


# -- upkeep: ls, verify, prune -----------------------------------------------------------------------
def _three_entries(tmp_path):
    cache = _cache(tmp_path, os.urandom(1000))
    folders = [cache.store({"signature": f"s{i}"}, about={"component": "unet", "model": f"m{i}"}) for i in range(3)]
    for age, folder in zip((300, 200, 100), folders):  # s0 used longest ago
        os.utime(folder / META, (time.time() - age, time.time() - age))
    return cache, folders


def test_entries_are_listed_least_recently_used_first_with_size_and_model(tmp_path):
    cache, folders = _three_entries(tmp_path)
    assert cache.load({"signature": "s0"})  # loading counts as a use
    infos = cache.entries()
    assert [info.path for info in infos] == [folders[1], folders[2], folders[0]]
    assert [info.about["model"] for info in infos] == ["m1", "m2", "m0"]
    assert all(1000 < info.bytes < 3000 for info in infos)


def test_prune_drops_broken_entries_then_least_recently_used_ones_until_the_rest_fit(tmp_path):
    cache, folders = _three_entries(tmp_path)
    size = cache.entries()[0].bytes
    (folders[2] / META).write_text("{broken")
    assert [info.path for info in cache.prune()] == [folders[2]], "an unreadable one goes"
    assert [info.path for info in cache.entries()] == [folders[0], folders[1]]
    folders.append(cache.store({"signature": "s3"}))
    (folders[3] / ARTIFACTS).write_bytes(os.urandom(1000))  # same size, other bytes
    removed = cache.prune(max_bytes=int(1.5 * size))
    assert [info.path for info in removed] == [folders[3], folders[0]], "the damaged one, then the oldest"
    assert [info.path for info in cache.entries()] == [folders[1]]


def test_verify_reports_damaged_entries_without_loading_them(tmp_path):
    cache, folders = _three_entries(tmp_path)
    (folders[1] / ARTIFACTS).write_bytes(b"x" * 1000)
    problems = [cache.verify(info) for info in cache.entries()]
    assert problems[0] is None and "hash does not match" in problems[1] and problems[2] is None
    assert folders[1].exists(), "verify deletes nothing"


def test_entries_of_an_aoti_package_and_of_a_saved_function_are_apart_and_the_default_keys_stay(unet, monkeypatch,
                                                                                                   tmp_path):
    # An AOTInductor package in an entry's function file would fail to unpickle as a saved function (and the
    # other way round): each kind has entries of its own. The default's parts are those written before
    # there was a choice, so caches in use keep their entries.
    import diffjet.compiler as compiler

    parts = {kind: compiler._cache_parts("unet", unet, Config(precompile=kind), ["channels_last"], "forward")
             for kind in ("function", "aoti")}
    assert entry_key(parts["function"]) != entry_key(parts["aoti"])
    assert parts["function"]["compile"] == {"mode": "default", "backend": "inductor"}
    # Each kind's store loads the other kind's entries, with that kind's loader.
    for kind, other in (("function", "aoti"), ("aoti", "function")):
        store = compiler._store(CompileCache(tmp_path), parts[kind], Config(precompile=kind), "unet", unet,
                                compiler.precompiled.forward, None)
        assert list(store.elsewhere) == [other] and store.elsewhere[other].parts == parts[other]
        assert isinstance(store.elsewhere[other].precompile, compiler.precompiled.AotiPrecompiler) == (other == "aoti")
        assert isinstance(store.precompile, compiler.precompiled.AotiPrecompiler) == (kind == "aoti")
    assert isinstance(compiler._precompiler(unet, Config(precompile="aoti"), compiler.precompiled.forward),
                      compiler.precompiled.AotiPrecompiler)
    with pytest.raises(ConfigError, match="precompile must be one of"):
        Config(precompile="so")
