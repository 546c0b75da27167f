import os
import shutil
import tempfile

# Everything the tests write to the temporary folder goes into one folder of this session: pytest's
# tmp_path folders and built presets, Inductor's kernels and torch's precompiled C++ headers (about
# 150 MB, which torch would keep in the temporary folder for good), Triton's kernels (else in the home
# folder) and what subprocesses write. A passing session removes it; a failing one keeps it.
_SESSION_TMP = tempfile.mkdtemp(prefix="diffjet-tests-")
os.environ["TMPDIR"] = tempfile.tempdir = _SESSION_TMP
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(_SESSION_TMP, "triton"))

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Without a GPU, diffjet's Triton kernels run on CPU tensors in Triton's interpreter (set before any
    # kernel is defined: `triton.jit` reads it then).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from diffjet.models import build  # noqa: E402

_PASSED = pytest.StashKey[bool]()
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pytest_collection_modifyitems(items):
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(requires_cuda)


@pytest.fixture(scope="session", autouse=True)
def _preset_cache(tmp_path_factory):
    """Presets built by tests (and CLI subprocesses) go to a private cache, never the user's: inside
    pytest's temporary folder, which a passing run removes (pyproject.toml, `tmp_path_retention_policy`)."""
    cache = os.environ.get("DIFFJET_TEST_CACHE") or str(tmp_path_factory.mktemp("diffjet-cache"))
    os.environ["DIFFJET_CACHE_DIR"] = cache
    yield cache


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_PASSED] = exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)


def pytest_unconfigure(config):
    if config.stash.get(_PASSED, False):
        shutil.rmtree(_SESSION_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_path(_preset_cache, tmp_path_factory):
    return build("tiny", tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_sdxl_path(_preset_cache, tmp_path_factory):
    return build("tiny-sdxl", tmp_path_factory.mktemp("models") / "tiny-sdxl")


def relative_error(x, ref) -> float:
    x, ref = torch.as_tensor(x).double(), torch.as_tensor(ref).double()
    return float((x - ref).norm() / ref.norm())


def traced_error(model, inputs: dict) -> float:
    """The relative error of `model` traced whole by Dynamo (`aot_eager`: no graph break allowed) against its eager
    output on `inputs`."""
    with torch.no_grad():
        eager = model(**inputs)[0]
        traced = torch.compile(model, backend="aot_eager", fullgraph=True)(**inputs)[0]
    return relative_error(traced, eager)


def tiny_fp8_unets(path, *configs):
    """The tiny preset's UNet in float32, then one float16 copy per `Config` (fp8 on) with the fp8 pass and the
    kernel pass applied, as `diffjet.compile` applies them."""
    from diffusers import UNet2DConditionModel

    from diffjet.passes import fp8
    from diffjet.passes import kernels as kernel_pass

    def load(dtype):
        return UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype).eval()

    unets = [load(torch.float32)]
    for config in configs:
        unet = load(torch.float16)
        fp8.apply(unet, config)
        kernel_pass.apply(unet, config)
        unets.append(unet)
    return unets


def tiny_unet_outputs(*unets, batch: int = 2):
    """Each tiny UNet's output, as float32, for one seeded input (8×8 latents) in the UNet's dtype."""
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, 8, 8, generator=g)
    states = torch.randn(batch, 77, unets[0].config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return [unet(sample.to(unet.dtype), 500, states.to(unet.dtype)).sample.float() for unet in unets]


# -- test LoRAs for the tiny pipeline (test_lora, test_runtime_gpu) ------------------------------------
# Rank 4, on these layers of the tiny UNet and CLIP text encoder: self- and cross-attention projections
# (fused after compiling), a 1x1 and a 3x3 convolution, text-encoder projections and an MLP.
RANK = 4
ATTENTION_BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0"
UNET_LAYERS = [
    *(f"{ATTENTION_BLOCK}.attn1.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")),
    *(f"{ATTENTION_BLOCK}.attn2.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")),
    "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_v",
    "down_blocks.0.attentions.0.proj_in",
    "down_blocks.0.resnets.0.conv1",
    "up_blocks.0.resnets.0.conv_shortcut",
]
TEXT_ENCODER_LAYERS = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.out_proj",
                       "encoder.layers.1.mlp.fc1"]


def lora_factors(pipe, seed, layers=None):
    """Random (down, up, alpha) per (component, layer path), shaped like the pipeline's layers."""
    layers = layers or {"unet": UNET_LAYERS, "text_encoder": TEXT_ENCODER_LAYERS}
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for component, paths in layers.items():
        for path in paths:
            weight = getattr(pipe, component).get_submodule(path).weight
            down = torch.randn(RANK, *weight.shape[1:], generator=g) / weight[0].numel() ** 0.5
            up = torch.randn(weight.shape[0], RANK, *[1] * (weight.dim() - 2), generator=g)
            factors[component, path] = (down, up, float(RANK) / 2)  # alpha/rank = 0.5
    return factors


def peft_format(factors):
    """diffusers/PEFT keys (`unet.<layer>.lora_A.weight`); no alphas, so alpha = rank."""
    state = {}
    for (component, path), (down, up, _) in factors.items():
        state[f"{component}.{path}.lora_A.weight"] = down
        state[f"{component}.{path}.lora_B.weight"] = up
    return state


@pytest.fixture(scope="session")
def tiny_flux_path(_preset_cache, tmp_path_factory):
    return build("tiny-flux", tmp_path_factory.mktemp("models") / "tiny-flux")


@pytest.fixture(scope="session")
def tiny_sd3_path(_preset_cache, tmp_path_factory):
    return build("tiny-sd3", tmp_path_factory.mktemp("models") / "tiny-sd3")


# -- serving (test_serve*.py) ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def served_pipe(tiny_path):
    """The tiny pipeline as `diffjet serve` loads it (compiled, float32 on the CPU), shared by the test
    servers, one at a time: a worker leaves it with its own scheduler and no LoRA merged."""
    from diffjet.serve.settings import ServeSettings
    from diffjet.serve.worker import load_served_pipeline

    return load_served_pipeline(ServeSettings(model=str(tiny_path), sizes=((64, 64),)))


@pytest.fixture(scope="session")
def lora_dir(served_pipe, tmp_path_factory):
    """Two rank-4 LoRAs for the tiny pipeline, `style` and `ink`, and a file that is no LoRA name."""
    from safetensors.torch import save_file

    from diffjet.models import random_lora

    folder = tmp_path_factory.mktemp("loras")
    for name, seed in (("style", 1), ("ink", 2)):
        save_file(random_lora(served_pipe, seed=seed, rank=4, strength=0.5), str(folder / f"{name}.safetensors"))
    (folder / "notes.txt").write_text("not a LoRA")
    return folder
