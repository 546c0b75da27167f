"""Precompiled forwards: a module's forward traced and compiled once, saved whole, loaded without Dynamo.

With only Inductor's artifacts cached, a new process still traces every component with Dynamo before the
cache can answer; `torch.compile(...).aot_compile` keeps the traced bytecode, the compiled graph and its
guards as one serialisable function instead, which took the SD1.5 warm start's first image from 12.7 to
5.4 s on the H100 (bench/results/warm-start-profile-sd15-h100-2026-11-26.json).

What is compiled is `forward(module, *args, **kwargs)`, the module's class forward with the module as an
argument (or any other function that takes the module first): parameters stay graph inputs read at each call, so in-place weight updates (LoRA merges) reach
the loaded function, and nothing of the weights is saved with it. Only guards that survive a new process
are kept (`keep_portable_guards_unsafe`), less those on the module's own tensors (`portable_guards`); the
CUDA-graph runner calls each function only with the input signature it was compiled for, which is what
the dropped guards would have checked.

`AotiPrecompiler` keeps the same function as an AOTInductor package instead (`Config(precompile="aoti")`,
experimental): no guards, no Python bytecode and no Inductor module to load, only a shared library that the
package's C++ loader opens, handed the module's own tensors as its constants. On the H200 the sd15 UNet
step's package loaded in 0.05 s and first ran in 0.8 s, against 1.1 and 0.7 s for a saved function, and took
twice as long to compile (bench/NOTES.md, "Warm start").
"""

from __future__ import annotations

import contextlib
import inspect
import io
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


def supported(backend: str, kind: str = "function") -> bool:
    """Whether this torch can save functions compiled with `backend` (Inductor's are serialisable) as `kind`."""
    if backend != "inductor":
        return False
    if kind == "aoti":
        return hasattr(torch._inductor, "aoti_compile_and_package") and hasattr(torch._C, "_aoti")
    return hasattr(torch.compiler, "load_compiled_function") and hasattr(torch.compiler, "keep_portable_guards_unsafe")


def portable_guards(module_argument: str = "module") -> Callable[[list], list[bool]]:
    """Dynamo's guard filter for a saved function whose first argument is called `module_argument`: the
    portable guards, less those on that module's tensors.

    Unpickling a guard on a tensor builds a fake tensor for it: with one per weight (776 for the SD1.5
    UNet) that was about 0.8 s of each warm start's load under the profiler (2026-12-01). What those guards
    check is settled before a function is looked up: the weights' shapes, strides and dtypes are part of
    the entry's key (`compile_cache.module_key`), as is the device. Guards on the inputs and on global
    state (grad mode, say) stay.
    """
    prefix = module_argument + "."

    def keep(entries: list) -> list[bool]:
        portable = torch.compiler.keep_portable_guards_unsafe(entries)
        return [k and not (e.guard_type == "TENSOR_MATCH" and e.name.startswith(prefix))
                for e, k in zip(entries, portable)]

    return keep


def forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """What is compiled: the class's forward (the instance's `forward` is the CUDA-graph runner)."""
    return type(module).forward(module, *args, **kwargs)


def for_kind(kind: str, module: nn.Module, options: dict | None, function: Callable[..., Any] = forward
             ) -> Precompiler:
    """The precompiler of `kind` (`Config.precompile`: "function" or "aoti") for `function(module, ...)`."""
    return (AotiPrecompiler if kind == "aoti" else Precompiler)(module, options, function)


def _aot_enabled():
    flags = torch._dynamo.config
    if hasattr(flags, "enable_aot_compile"):  # off by default before torch 2.12
        return flags.patch(enable_aot_compile=True)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _without_instance_forward(module: nn.Module):
    """The module without the `forward` set on the instance, for the block.

    Dynamo saves the module's own attributes with a function's guards. diffjet's CUDA-graph runner sits
    in `module.forward` and, once it has captured a graph, holds `torch.cuda.CUDAGraph` objects, which
    cannot be saved: every signature after a component's first failed to precompile ("cannot pickle
    'CUDAGraph' object", SDXL on the H100) and was compiled in-process instead, so a new process traced
    it again. What is compiled is the class's forward, which does not use the instance's.
    """
    missing = object()
    saved = module.__dict__.pop("forward", missing)
    try:
        yield
    finally:
        if saved is not missing:
            module.__dict__["forward"] = saved


class Precompiler:
    """Compiles (with Inductor's `options`), saves and loads `function(module, *args, **kwargs)` for one
    input signature at a time; `function` is the module's class forward unless given (any function that
    takes the module first, such as one running part of it)."""

    #: Whether the function runs code of Inductor's that its cache entry's artifacts preload.
    INDUCTOR_ARTIFACTS = True

    def __init__(self, module: nn.Module, options: dict | None = None,
                 function: Callable[..., Any] = forward) -> None:
        self.module = module
        self.options = dict(options or {})
        self.function = function

    def compile(self, args: tuple, kwargs: dict) -> tuple[Callable[..., Any], bytes]:
        """Compile for the signature of `args`/`kwargs`: the callable (taking the forward's arguments)
        and its serialised form."""
        first = next(iter(inspect.signature(self.function).parameters))
        options = {**self.options, "guard_filter_fn": portable_guards(first)}
        with _aot_enabled(), torch.no_grad(), _without_instance_forward(self.module):
            compiled = torch.compile(self.function, fullgraph=True, dynamic=False, options=options)
            function = compiled.aot_compile(((self.module, *args), kwargs))
        data = type(function).serialize(function).serialized_data
        return self._bind(function), data

    def load(self, data: bytes) -> Callable[..., Any]:
        """The callable that `compile` returned, from its serialised form (in any process)."""
        with _aot_enabled():
            function = torch.compiler.load_compiled_function(io.BytesIO(data))
        return self._bind(function)

    def _bind(self, function: Callable[..., Any]) -> Callable[..., Any]:
        module = self.module

        def call(*args: Any, **kwargs: Any) -> Any:
            return function(module, *args, **kwargs)

        return call


class _Bound(nn.Module):
    """`function(module, ...)` as a module of its own, for `torch.export`: the module's tensors are this
    one's under `module.`, which is how the package names the constants it is handed."""

    def __init__(self, module: nn.Module, function: Callable[..., Any]) -> None:
        super().__init__()
        self.module = module
        self.function = function

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(self.module, *args, **kwargs)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The module's parameters and buffers by the names the package gives them (tied ones by each name)."""
        return {**dict(self.named_parameters(remove_duplicate=False)),
                **dict(self.named_buffers(remove_duplicate=False))}


class AotiPrecompiler(Precompiler):
    """`Precompiler`'s interface, with the function exported (`torch.export`) and compiled into an
    AOTInductor package whose weights are not inside it (`package_constants_in_so=False`).

    A loaded package reads the module's own parameters and buffers (`user_managed=True`), so in-place weight
    updates reach it as they reach a saved function. It runs single-threaded: the package's model container
    otherwise waits for its previous run (`cudaEventSynchronize`), which a CUDA graph's capture cannot hold;
    the CUDA-graph runner calls it under its lock. diffjet's Triton kernels (`torch.library.custom_op`s) run
    through AOTInductor's fallback to the op registry, in Python."""

    INDUCTOR_ARTIFACTS = False  # the package holds all of its code

    def compile(self, args: tuple, kwargs: dict) -> tuple[Callable[..., Any], bytes]:
        options = {**self.options, "aot_inductor.package_constants_in_so": False}
        with torch.no_grad(), _without_instance_forward(self.module), \
                tempfile.TemporaryDirectory(prefix="diffjet-aoti-") as folder:
            program = torch.export.export(_Bound(self.module, self.function), args, kwargs, strict=False)
            path = torch._inductor.aoti_compile_and_package(program, package_path=f"{folder}/function.pt2",
                                                            inductor_configs=options)
            data = Path(path).read_bytes()
        return self.load(data), data

    def load(self, data: bytes) -> Callable[..., Any]:
        from torch.export.pt2_archive._package import AOTICompiledModel

        bound = _Bound(self.module, self.function)
        tensors = bound.tensors()
        device = next(iter(tensors.values()), torch.empty(0)).device
        index = device.index if device.type == "cuda" else -1
        # The loader unpacks the package into a folder of its own; the file is not needed after.
        with tempfile.TemporaryDirectory(prefix="diffjet-aoti-") as folder:
            path = Path(folder) / "function.pt2"
            path.write_bytes(data)
            package = AOTICompiledModel(torch._C._aoti.AOTIModelPackageLoader(str(path), "model", True, 1, index))
        return _Package(package, bound, tensors)


class _Package:
    """A loaded package called with the module's tensors as they are now.

    The package holds raw pointers to the tensors it was handed. A module whose tensors were replaced since
    (`pipe.to(...)`, a parameter's `.data` set) hands it the new ones before the call; one whose tensors
    changed shape or dtype no longer fits the package and raises. The CUDA-graph runner calls it only for a
    warm-up and a capture, so the check costs nothing per step."""

    def __init__(self, package: Any, bound: _Bound, tensors: dict[str, torch.Tensor]) -> None:
        self.package = package
        self.bound = bound
        self.names = package.get_constant_fqns()
        missing = [name for name in self.names if name not in tensors]
        if missing:
            raise ValueError(f"the package wants tensors the module does not have: {missing[:3]}")
        self.loaded: list[tuple] = []
        self._hand_over(tensors)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._hand_over(self.bound.tensors())
        return self.package(*args, **kwargs)

    def _hand_over(self, tensors: dict[str, torch.Tensor]) -> None:
        now = [(tensors[n].data_ptr(), tensors[n].dtype, tensors[n].shape) for n in self.names]
        if now == self.loaded:
            return
        if self.loaded and [t[1:] for t in now] != [t[1:] for t in self.loaded]:
            raise RuntimeError("the module's tensors changed dtype or shape since its AOTInductor package was loaded")
        self.package.load_constants({n: tensors[n] for n in self.names}, check_full_update=True, user_managed=True)
        self.loaded = now
