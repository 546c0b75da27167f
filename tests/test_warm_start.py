"""The warm-start store (`runtime/warm_start.py`) on CPU: what a runner gets for each signature, and what
is kept of its compile."""

import contextlib
import logging
import os

import pytest
import torch

from diffjet.runtime import precompiled
from diffjet.runtime.compile_cache import FUNCTION, CompileCache, entry_key
from diffjet.runtime.warm_start import OtherKind, WarmStartStore

PARTS = {"component": "unet", "module": "tiny"}


class Recorder:
    """PyTorch's artifact recorder as it behaves: saving returns everything recorded since the process
    started, or since the innermost fresh block began."""

    def __init__(self):
        self.scopes = [[]]

    def record(self, data: bytes) -> None:
        self.scopes[-1].append(data)

    def save(self):
        return (b"".join(self.scopes[-1]), None) if self.scopes[-1] else None

    @contextlib.contextmanager
    def fresh(self):
        self.scopes.append([])
        try:
            yield
        finally:
            self.scopes.pop()


class FakePrecompiler:
    """Compiles `args[0]` (a label standing for a signature's inputs) unless told to fail on it; its functions
    run Inductor's cached code unless `inductor_artifacts` is False (as an AOTInductor package's do not)."""

    def __init__(self, fail_on=(), recorder=None, inductor_artifacts=True, choices_into=None):
        self.fail_on, self.recorder, self.choices_into = set(fail_on), recorder, choices_into
        self.compiled, self.loaded = [], []
        self.INDUCTOR_ARTIFACTS = inductor_artifacts

    def compile(self, args, kwargs):
        if args[0] in self.fail_on:
            raise RuntimeError(f"cannot trace {args[0]} whole")
        self.compiled.append(args[0])
        if self.recorder is not None:
            self.recorder.record(b"k" * 1000)
        if self.choices_into is not None:  # Inductor times its kernels' launch configurations as it compiles
            _choice(self.choices_into, f"precompiled-{args[0]}")
        return (lambda *a, **k: f"precompiled {args[0]}"), f"function {args[0]}".encode()

    def load(self, data):
        if data == b"unloadable":
            raise EOFError("Ran out of input")
        self.loaded.append(data)
        return lambda *a, **k: f"loaded {data.decode()}"


def jit(*args, **kwargs):
    return "jit"


def _choice(folder, name):
    (folder / "ab").mkdir(parents=True, exist_ok=True)
    (folder / "ab" / f"{name}.best_config").write_text('{"XBLOCK": 8}')


def _cache(tmp_path, recorder=None, **options):
    recorder = recorder or Recorder()
    return CompileCache(tmp_path, save_artifacts=recorder.save, load_artifacts=lambda b: None,
                        fresh_artifacts=recorder.fresh, **options)


def _run(store, signature, *, keep=True, fn=jit):
    """What a runner does with a new signature: warm up and capture the function it is given, then keep."""
    with store.signature(signature, f"[{signature}]", fn, (signature,), {}) as compiling:
        result = compiling.function(signature)
        if keep:
            compiling.keep()
    return result


def _entry(cache, signature):
    return cache.load_entry({**PARTS, "signature": signature})


def test_each_entry_holds_only_what_its_own_signature_compiled(tmp_path):
    recorder = Recorder()
    cache = _cache(tmp_path, recorder)
    recorder.record(b"t" * 5000)  # compiled before, in this process: a text encoder, say
    store = WarmStartStore(cache, PARTS, name="unet", precompile=FakePrecompiler(recorder=recorder))
    for signature in ("s1", "s2", "s3", "s4"):
        _run(store, signature)
    sizes = [len(_entry(_cache(tmp_path), s).artifacts) for s in ("s1", "s2", "s3", "s4")]
    assert sizes == [1000] * 4, "linear in the number of shapes, not quadratic"


def test_an_entry_whose_function_needs_no_inductor_artifacts_keeps_none_unless_it_fell_back(tmp_path, monkeypatch):
    # An AOTInductor package holds all of its code, tuned: what its compile recorded in Inductor's caches (the
    # artifacts, the kernels' launch choices) would only be written back by every later process for nothing.
    # A signature that could not be packaged runs the runner's own compiled function, which does need them.
    from diffjet.runtime import autotune_choices

    inductor = tmp_path / "inductor"
    monkeypatch.setattr(autotune_choices, "directory", lambda: inductor)
    recorder = Recorder()
    cache = _cache(tmp_path / "cache", recorder)
    store = WarmStartStore(cache, PARTS, name="unet",
                           precompile=FakePrecompiler(fail_on={"s2"}, recorder=recorder, inductor_artifacts=False,
                                                      choices_into=inductor))

    def compiled_here(label):
        recorder.record(b"j" * 700)  # the runner's function compiles in the process
        _choice(inductor, f"here-{label}")
        return "jit"

    assert _run(store, "s1", fn=compiled_here) == "precompiled s1"
    assert _run(store, "s2", fn=compiled_here) == "jit"
    packaged, fell_back = (_entry(_cache(tmp_path / "cache"), s) for s in ("s1", "s2"))
    assert packaged.artifacts == b"" and list(packaged.files) == ["function.bin"]
    assert len(fell_back.artifacts) == 700 and "inductor/ab/here-s2.best_config" in fell_back.files


def test_entries_of_a_real_inductor_compile_are_linear_in_the_number_of_shapes(tmp_path):
    cache = CompileCache(tmp_path, load_artifacts=lambda b: None)  # torch's own recorder
    store = WarmStartStore(cache, PARTS, name="toy")
    fn = torch.compile(lambda x: (x * 2).sin().sum(1) + x.mean(), dynamic=False)
    for rows in (8, 16, 24, 32):
        x = torch.randn(rows, 5)
        with store.signature(f"{rows}", f"({rows}, 5)", fn, (x,), {}) as compiling:
            torch.testing.assert_close(compiling.function(x), (x * 2).sin().sum(1) + x.mean())
            compiling.keep()
    sizes = [len(_entry(cache, f"{rows}").artifacts) for rows in (8, 16, 24, 32)]
    # Unscoped, they were 157, 314, 471 and 628 KB: each entry repeated every one before it.
    assert min(sizes) > 0 and max(sizes) < 1.5 * min(sizes), sizes


def test_a_signature_is_precompiled_once_stored_and_loaded_by_the_next_process(tmp_path):
    fake = FakePrecompiler()
    store = WarmStartStore(_cache(tmp_path), PARTS, name="unet", precompile=fake)
    assert _run(store, "s1") == "precompiled s1" and fake.compiled == ["s1"]
    assert _entry(_cache(tmp_path), "s1").files == {FUNCTION: b"function s1"}
    assert _run(store, "s1") == "precompiled s1" and fake.compiled == ["s1"], "a re-capture reuses it"

    later = FakePrecompiler()  # another process, same cache
    cache = _cache(tmp_path)
    assert _run(WarmStartStore(cache, PARTS, name="unet", precompile=later), "s1") == "loaded function s1"
    assert later.compiled == [] and cache.stats.hits == 1 and cache.stats.stored == 0


def test_a_signature_another_precompile_setting_filled_is_loaded_from_that_entry_not_compiled(tmp_path, caplog,
                                                                                               monkeypatch):
    # `diffjet compile --precompile aoti`, then `diffjet serve` without the flag: the packages hold the same
    # compiled step, so the server starts from them instead of compiling every shape cold.
    from diffjet.runtime import triton_cache

    aoti_parts = {**PARTS, "compile": {"precompile": "aoti"}}
    _run(WarmStartStore(_cache(tmp_path), aoti_parts, name="unet", precompile=FakePrecompiler()), "s1")
    own, aoti, cache = FakePrecompiler(), FakePrecompiler(inductor_artifacts=False), _cache(tmp_path)
    store = WarmStartStore(cache, PARTS, name="unet", precompile=own, elsewhere={"aoti": OtherKind(aoti_parts, aoti)})
    # A kernel Triton compiled during the warm-up (one of diffjet's, say) is added to the entry it ran from.
    monkeypatch.setattr(triton_cache, "collect", lambda folder, known: {"triton/k/k.cubin": b"cubin"})
    with caplog.at_level(logging.INFO, logger="diffjet"):
        assert _run(store, "s1") == "loaded function s1"
    assert own.compiled == [] and aoti.loaded == [b"function s1"]
    assert cache.stats.hits == 1 and cache.stats.misses == 0
    assert "precompile='aoti'" in caplog.text and "[s1]" in caplog.text
    assert _entry(_cache(tmp_path), "s1") is None, "the other kind's entry was copied under this kind's key"
    assert _cache(tmp_path).load_entry({**aoti_parts, "signature": "s1"}).files == {
        FUNCTION: b"function s1", "triton/k/k.cubin": b"cubin"}
    monkeypatch.undo()
    # A signature the cache does not have is compiled and kept as this store's kind.
    assert _run(store, "s2") == "precompiled s2" and own.compiled == ["s2"]
    assert _entry(_cache(tmp_path), "s2").files == {FUNCTION: b"function s2"}


def test_another_settings_entry_that_does_not_load_is_deleted_and_the_signature_compiled(tmp_path, caplog):
    aoti_parts = {**PARTS, "compile": {"precompile": "aoti"}}
    _cache(tmp_path).store({**aoti_parts, "signature": "s1"}, {FUNCTION: b"unloadable"}, artifacts=b"")
    own, cache = FakePrecompiler(), _cache(tmp_path)
    store = WarmStartStore(cache, PARTS, name="unet", precompile=own,
                           elsewhere={"aoti": OtherKind(aoti_parts, FakePrecompiler())})
    with caplog.at_level(logging.WARNING, logger="diffjet"):
        assert _run(store, "s1") == "precompiled s1"
    assert "does not load" in caplog.text and cache.stats.rejected == 1
    assert cache.load_entry({**aoti_parts, "signature": "s1"}) is None
    assert _entry(_cache(tmp_path), "s1").files == {FUNCTION: b"function s1"}


def test_another_settings_entry_without_a_function_is_passed_over_unloaded(tmp_path):
    # Its precompile had failed: only Inductor's artifacts are in it, which this store's kind does not load from
    # there; it is not preloaded, counted as a hit, nor deleted (it is that setting's entry).
    aoti_parts = {**PARTS, "compile": {"precompile": "aoti"}}
    _cache(tmp_path).store({**aoti_parts, "signature": "s1"}, artifacts=b"kernels")
    loaded = []
    cache = CompileCache(tmp_path, save_artifacts=Recorder().save, load_artifacts=loaded.append,
                         fresh_artifacts=Recorder().fresh)
    own, aoti = FakePrecompiler(), FakePrecompiler(inductor_artifacts=False)
    store = WarmStartStore(cache, PARTS, name="unet", precompile=own, elsewhere={"aoti": OtherKind(aoti_parts, aoti)})
    assert _run(store, "s1") == "precompiled s1" and aoti.loaded == []
    assert loaded == [] and cache.stats.hits == 0 and cache.stats.rejected == 0
    assert cache.stats.misses == 1, "one signature, one miss: this store's own entry"
    assert _cache(tmp_path).load_entry({**aoti_parts, "signature": "s1"}).artifacts == b"kernels"


def test_a_precompile_failure_affects_only_that_signature(tmp_path, caplog):
    recorder = Recorder()
    fake = FakePrecompiler(fail_on={"s1"}, recorder=recorder)
    store = WarmStartStore(_cache(tmp_path, recorder), PARTS, name="unet", precompile=fake)

    def compiled_in_process(*args):
        recorder.record(b"j" * 500)
        return "jit"

    with caplog.at_level(logging.WARNING, logger="diffjet"):
        assert _run(store, "s1", fn=compiled_in_process) == "jit"
    assert "cannot trace s1 whole" in caplog.text
    assert _run(store, "s2") == "precompiled s2", "the next signature is precompiled all the same"
    s1 = _entry(_cache(tmp_path), "s1")
    assert s1.files == {} and s1.artifacts == b"j" * 500, "its in-process compile is kept instead"
    assert _entry(_cache(tmp_path), "s2").files == {FUNCTION: b"function s2"}


def test_an_entry_stored_without_a_function_gets_one_when_precompiling_works_again(tmp_path):
    _cache(tmp_path).store({**PARTS, "signature": "s1"}, artifacts=b"kernels")  # precompiling had failed
    fake = FakePrecompiler()
    assert _run(WarmStartStore(_cache(tmp_path), PARTS, name="unet", precompile=fake), "s1") == "precompiled s1"
    assert _entry(_cache(tmp_path), "s1").files == {FUNCTION: b"function s1"}
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]


def test_an_entry_whose_function_does_not_load_is_deleted_and_rebuilt(tmp_path, caplog):
    _cache(tmp_path).store({**PARTS, "signature": "s1"}, {FUNCTION: b"unloadable"}, artifacts=b"kernels")
    cache, fake = _cache(tmp_path), FakePrecompiler()
    with caplog.at_level(logging.WARNING, logger="diffjet"):
        assert _run(WarmStartStore(cache, PARTS, name="unet", precompile=fake), "s1") == "precompiled s1"
    assert "does not load" in caplog.text and cache.stats.rejected == 1
    assert _entry(_cache(tmp_path), "s1").files == {FUNCTION: b"function s1"}, "rebuilt with a fresh function"

    later = FakePrecompiler()
    assert _run(WarmStartStore(_cache(tmp_path), PARTS, name="unet", precompile=later), "s1") == "loaded function s1"


def test_keeping_never_fails_the_call(tmp_path, caplog):
    unwritable = _cache(tmp_path / "full")
    (tmp_path / "full" / entry_key({**PARTS, "signature": "s1"})[:2]).write_bytes(b"")  # its folder cannot be made
    broken = CompileCache(tmp_path / "broken", save_artifacts=lambda: (object(), None), load_artifacts=lambda b: None)
    with caplog.at_level(logging.WARNING, logger="diffjet"):
        for cache in (unwritable, broken):
            store = WarmStartStore(cache, PARTS, name="unet", precompile=FakePrecompiler())
            assert _run(store, "s1") == "precompiled s1"
    assert "writing failed" in caplog.text and "could not keep" in caplog.text
    assert not unwritable.writable


def test_a_read_only_cache_serves_its_entries_and_keeps_nothing_with_one_warning(tmp_path, caplog):
    _run(WarmStartStore(_cache(tmp_path), PARTS, name="unet", precompile=FakePrecompiler()), "s1")
    before = sorted(p for p in tmp_path.rglob("*"))
    store = WarmStartStore(_cache(tmp_path, read_only=True), PARTS, name="unet", precompile=FakePrecompiler())
    with caplog.at_level(logging.WARNING, logger="diffjet"):
        results = [_run(store, s) for s in ("s1", "s2", "s3")]
    assert results == ["loaded function s1", "precompiled s2", "precompiled s3"], "new shapes still compile and run"
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert len(caplog.records) == 1 and "read-only" in caplog.text


def test_an_unsigned_entry_in_a_signed_cache_is_never_unpickled(tmp_path):
    _run(WarmStartStore(_cache(tmp_path), PARTS, name="unet", precompile=FakePrecompiler()), "s1")
    fake = FakePrecompiler()
    store = WarmStartStore(_cache(tmp_path, key=os.urandom(32)), PARTS, name="unet", precompile=fake)
    assert _run(store, "s1") == "precompiled s1" and fake.loaded == []


@pytest.mark.parametrize("where", ["snapshot", "load"])
def test_a_cache_that_breaks_while_reading_falls_back_to_the_runner_function(tmp_path, monkeypatch, where, caplog):
    from diffjet.runtime import autotune_choices

    def fails(*args, **kwargs):
        raise PermissionError("denied")

    cache = _cache(tmp_path)
    monkeypatch.setattr(autotune_choices, "snapshot", fails) if where == "snapshot" else \
        monkeypatch.setattr(cache, "load_entry", fails)
    store = WarmStartStore(cache, PARTS, name="unet", precompile=FakePrecompiler())
    with caplog.at_level(logging.WARNING, logger="diffjet"):
        assert _run(store, "s1") == "jit"
    assert "not used" in caplog.text


@pytest.mark.slow  # compiles four parts with Inductor on a CPU (about a minute)
@pytest.mark.parametrize(("model", "settings", "names"), [
    ("tiny-flux", {"interval": 2}, ("head", "rest", "tail")),
    # the UNet's part that takes the skip stack and the branch's position (its `deep` takes the stack too)
    ("tiny", {"interval": 3, "threshold": 0.5}, ("tail",)),
])
def test_step_cache_parts_are_saved_and_loaded_without_tracing(model, settings, names, request, tmp_path):
    # What the warm-start store does with each part on a GPU: precompile it, save it, load it in a new
    # process. There, a fast mode's warm start would otherwise trace every part with Dynamo again.
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from diffjet import StepCache
    from diffjet.runtime.precompiled import Precompiler

    from .precompiled_parts import recorded_parts

    folder = str(request.getfixturevalue("tiny_flux_path" if model == "tiny-flux" else "tiny_path"))
    _, denoiser, seen = recorded_parts(folder, StepCache(**settings))
    files = []
    for name in names:
        saveable, args, kwargs = seen[name]
        _, data = Precompiler(denoiser, function=saveable).compile(args, kwargs)
        with torch.no_grad():
            expected = saveable(denoiser, *args, **kwargs)
        files.append(str(tmp_path / f"{name}.pt"))
        torch.save({"name": name, "data": data, "args": args, "kwargs": kwargs, "expected": expected}, files[-1])
    root = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "tests.precompiled_parts", folder, json.dumps(settings), *files],
                          capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["dynamo_frames"] == 0 and result["error"] < 1e-5


@pytest.mark.skipif(not precompiled.supported("inductor", "aoti"), reason="this torch has no AOTInductor")
def test_a_step_cache_part_that_takes_the_skip_stack_is_packaged_by_aoti_too(tiny_path):
    # `Config(precompile="aoti")` exports each part the runner graphs; the UNet's `tail` takes the skip
    # connections as a list and the branch's position as a Python int, which the export must keep as such.
    from diffjet import StepCache
    from diffjet.runtime.precompiled import AotiPrecompiler

    from .precompiled_parts import recorded_parts

    _, unet, seen = recorded_parts(str(tiny_path), StepCache(interval=3, threshold=0.5))
    saveable, args, kwargs = seen["tail"]
    _, data = AotiPrecompiler(unet, function=saveable).compile(args, kwargs)
    with torch.no_grad():
        got = AotiPrecompiler(unet, function=saveable).load(data)(*args, **kwargs)
        want = saveable(unet, *args, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class FolderCompiler:
    """A kernel compiler with a persistent cache folder, as FlashAttention-4's: within `folder(directory)` a kernel
    it has no binary for in `directory` is compiled and saved there (with the lock and half-written files such a
    cache leaves beside it); one whose binary is there is loaded."""

    def __init__(self):
        self.directory, self.compiled, self.loaded = None, [], []

    @contextlib.contextmanager
    def folder(self, directory):
        self.directory = directory
        try:
            yield
        finally:
            self.directory = None

    def kernel(self, name):
        binary = self.directory / "fingerprint" / f"{name}.o"
        if binary.exists():
            self.loaded.append(binary.read_bytes())
            return
        binary.parent.mkdir(parents=True, exist_ok=True)
        binary.write_bytes(f"binary {name}".encode())
        (binary.parent / f"{name}.lock").write_bytes(b"")
        (binary.parent / f".{name}.123.tmp.o").write_bytes(b"half")
        self.compiled.append(name)


def test_another_compilers_kernels_are_kept_with_the_entry_and_loaded_by_the_next_process(tmp_path):
    def warm_up(compiler, *kernels):
        def fn(signature):
            for name in kernels:
                compiler.kernel(name)
            return "jit"
        return fn

    first = FolderCompiler()
    store = WarmStartStore(_cache(tmp_path), PARTS, name="transformer", kernel_folders={"flash/": first.folder})
    _run(store, "s1", fn=warm_up(first, "attention"))
    assert first.compiled == ["attention"] and first.directory is None  # the folder is the warm-up's only
    # The binary, without its lock file or the half-written one; nothing from outside the prefix.
    assert _entry(_cache(tmp_path), "s1").files == {"flash/fingerprint/attention.o": b"binary attention"}

    later = FolderCompiler()  # another process, same cache: loads the binary, compiles nothing, stores nothing
    cache = _cache(tmp_path)
    _run(WarmStartStore(cache, PARTS, name="transformer", kernel_folders={"flash/": later.folder}), "s1",
         fn=warm_up(later, "attention"))
    assert later.compiled == [] and later.loaded == [b"binary attention"]
    assert cache.stats.hits == 1 and cache.stats.stored == 0
    # A kernel compiled in a later warm-up of the same signature is added to the entry.
    _run(WarmStartStore(cache, PARTS, name="transformer", kernel_folders={"flash/": later.folder}), "s1",
         fn=warm_up(later, "attention", "joint"))
    assert later.compiled == ["joint"] and set(_entry(_cache(tmp_path), "s1").files) == {
        "flash/fingerprint/attention.o", "flash/fingerprint/joint.o"}
