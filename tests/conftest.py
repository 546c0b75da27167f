import os

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU, diffjet's Triton kernels run on CPU tensors in Triton's interpreter (set before any
    # kernel is defined: `triton.jit` reads it then).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from diffjet.models import build  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pytest_collection_modifyitems(items):
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(requires_cuda)


@pytest.fixture(scope="session", autouse=True)
def _preset_cache(tmp_path_factory):
    """Presets built by tests (and CLI subprocesses) go to a private cache, never the user's."""
    cache = os.environ.get("DIFFJET_TEST_CACHE") or str(tmp_path_factory.mktemp("diffjet-cache"))
    os.environ["DIFFJET_CACHE_DIR"] = cache
    yield cache


@pytest.fixture(scope="session")
def tiny_path(_preset_cache, tmp_path_factory):
    return build("tiny", tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_sdxl_path(_preset_cache, tmp_path_factory):
    return build("tiny-sdxl", tmp_path_factory.mktemp("models") / "tiny-sdxl")


def relative_error(x, ref) -> float:
    x, ref = torch.as_tensor(x).double(), torch.as_tensor(ref).double()
    return float((x - ref).norm() / ref.norm())
