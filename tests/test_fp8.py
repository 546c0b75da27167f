"""The fp8 pass (`Config.fp8`, lossy): on CPU, where `torch._scaled_mm` runs too, against the unmodified
modules in float32; its rule for which GEMMs go fp8; its place beside the GEGLU kernel; the refusal on
devices without fp8; and LoRA on fp8 layers (re-quantized in place, undone exactly, no recompile).

Tolerances: e4m3 keeps 3 mantissa bits, so one layer's output is off by about 3% (relative L2) and a tiny
UNet step by about 7%. Each test also checks that the error is far above fp16's, so that a pass that left the
layers in full precision fails."""

import copy
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, UNet2DConditionModel
from diffusers.models.activations import GEGLU
from torch import nn

import diffjet
from diffjet import Config
from diffjet.config import FP8_NAMES
from diffjet.errors import ConfigError, DeviceError
from diffjet.kernels import geglu as gg
from diffjet.lora import load_lora, unload_lora
from diffjet.passes import attention, fp8, inductor
from diffjet.passes import kernels as kernel_pass

from .conftest import relative_error
from .test_lora import UNET_LAYERS, lora_factors, peft_format

LAYER_TOL = 0.06
STEP_TOL = 0.1


def _linear(k=256, n=128, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n).to(dtype).requires_grad_(False)


def _fp8(module):
    return fp8.apply(module, Config(fp8=True))


# --- one layer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_linear_in_fp8_is_off_by_fp8_rounding_not_more_not_less(dtype):
    layer = _linear(dtype=dtype)
    x = torch.randn(3, 40, 256).to(dtype)
    want = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    fp16_error = relative_error(F.linear(x.half(), layer.weight.half(), layer.bias.half()).float(), want)
    _fp8(layer)
    got = layer(x)
    assert type(layer) is fp8.Fp8Linear and got.dtype == dtype and got.shape == (3, 40, 128)
    assert 10 * fp16_error < relative_error(got, want) < LAYER_TOL


def test_conv1x1_in_fp8_is_a_gemm_over_channels_last_pixels():
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 32, 1).to(memory_format=torch.channels_last).requires_grad_(False)
    x = torch.randn(2, 64, 5, 7).contiguous(memory_format=torch.channels_last)
    want = F.conv2d(x.double(), conv.weight.double(), conv.bias.double())
    _fp8(conv)
    got = conv(x)
    assert type(conv) is fp8.Fp8Conv1x1
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert 1e-2 < relative_error(got, want) < LAYER_TOL


def test_weights_stay_the_parameters_and_fp8_copies_are_buffers():
    layer = _linear()
    weight, bias = layer.weight, layer.bias
    _fp8(layer)
    assert list(layer.parameters()) == [weight, bias] and layer.weight is weight
    assert layer.weight_fp8.dtype == torch.float8_e4m3fn and layer.weight_fp8.shape == (128, 256)
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.shape == (1, 128)
    # Per output channel: each row's largest weight maps to e4m3's largest value.
    torch.testing.assert_close(layer.weight_scale[0], weight.detach().abs().amax(1) / 448)
    assert "weight_fp8" not in layer.state_dict()  # a saved model stays a plain diffusers model


def test_fp8_pays_for_the_gemms_it_won_on_the_gpu_only():
    # The H200 (132 SMs) measurements behind the rule (bench/results/fp8-shapes-*-h200-2026-12-01.json):
    # SDXL's GEGLU projections won; SD1.5's first one, SDXL's feed-forward output and thin GEMMs lost.
    wins = [(2048, 1280, 10240), (8192, 640, 5120)]
    losses = [(2, 320, 1280), (154, 2048, 2560), (8192, 320, 2560), (2048, 5120, 1280), (8192, 2560, 640)]
    assert all(fp8.pays(*shape, 132) for shape in wins)
    assert not any(fp8.pays(*shape, 132) for shape in losses)
    assert fp8.pays(2, 8, 16, None)  # no GPU to weigh: always (the CPU tests)


def test_calls_where_fp8_does_not_pay_run_the_fp16_weight():
    layer = _fp8(_linear())
    layer.sms = 132
    x = torch.randn(4, 256)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    layer.sms = None
    assert not torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_layers_too_narrow_for_fp8_to_pay_get_no_fp8_copy(monkeypatch):
    monkeypatch.setattr(fp8, "multiprocessors", lambda device: 132)  # a GPU's worth of SMs to weigh
    block = nn.Sequential(nn.Linear(320, 640), nn.Linear(640, 320))
    _fp8(block)
    assert [type(m) for m in block] == [nn.Linear, fp8.Fp8Linear] and block[1].sms == 132
    assert fp8.placements(block) == {"linear": 1, "conv1x1": 0, "left_fp16": 1, "conv3x3": 0}


def test_a_zero_weight_quantizes_to_zeros():
    # ControlNet's output convolutions start at zero: a finite scale, zeros, and the bias alone out.
    conv = nn.Conv2d(32, 16, 1).requires_grad_(False)
    conv.weight.zero_()
    _fp8(conv)
    assert torch.isfinite(conv.weight_scale).all() and not conv.weight_fp8.float().any()
    x = torch.randn(1, 32, 3, 3).contiguous(memory_format=torch.channels_last)
    assert torch.equal(conv(x), conv.bias.view(1, -1, 1, 1).expand(1, 16, 3, 3))


def test_module_to_dtype_derives_the_fp8_buffers_again():
    # `module.to(dtype)` casts every floating buffer, float8 included.
    layer = _fp8(_linear())
    x = torch.randn(8, 256)
    want = layer(x)
    layer.to(torch.float16)
    assert layer.weight_fp8.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    assert relative_error(layer(x.half()), want) < 1e-2


def test_a_layer_whose_widths_are_not_multiples_of_16_stays_as_it_is():
    block = nn.Sequential(nn.Linear(40, 24), nn.Linear(24, 32), nn.Linear(32, 48))
    _fp8(block)
    assert [type(m) for m in block] == [nn.Linear, nn.Linear, fp8.Fp8Linear]
    assert fp8.placements(block) == {"linear": 1, "conv1x1": 0, "left_fp16": 2, "conv3x3": 0}


# --- a UNet ---------------------------------------------------------------------------------------


@pytest.fixture
def unet(tiny_path):
    return UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet").eval()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor(500.0), torch.randn(2, 77, 32, generator=g)


def _step(unet, inputs):
    with torch.no_grad():
        return unet(*inputs, return_dict=False)[0]


def test_unet_step_in_fp8_is_within_tolerance_and_idempotent(unet):
    reference = copy.deepcopy(unet)
    fp16_error = relative_error(_step(copy.deepcopy(unet).half(), [t.half() for t in _inputs()]).float(),
                                _step(reference, _inputs()))
    attention.apply(unet, Config())
    assert _fp8(unet) is unet
    got = _step(unet, _inputs())
    error = relative_error(got, _step(reference, _inputs()))
    assert 5 * fp16_error < error < STEP_TOL
    buffers = {name: (b.data_ptr(), b.clone()) for name, b in unet.named_buffers()}
    _fp8(unet)
    assert {name: b.data_ptr() for name, b in unet.named_buffers()} == {n: p for n, (p, _) in buffers.items()}
    assert all(torch.equal(b, buffers[name][1]) for name, b in unet.named_buffers())
    assert torch.equal(_step(unet, _inputs()), got)


def test_every_gemm_that_runs_goes_fp8_and_replaced_projections_do_not(unet):
    attention.apply(unet, Config())
    _fp8(unet)
    linear = [m for m in unet.modules() if isinstance(m, nn.Linear)]
    attns = [m for m in unet.modules() if hasattr(m, "to_qkv") or hasattr(m, "to_kv")]
    # Views of the fused projections, which the attention processor no longer calls: 3 per self-attention,
    # 2 per cross-attention.
    replaced = {id(getattr(a, p)) for a in attns for p in (("to_q", "to_k", "to_v") if hasattr(a, "to_qkv")
                                                             else ("to_k", "to_v"))}
    assert all(isinstance(m, fp8.Fp8Linear) == (id(m) not in replaced) for m in linear)
    convs = [m for m in unet.modules() if isinstance(m, nn.Conv2d)]
    assert all(isinstance(m, fp8.Fp8Conv1x1) == (m.kernel_size == (1, 1)) for m in convs)
    placed = fp8.placements(unet)
    assert placed == {"linear": len(linear) - len(replaced), "conv1x1": sum(c.kernel_size == (1, 1) for c in convs),
                      "left_fp16": 0, "conv3x3": 0}
    assert fp8.describe(unet) == (f"fp8(e4m3: {placed['linear']} linear + {placed['conv1x1']} 1x1-conv layers, "
                                  "0 left fp16)")


def test_pass_off_changes_nothing(unet):
    before = [type(m) for m in unet.modules()]
    fp8.apply(unet, Config())
    assert [type(m) for m in unet.modules()] == before and not list(unet.buffers())


# --- beside the GEGLU kernel ----------------------------------------------------------------------


def _geglu_with_fp8_projection(order):
    torch.manual_seed(0)
    block = nn.Sequential(GEGLU(32, 64))
    steps = [lambda: _fp8(block), lambda: kernel_pass.apply(block, Config(kernels=("geglu",)))]
    for step in steps if order == "fp8-then-kernels" else steps[::-1]:
        step()
    assert type(block[0]) is kernel_pass.FusedGEGLU and type(block[0].proj) is fp8.Fp8Linear
    return block


@pytest.mark.parametrize("order", ["fp8-then-kernels", "kernels-then-fp8"])
def test_geglu_calls_that_go_fp8_run_the_fp8_gemm_not_the_kernel(order, monkeypatch):
    block = _geglu_with_fp8_projection(order)
    kernel_calls = []
    monkeypatch.setattr(kernel_pass, "geglu", lambda *args: kernel_calls.append(args) or gg.reference(*args))
    x = torch.randn(5, 32)
    proj = block[0].proj
    hidden, gate = fp8.fp8_linear(x, proj.weight_fp8, proj.weight_scale, proj.bias, proj.out_dtype).chunk(2, dim=-1)
    assert torch.equal(block(x), hidden * F.gelu(gate)) and kernel_calls == []


@pytest.mark.parametrize("order", ["fp8-then-kernels", "kernels-then-fp8"])
def test_geglu_calls_that_stay_fp16_take_the_kernel(order, monkeypatch):
    block = _geglu_with_fp8_projection(order)
    kernel_calls = []
    monkeypatch.setattr(kernel_pass, "geglu", lambda *args: kernel_calls.append(args) or gg.reference(*args))
    block[0].proj.sms = 132  # 5 rows: thin, fp8 does not pay
    block[0].sms = None  # the kernel pays at any size
    x = torch.randn(5, 32)
    assert torch.equal(block(x), gg.reference(x, block[0].proj.weight, block[0].proj.bias))
    assert len(kernel_calls) == 1 and kernel_calls[0][1] is block[0].proj.weight


def test_a_geglu_whose_projection_stays_fp16_keeps_the_kernel():
    block = nn.Sequential(GEGLU(40, 64))  # 40 inputs: not a multiple of 16, no fp8 GEMM takes it
    _fp8(block)
    kernel_pass.apply(block, Config(kernels=("geglu",)))
    assert type(block[0]) is kernel_pass.FusedGEGLU and type(block[0].proj) is nn.Linear


# --- Config and diffjet.compile -------------------------------------------------------------------


@pytest.mark.parametrize("value", ["yes", 1, 0, None, "on"])
def test_config_fp8_takes_false_true_auto_or_max(value):
    with pytest.raises(ConfigError, match="fp8 must be False, True, 'auto' or 'max'"):
        Config(fp8=value)


def test_config_names_its_lossy_options():
    assert Config().lossy == [] and Config.lossless().lossy == []
    assert Config(fp8=True).lossy == ["fp8"] and Config(fp8="auto").lossy == ["fp8"]
    assert Config(fp8="max").lossy == ["fp8 max (QKV GEMMs, 3x3 convolutions)"]


def test_fp8_max_takes_gemms_from_fewer_tiles_and_keys_its_compiles_apart():
    # SDXL's fused QKV projection at 32² latents, two images: 2048 rows × 1280 → 3840, 480 tiles of 128×128
    # on an H100's 132 SMs: 3.6 waves, fp8 at fp8="max"'s bar (3) and not at fp8=True's (8).
    layers = {}
    for level in (True, "max"):
        torch.manual_seed(0)
        module = nn.Sequential(nn.Linear(1280, 3840), nn.ReLU())
        fp8.apply(module, Config(fp8=level))
        layers[level] = module
        module[0].sms = 132
    assert not layers[True][0].uses_fp8(2048) and layers["max"][0].uses_fp8(2048)
    assert not layers["max"][0].uses_fp8(640)  # 150 tiles: 1.1 waves
    assert layers[True][0].uses_fp8(8192) and layers["max"][0].uses_fp8(8192)
    x = torch.randn(2048, 1280)
    with torch.no_grad():
        exact = layers[True][0](x)  # fp16's path, here on float32 weights: the plain linear
        assert torch.equal(exact, F.linear(x, layers[True][0].weight, layers[True][0].bias))
        assert 0.01 < relative_error(layers["max"][0](x), exact) < 0.06
    # The pass's entry, part of the compile cache key: the bar is named where it is not fp8=True's.
    assert fp8.describe(layers[True]) == "fp8(e4m3: 1 linear + 0 1x1-conv layers, 0 left fp16)"
    assert fp8.describe(layers["max"]) == "fp8(e4m3: 1 linear + 0 1x1-conv layers, 0 left fp16, from 3 waves)"


def _pipe(path):
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("level", [True, "max"])
def test_fp8_true_or_max_is_refused_on_cpu_before_anything_changes(tiny_path, level):
    pipe = _pipe(tiny_path)
    processors = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    with pytest.raises(DeviceError, match=r"compute capability 8\.9 .* on cpu; use Config\(fp8='auto'\)"):
        diffjet.compile(pipe, Config(fp8=level))
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == processors
    assert not hasattr(pipe, "diffjet")


def test_fp8_is_refused_on_gpus_before_ada(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10")
    monkeypatch.setattr(fp8, "_rowwise_gemm_writes", lambda device, dtype: True)  # the torch build would have it
    assert "NVIDIA A10 is 8.6" in (fp8.unsupported(torch.device("cuda")) or "")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert fp8.unsupported(torch.device("cuda")) is None


def test_fp8_auto_turns_itself_off_on_cpu_and_says_so(tiny_path):
    pipe = _pipe(tiny_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        diffjet.compile(pipe, Config(fp8="auto"))
    report = pipe.diffjet
    assert [line for line in report.off if line.startswith("fp8 (fp8 needs a CUDA GPU")]
    assert report.lossy == [] and "LOSSY" not in report.summary()
    assert not any("fp8" in p for p in report.passes["unet"])
    assert not any(isinstance(m, (fp8.Fp8Linear, fp8.Fp8Conv1x1)) for m in pipe.unet.modules())


@pytest.mark.parametrize("level", [True, "max"])
def test_compile_with_fp8_reports_the_layers_and_the_lossy_option(tiny_path, monkeypatch, level):
    # A CPU standing in for a supported GPU: what diffjet.compile does with fp8 on.
    monkeypatch.setattr(fp8, "unsupported", lambda device: None)
    pipe = _pipe(tiny_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        diffjet.compile(pipe, Config(fp8=level))
    report = pipe.diffjet
    name = "fp8" if level is True else "fp8 max (QKV GEMMs, 3x3 convolutions)"
    assert report.lossy == [name] and f"  LOSSY: {name}" in report.summary()
    unet_passes = report.passes["unet"]
    assert unet_passes.index(fp8.describe(pipe.unet)) == unet_passes.index("fused_qkv_sdpa") + 1
    assert ("from 3 waves" in fp8.describe(pipe.unet)) == (level == "max")  # a cache key of its own
    assert fp8.placements(pipe.unet)["linear"] > 0
    assert not any(isinstance(m, fp8.Fp8Linear) for m in pipe.text_encoder.modules())


def test_controlnet_gets_fp8_gemms_too(tmp_path, monkeypatch):
    from diffjet.models import build, control_inputs

    monkeypatch.setattr(fp8, "unsupported", lambda device: None)
    pipe = _pipe(build("tiny-controlnet", tmp_path / "tiny-controlnet"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        diffjet.compile(pipe, Config(fp8=True))
    assert fp8.describe(pipe.controlnet) in pipe.diffjet.passes["controlnet"]
    assert fp8.placements(pipe.controlnet)["conv1x1"] > 0
    image = pipe("a cat", num_inference_steps=2, output_type="np", **control_inputs(pipe, 64, 64)).images
    assert np.isfinite(image).all()


# --- LoRA -----------------------------------------------------------------------------------------


def _fp8_pipeline(path):
    """The tiny pipeline with fused attention and fp8 GEMMs in its UNet, compiled with aot_eager."""
    pipe = _pipe(path)
    attention.apply(pipe.unet, Config())
    _fp8(pipe.unet)
    inductor.apply(pipe.unet, Config(backend="aot_eager"))
    return pipe


def _fp8_buffers(unet):
    return {name: b for name, b in unet.named_buffers() if name.endswith(("weight_fp8", "weight_scale"))}


def test_lora_on_fp8_requantizes_in_place_and_unloading_restores_the_fp8_weights(tiny_path):
    from torch._dynamo.utils import counters

    pipe = _fp8_pipeline(tiny_path)
    buffers = _fp8_buffers(pipe.unet)
    originals = {name: b.clone() for name, b in buffers.items()}
    pointers = {name: b.data_ptr() for name, b in buffers.items()}
    qkv = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_qkv")
    inputs = _inputs()
    factors = peft_format(lora_factors(pipe, seed=1, layers={"unet": UNET_LAYERS}))
    try:
        before = _step(pipe.unet, inputs)
        frames = sum(counters["frames"].values())
        with torch._dynamo.config.patch(error_on_recompile=True):
            load_lora(pipe, factors)
            with_lora = _step(pipe.unet, inputs)
            # The fused projection's fp8 copy follows its to_q/k/v rows, which the LoRA wrote.
            q, _ = fp8.quantize_rows(qkv.weight.detach())
            assert torch.equal(qkv.weight_fp8, q) and not torch.equal(qkv.weight_fp8, originals[
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_qkv.weight_fp8"])
            unload_lora(pipe)
            after = _step(pipe.unet, inputs)
        assert sum(counters["frames"].values()) == frames  # nothing traced again
    finally:
        torch._dynamo.reset()
    assert relative_error(with_lora, before) > 0.05
    assert {name: b.data_ptr() for name, b in _fp8_buffers(pipe.unet).items()} == pointers
    assert all(torch.equal(b, originals[name]) for name, b in _fp8_buffers(pipe.unet).items())
    assert torch.equal(after, before)


def test_lora_on_fp8_computes_what_fp8_of_the_merged_weights_computes(tiny_path):
    pipe = _fp8_pipeline(tiny_path)
    pipe.unet.forward = types.MethodType(type(pipe.unet).forward, pipe.unet)  # eager: no compile needed here
    factors = lora_factors(pipe, seed=1, layers={"unet": UNET_LAYERS})
    load_lora(pipe, peft_format(factors))
    merged = _pipe(tiny_path)
    with torch.no_grad():
        for name, parameter in merged.unet.named_parameters():
            parameter.copy_(pipe.unet.get_parameter(name))
    attention.apply(merged.unet, Config())
    _fp8(merged.unet)
    assert torch.equal(_step(pipe.unet, _inputs()), _step(merged.unet, _inputs()))


def test_lora_reaches_fp8_projections_after_the_pipeline_moved(tiny_path):
    # `pipe.to(dtype)` gives to_q/k/v their own storage; LoRA then writes the fused rows as well, and those
    # are what the fp8 copy must follow.
    pipe = _fp8_pipeline(tiny_path)
    pipe.unet.forward = types.MethodType(type(pipe.unet).forward, pipe.unet)
    pipe.to(torch.float64)
    qkv = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_qkv")
    assert qkv.weight_fp8.dtype == torch.float8_e4m3fn
    load_lora(pipe, peft_format(lora_factors(pipe, seed=1, layers={"unet": UNET_LAYERS})))
    assert torch.equal(qkv.weight_fp8, fp8.quantize_rows(qkv.weight.detach())[0])


def test_requantize_skips_modules_the_pass_was_not_applied_to():
    plain, converted = _linear(seed=1), _fp8(nn.Sequential(_linear(seed=2)))
    with torch.no_grad():
        converted[0].weight.mul_(2)
    assert fp8.requantize([plain, converted, None], [plain.weight]) == 0
    assert fp8.requantize([plain, converted], [converted[0].weight]) == 1
    assert torch.equal(converted[0].weight_fp8, fp8.quantize_rows(converted[0].weight.detach())[0])


# --- GPU ------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_fp8_gemm_on_the_gpu_is_within_tolerance():
    layer = _linear(k=640, n=1920, dtype=torch.float16).cuda()
    x = torch.randn(2, 4096, 640, device="cuda", dtype=torch.float16)
    want = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    fp16_error = relative_error(layer(x), want)
    _fp8(layer)
    layer.sms = None  # always fp8
    assert fp8.output_dtype(x.device, torch.float16) in (torch.float16, torch.bfloat16)
    got = layer(x)
    assert got.dtype == torch.float16 and 10 * fp16_error < relative_error(got, want) < LAYER_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("level", [True, "max"])
def test_compiled_graphed_unet_with_fp8(monkeypatch, level):
    # The tiny UNet's GEMMs and convolutions are far too small for fp8 to pay on a GPU: the rules are opened.
    from torch._dynamo.utils import counters

    from diffjet.models import load_pipeline

    monkeypatch.setattr(fp8, "MIN_WAVES", 0)
    monkeypatch.setattr(fp8, "MIN_WAVES_MAX", 0)
    monkeypatch.setattr(fp8, "MIN_K", 0)
    monkeypatch.setattr(fp8, "conv_pays", lambda pixels, out_channels, sms: True)
    g = torch.Generator("cuda").manual_seed(0)
    inputs = (torch.randn(2, 4, 8, 8, device="cuda", generator=g), torch.tensor(500.0, device="cuda"),
              torch.randn(2, 77, 32, device="cuda", generator=g))
    half = [t.half() for t in inputs]
    pipe = load_pipeline("tiny", device="cuda", dtype=torch.float16)
    diffjet.compile(pipe, Config(cache=False, fp8=level))
    assert pipe.diffjet.lossy == [FP8_NAMES[level]] and fp8.placements(pipe.unet)["left_fp16"] == 0
    assert (fp8.placements(pipe.unet)["conv3x3"] > 0) == (level == "max")
    with torch.no_grad():
        want = load_pipeline("tiny", device="cuda", dtype=torch.float32).unet(*inputs, return_dict=False)[0]
        base = load_pipeline("tiny", device="cuda", dtype=torch.float16).unet(*half, return_dict=False)[0]
        first = pipe.unet(*half, return_dict=False)[0].clone()
        frames = sum(counters["frames"].values())
        second = pipe.unet(*half, return_dict=False)[0]
    stats = pipe.diffjet.runners["unet"].stats
    assert stats.captures == 1 and stats.replays >= 1 and stats.eager_calls == 0
    assert sum(counters["frames"].values()) == frames
    assert torch.isfinite(first).all() and torch.equal(first, second)
    error, fp16_error = relative_error(first, want), relative_error(base, want)
    print(f"fp8={level} error {error:.4f}, fp16 {fp16_error:.5f}")
    assert 5 * fp16_error < error < STEP_TOL
