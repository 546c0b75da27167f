"""diffjet.load_lora / unload_lora / set_lora_scales on compiled pipelines (CPU: fused attention and
channels-last apply): merged in place, equal to the same deltas merged by hand into an uncompiled
pipeline, undone bit for bit, and diffusers' own LoRA methods refused with a pointer to diffjet's."""

import json
import threading
import types
import warnings

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file

import diffjet
from diffjet import Config
from diffjet.errors import LoraError
from diffjet.lora import forbid_diffusers_lora, load_lora, lora_scales, set_lora_scales, unload_lora
from diffjet.passes import attention, inductor

from .conftest import (
    ATTENTION_BLOCK,
    RANK,
    TEXT_ENCODER_LAYERS,
    UNET_LAYERS,
    lora_factors,
    peft_format,
    relative_error,
)

TOL = 1e-4
def load(path):
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compiled(path, dtype=None):
    pipe = load(path)
    if dtype is not None:
        pipe.to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return diffjet.compile(pipe)


def generate(pipe):
    return pipe("a photo of a cat", num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def diffusers_format(factors):
    """diffusers' own names: `unet.<layer>.lora.down.weight`, `text_encoder.<layer>.lora_linear_layer.up.weight`."""
    state = {}
    for (component, path), (down, up, _) in factors.items():
        layer = "lora" if component == "unet" else "lora_linear_layer"
        state[f"{component}.{path}.{layer}.down.weight"] = down
        state[f"{component}.{path}.{layer}.up.weight"] = up
    return state


def kohya_format(factors, te_prefix="lora_te"):
    """kohya-ss keys (`lora_unet_down_blocks_0_…`, `lora_te_text_model_…`) with `.alpha`."""
    state = {}
    for (component, path), (down, up, alpha) in factors.items():
        if component == "unet":
            name = "lora_unet_" + path.replace(".", "_")
        else:
            prefix = {"text_encoder": te_prefix, "text_encoder_2": "lora_te2"}[component]
            name = f"{prefix}_text_model_" + path.removeprefix("text_model.").replace(".", "_")
        state[f"{name}.lora_down.weight"] = down
        state[f"{name}.lora_up.weight"] = up
        state[f"{name}.alpha"] = torch.tensor(alpha)
    return state


@torch.no_grad()
def merge_by_hand(pipe, factors, scale=1.0, use_alpha=True):
    for (component, path), (down, up, alpha) in factors.items():
        weight = getattr(pipe, component).get_submodule(path).weight
        ratio = alpha / RANK if use_alpha else 1.0
        weight += scale * ratio * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)


def weights(pipe):
    return {f"{c}.{n}": p.detach().clone() for c in ("unet", "text_encoder")
            for n, p in getattr(pipe, c).named_parameters()}


def pointers(pipe):
    return {f"{c}.{n}": p.data_ptr() for c in ("unet", "text_encoder") for n, p in getattr(pipe, c).named_parameters()}


@pytest.fixture(scope="module")
def base_images(tiny_path):
    return generate(load(tiny_path))


# --- loading ------------------------------------------------------------------------------------


FORMATS = {"peft": peft_format, "diffusers": diffusers_format, "kohya": kohya_format}


@pytest.mark.parametrize("fmt", ["peft", "diffusers", "kohya", "peft-file", "kohya-file"])
def test_load_lora_matches_deltas_merged_by_hand(tiny_path, tmp_path, base_images, fmt):
    pipe = compiled(tiny_path)
    factors = lora_factors(pipe, seed=1)
    state = FORMATS[fmt.removesuffix("-file")](factors)
    if fmt.endswith("file"):
        save_file(state, tmp_path / "lora.safetensors")
        state = str(tmp_path / "lora.safetensors")
    assert load_lora(pipe, state, scale=0.8) == "default_0"
    reference = load(tiny_path)
    merge_by_hand(reference, factors, scale=0.8, use_alpha=fmt.startswith("kohya"))
    expected = generate(reference)
    assert relative_error(generate(pipe), expected) < TOL
    assert relative_error(expected, base_images) > 1e-2, "the test LoRA must change the image"


def test_sdxl_kohya_lora_with_both_text_encoders(tiny_sdxl_path):
    pipe = compiled(tiny_sdxl_path)
    layers = {
        "unet": ["down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q",
                 "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
                 "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
                 "down_blocks.0.resnets.0.conv2"],
        "text_encoder": ["encoder.layers.0.self_attn.k_proj"],
        # transformers 5: CLIPTextModelWithProjection keeps its `text_model` level, CLIPTextModel does not.
        "text_encoder_2": ["text_model.encoder.layers.1.self_attn.v_proj"],
    }
    factors = lora_factors(pipe, seed=2, layers=layers)
    load_lora(pipe, kohya_format(factors, te_prefix="lora_te1"))
    reference = load(tiny_sdxl_path)
    merge_by_hand(reference, factors)
    assert relative_error(generate(pipe), generate(reference)) < TOL


def test_sdxl_kohya_lora_in_sgm_block_names(tiny_sdxl_path):
    # kohya trains SDXL on Stability's UNet: input_blocks.3.1 is diffusers' down_blocks.1.attentions.0
    # in tiny-sdxl (one layer per block), input_blocks.1.0.in_layers.2 its first resnet's conv1.
    pipe = compiled(tiny_sdxl_path)
    sgm = {
        "input_blocks_3_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    }
    factors = lora_factors(pipe, seed=3, layers={"unet": list(sgm.values())})
    state = kohya_format(factors)
    for old, new in sgm.items():
        state = {k.replace("lora_unet_" + new.replace(".", "_"), "lora_unet_" + old): v for k, v in state.items()}
    load_lora(pipe, state)
    reference = load(tiny_sdxl_path)
    merge_by_hand(reference, factors)
    assert relative_error(generate(pipe), generate(reference)) < TOL


def test_alpha_from_diffusers_adapter_metadata(tiny_path, tmp_path):
    pipe = compiled(tiny_path)
    factors = lora_factors(pipe, seed=4, layers={"unet": UNET_LAYERS[:4]})
    metadata = {"lora_adapter_metadata": json.dumps({"unet.r": RANK, "unet.lora_alpha": 3 * RANK})}
    save_file(peft_format(factors), tmp_path / "lora.safetensors", metadata=metadata)
    load_lora(pipe, tmp_path / "lora.safetensors")
    reference = load(tiny_path)
    merge_by_hand(reference, factors, scale=3.0, use_alpha=False)
    assert relative_error(generate(pipe), generate(reference)) < TOL


@pytest.mark.parametrize("fmt", ["peft", "diffusers", "kohya"])
def test_load_lora_matches_diffusers_own_loader(tiny_path, fmt):
    pytest.importorskip("peft")
    pipe = compiled(tiny_path)
    factors = lora_factors(pipe, seed=5)
    state = FORMATS[fmt](factors)
    load_lora(pipe, state, scale=1.0)
    reference = load(tiny_path)
    reference.load_lora_weights(dict(state))
    assert relative_error(generate(pipe), generate(reference)) < TOL


# --- in place, exact undo -----------------------------------------------------------------------


def test_load_switch_and_unload_keep_weight_storage(tiny_path):
    pipe = compiled(tiny_path)
    before = pointers(pipe)
    attn = pipe.unet.get_submodule(f"{ATTENTION_BLOCK}.attn1")
    load_lora(pipe, peft_format(lora_factors(pipe, seed=1)), adapter_name="a")
    load_lora(pipe, kohya_format(lora_factors(pipe, seed=2)), adapter_name="b")
    set_lora_scales(pipe, {"a": 0.5})
    unload_lora(pipe, "a")
    load_lora(pipe, peft_format(lora_factors(pipe, seed=3)), adapter_name="c")
    unload_lora(pipe)
    assert pointers(pipe) == before
    assert attn.to_k.weight.data_ptr() == attn.to_qkv.weight[attn.to_q.weight.shape[0]:].data_ptr()


@pytest.mark.parametrize("change", ["load", "scale", "unload"])
def test_a_lora_change_from_another_thread_waits_for_the_running_call(tiny_path, change):
    # A merge in the middle of a call would give an image made half with the old weights and half with
    # the new ones. The change is asked for during the call's first step; the call must still equal one
    # made entirely before it.
    pipe = compiled(tiny_path)
    load_lora(pipe, peft_format(lora_factors(pipe, seed=1)), adapter_name="a")
    before = generate(pipe)
    started, finished = threading.Event(), threading.Event()
    actions = {"load": lambda: load_lora(pipe, peft_format(lora_factors(pipe, seed=2)), adapter_name="b"),
               "scale": lambda: set_lora_scales(pipe, {"a": 0.0}),
               "unload": lambda: unload_lora(pipe, "a")}
    changer = threading.Thread(target=lambda: (actions[change](), finished.set()))

    def on_step(pipe_, step, timestep, kwargs):
        if step == 0:
            changer.start()
            started.set()
            assert not finished.wait(0.5)  # still waiting for this call
        return kwargs

    during = pipe("a photo of a cat", num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step).images
    changer.join(timeout=60)
    assert started.is_set() and finished.is_set()
    assert abs(during - before).max() == 0
    assert abs(generate(pipe) - before).max() > 1e-3  # and the change did take effect after the call


def test_lora_reaches_the_fused_projection(tiny_path):
    pipe = compiled(tiny_path)
    attn = pipe.unet.get_submodule(f"{ATTENTION_BLOCK}.attn1")
    fused_before = attn.to_qkv.weight.detach().clone()
    load_lora(pipe, peft_format(lora_factors(pipe, seed=1)))
    rows = attn.to_q.weight.shape[0]
    assert not torch.equal(attn.to_qkv.weight[:rows], fused_before[:rows])
    assert torch.equal(attn.to_qkv.weight, torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]))


def test_lora_reaches_the_fused_projection_after_the_pipeline_moved(tiny_path):
    # `pipe.to(dtype)` after compiling gives to_q/k/v their own storage, no longer views of to_qkv.
    pipe = compiled(tiny_path)
    pipe.to(torch.float64)
    factors = lora_factors(pipe, seed=1)
    load_lora(pipe, peft_format(factors))
    reference = load(tiny_path).to(torch.float64)
    merge_by_hand(reference, factors, use_alpha=False)
    assert relative_error(generate(pipe), generate(reference)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_unload_restores_base_weights_bit_for_bit(tiny_path, dtype):
    pipe = compiled(tiny_path, dtype=dtype)
    original = weights(pipe)
    load_lora(pipe, peft_format(lora_factors(pipe, seed=1)), scale=0.7, adapter_name="a")
    load_lora(pipe, kohya_format(lora_factors(pipe, seed=2)), scale=1.3, adapter_name="b")
    for scales in ({"a": 0.1}, {"b": -2.0}, {"a": 1.0, "b": 0.0}):
        set_lora_scales(pipe, scales)
    assert any(not torch.equal(w, original[n]) for n, w in weights(pipe).items())
    unload_lora(pipe, "a")
    unload_lora(pipe, "b")
    for name, weight in weights(pipe).items():
        assert torch.equal(weight, original[name]), name


def test_two_adapters_with_scales(tiny_path):
    pipe = compiled(tiny_path)
    a, b = lora_factors(pipe, seed=1), lora_factors(pipe, seed=2)
    load_lora(pipe, peft_format(a), adapter_name="a")
    load_lora(pipe, kohya_format(b), scale=0.5, adapter_name="b")
    assert lora_scales(pipe) == {"a": 1.0, "b": 0.5}
    set_lora_scales(pipe, {"a": 0.3, "b": 1.2})
    assert lora_scales(pipe) == {"a": 0.3, "b": 1.2}
    reference = load(tiny_path)
    merge_by_hand(reference, a, scale=0.3, use_alpha=False)
    merge_by_hand(reference, b, scale=1.2)
    assert relative_error(generate(pipe), generate(reference)) < TOL


def test_switching_a_to_b_equals_loading_b_alone(tiny_path):
    switched, fresh = compiled(tiny_path), compiled(tiny_path)
    load_lora(switched, kohya_format(lora_factors(switched, seed=1)), adapter_name="a")
    unload_lora(switched, "a")
    load_lora(switched, peft_format(lora_factors(switched, seed=2)), adapter_name="b")
    load_lora(fresh, peft_format(lora_factors(fresh, seed=2)), adapter_name="b")
    fresh_weights = weights(fresh)
    for name, weight in weights(switched).items():
        assert torch.equal(weight, fresh_weights[name]), name


@pytest.mark.parametrize("a_layers, b_layers", [("all", "all"), ("unet", "all"), ("all", "unet")],
                         ids=["same-layers", "b-adapts-more", "b-adapts-fewer"])
def test_a_switch_in_one_step_equals_unloading_then_loading(tiny_path, a_layers, b_layers):
    # `load_lora(..., replacing=...)` gives each weight its base back and merges into it in one pass (on
    # CUDA, the next weight's copy overlaps this one's merge): the same bits as an unload, then a load.
    def factors(pipe, seed, which):
        return lora_factors(pipe, seed, {"unet": UNET_LAYERS} if which == "unet" else None)

    one_step, two_steps = compiled(tiny_path), compiled(tiny_path)
    base = weights(one_step)
    for pipe in (one_step, two_steps):
        load_lora(pipe, peft_format(factors(pipe, 1, a_layers)), adapter_name="a")
        load_lora(pipe, peft_format(factors(pipe, 3, "unet")), scale=0.5, adapter_name="kept")
    assert load_lora(one_step, peft_format(factors(one_step, 2, b_layers)), adapter_name="b", replacing="a") == "b"
    unload_lora(two_steps, "a")
    load_lora(two_steps, peft_format(factors(two_steps, 2, b_layers)), adapter_name="b")
    assert lora_scales(one_step) == lora_scales(two_steps) == {"kept": 0.5, "b": 1.0}
    expected = weights(two_steps)
    assert all(torch.equal(w, expected[n]) for n, w in weights(one_step).items())
    # And back, under the same name, then every adapter out: the base, bit for bit.
    load_lora(one_step, peft_format(factors(one_step, 1, a_layers)), adapter_name="b", replacing="b")
    unload_lora(one_step)
    assert all(torch.equal(w, base[n]) for n, w in weights(one_step).items())


def test_a_switch_in_one_step_that_fails_part_way_changes_nothing(tiny_path, monkeypatch):
    pipe = compiled(tiny_path)
    load_lora(pipe, peft_format(lora_factors(pipe, seed=1)), adapter_name="a")
    before = weights(pipe)
    with pytest.raises(LoraError, match="no LoRA named 'x'"):
        load_lora(pipe, peft_format(lora_factors(pipe, seed=2)), adapter_name="b", replacing=["a", "x"])
    calls = _fail_once_after(monkeypatch, 5)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        load_lora(pipe, peft_format(lora_factors(pipe, seed=2)), adapter_name="b", replacing="a")
    assert len(calls) > 5 and lora_scales(pipe) == {"a": 1.0}
    assert all(torch.equal(w, before[n]) for n, w in weights(pipe).items())


def test_switching_reuses_the_host_copies_of_the_base_weights(tiny_path, monkeypatch):
    import diffjet.lora as lora_module

    pipe = compiled(tiny_path)
    copies = []
    base_copies = lora_module._base_copies
    monkeypatch.setattr(lora_module, "_base_copies", lambda p, w, where: copies.extend(w) or base_copies(p, w, where))
    load_lora(pipe, peft_format(lora_factors(pipe, seed=1)), adapter_name="a")
    first = len(copies)
    assert first == len(UNET_LAYERS) + len(TEXT_ENCODER_LAYERS)
    unload_lora(pipe, "a")
    load_lora(pipe, peft_format(lora_factors(pipe, seed=2)), adapter_name="b")
    assert len(copies) == first


def test_base_copy_must_be_host_or_device(tiny_path):
    pipe = compiled(tiny_path)
    before = weights(pipe)
    with pytest.raises(LoraError, match="base_copy must be one of 'host', 'device', got 'gpu'"):
        load_lora(pipe, peft_format(lora_factors(pipe, seed=1)), base_copy="gpu")
    assert lora_scales(pipe) == {}
    assert all(torch.equal(w, before[n]) for n, w in weights(pipe).items())


def test_moving_the_base_copies_keeps_switches_and_unloads_exact(tiny_path):
    pipe, fresh = compiled(tiny_path), compiled(tiny_path)
    base = weights(pipe)
    load_lora(pipe, peft_format(lora_factors(pipe, seed=1)), adapter_name="a", base_copy="device")
    assert pipe._diffjet_lora.base_copy == "device"
    unload_lora(pipe, "a")
    load_lora(pipe, peft_format(lora_factors(pipe, seed=2)), adapter_name="b", base_copy="host")  # copies move
    load_lora(fresh, peft_format(lora_factors(fresh, seed=2)), adapter_name="b")
    assert pipe._diffjet_lora.base_copy == "host"
    fresh_weights = weights(fresh)
    assert all(torch.equal(w, fresh_weights[n]) for n, w in weights(pipe).items())
    unload_lora(pipe)
    assert all(torch.equal(w, base[n]) for n, w in weights(pipe).items())


def test_pinned_copies_share_buffers_instead_of_one_power_of_two_each():
    from diffjet.lora import _pack

    # A full Flux LoRA's weights (bf16): per double block 10 of 3072², 4 of 3072×12288 and back; per single
    # block 3 of 3072², 1 of 12288×3072 and 1 of 3072×15360.
    sizes = {}
    for block in range(19):
        sizes.update({(block, i): 3072 * 3072 * 2 for i in range(10)})
        sizes.update({(block, 10 + i): 3072 * 12288 * 2 for i in range(4)})
    for block in range(19, 57):
        sizes.update({(block, i): 3072 * 3072 * 2 for i in range(3)})
        sizes.update({(block, 3): 12288 * 3072 * 2, (block, 4): 3072 * 15360 * 2})
    sizes["huge"] = 3 * 2**30
    buffers = _pack(sizes)
    allocated = sum(1 << (used - 1).bit_length() for used, _ in buffers)  # what the pinned allocator takes
    one_each = sum(1 << (size - 1).bit_length() for size in sizes.values())
    assert allocated < 1.06 * sum(sizes.values()) + 2**30 < 0.75 * one_each
    placed = {}
    for used, members in buffers:
        assert used <= 2**30 or len(members) == 1
        spans = sorted((offset, offset + size) for _, offset, size in members)
        assert all(offset % 64 == 0 for offset, _ in spans)
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # no overlap
        assert spans[-1][1] <= used
        placed.update({key: size for key, _, size in members})
    assert placed == sizes


def test_device_copies_that_do_not_fit_are_refused_before_anything_is_allocated(monkeypatch):
    from diffjet.lora import _check_room

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 10 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 9 * gib)
    cuda = torch.device("cuda", 0)
    _check_room({cuda: 4 * gib})  # 3 GiB free on the card + 1 GiB free in PyTorch's pool
    with pytest.raises(LoraError, match=r"needs 4\.50 GiB more on cuda:0 .* 4\.00 GiB are free; base_copy='host'"):
        _check_room({cuda: 4 * gib + gib // 2})


def test_a_lora_file_is_parsed_once_until_it_changes(tiny_path, tmp_path, monkeypatch):
    import os

    import diffjet.lora as lora_module

    pipe = compiled(tiny_path)
    path = tmp_path / "a.safetensors"
    save_file(peft_format(lora_factors(pipe, seed=1)), path)
    reads = []
    read = lora_module._read_lora
    monkeypatch.setattr(lora_module, "_read_lora", lambda *a: reads.append(a[1]) or read(*a))
    load_lora(pipe, path, adapter_name="a")
    first = weights(pipe)
    unload_lora(pipe, "a")
    load_lora(pipe, str(path), adapter_name="a")  # same file, as a str: not parsed again
    assert len(reads) == 1
    assert all(torch.equal(w, first[n]) for n, w in weights(pipe).items())
    unload_lora(pipe, "a")
    save_file(peft_format(lora_factors(pipe, seed=2)), path)  # rewritten in place: read again
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1_000_000))
    load_lora(pipe, path, adapter_name="a")
    assert len(reads) == 2
    assert any(not torch.equal(w, first[n]) for n, w in weights(pipe).items())


def test_a_weight_changed_after_unloading_becomes_the_new_base(tiny_path):
    pipe = compiled(tiny_path)
    layer = pipe.unet.get_submodule(UNET_LAYERS[0])
    load_lora(pipe, peft_format(lora_factors(pipe, seed=1)), adapter_name="a")
    unload_lora(pipe, "a")
    with torch.no_grad():
        layer.weight.mul_(2.0)  # e.g. the user loads other weights into the layer
    changed = layer.weight.detach().clone()
    load_lora(pipe, peft_format(lora_factors(pipe, seed=2)), adapter_name="b")
    assert not torch.equal(layer.weight, changed)
    unload_lora(pipe, "b")
    assert torch.equal(layer.weight, changed)


def test_in_place_update_needs_no_recompile(tiny_path):
    # The compiled code reads the weights as inputs: a LoRA changes its output without a recompile.
    pipe = load(tiny_path)
    attention.apply(pipe.unet, Config())
    reference = UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet").eval()
    inductor.apply(pipe.unet, Config(backend="aot_eager"))
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor(500.0), torch.randn(2, 77, 32, generator=g))
    factors = lora_factors(pipe, seed=1, layers={"unet": UNET_LAYERS})
    try:
        with torch.no_grad():
            before = pipe.unet(*inputs, return_dict=False)[0]
            with torch._dynamo.config.patch(error_on_recompile=True):
                load_lora(pipe, peft_format(factors))
                after = pipe.unet(*inputs, return_dict=False)[0]
            merge_by_hand(types.SimpleNamespace(unet=reference), factors, use_alpha=False)
            expected = reference(*inputs, return_dict=False)[0]
    finally:
        torch._dynamo.reset()
    assert relative_error(after, expected) < 1e-5
    assert relative_error(before, expected) > 1e-3


# --- diffusers' own LoRA methods ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "pointer"),
    [
        ("load_lora_weights", "diffjet.load_lora"),
        ("set_adapters", "diffjet.set_lora_scales"),
        ("fuse_lora", "diffjet.load_lora"),
        ("unfuse_lora", "diffjet.unload_lora"),
        ("unload_lora_weights", "diffjet.unload_lora"),
    ],
)
def test_diffusers_lora_methods_of_a_compiled_pipeline_point_to_diffjet(tiny_path, method, pointer):
    pipe = compiled(tiny_path)
    forbid_diffusers_lora(pipe)  # what diffjet.compile calls
    with pytest.raises(LoraError, match=pointer):
        getattr(pipe, method)("some-lora")


def test_forbidding_diffusers_lora_changes_only_that_pipeline(tiny_path):
    pipe, other = compiled(tiny_path), load(tiny_path)
    forbid_diffusers_lora(pipe)
    assert "load_lora_weights" in vars(pipe) and "load_lora_weights" not in vars(other)
    assert StableDiffusionPipeline.load_lora_weights is type(other).load_lora_weights
    assert other.load_lora_weights.__func__ is StableDiffusionPipeline.load_lora_weights


def test_pipeline_holding_peft_lora_layers_is_refused(tiny_path):
    pytest.importorskip("peft")
    pipe = load(tiny_path)
    pipe.load_lora_weights(peft_format(lora_factors(pipe, seed=1)))
    with pytest.raises(LoraError, match="fuse_lora"):
        forbid_diffusers_lora(pipe)


# --- errors -------------------------------------------------------------------------------------

_Q = f"unet.{ATTENTION_BLOCK}.attn1.to_q"


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"unet.down_blocks.7.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 32),
          "unet.down_blocks.7.attentions.0.proj_in.lora_B.weight": torch.zeros(32, 4)}, "another architecture"),
        ({f"{_Q}.lora_A.weight": torch.zeros(4, 640), f"{_Q}.lora_B.weight": torch.zeros(32, 4)}, "do not fit"),
        ({f"{_Q}.lora_A.weight": torch.zeros(4, 32), f"{_Q}.lora_B.weight": torch.zeros(32, 8)}, "do not fit"),
        ({f"{_Q}.lora_A.weight": torch.zeros(4, 32)}, "no lora_B"),
        ({"transformer.blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32)}, "no component"),
        ({"unet.conv_in.weight": torch.zeros(32, 4, 3, 3)}, "unsupported LoRA key"),
        ({f"{_Q}.lora_A.weight": torch.zeros(4, 32), f"{_Q}.lora_B.weight": torch.zeros(32, 4),
          f"{_Q}.lora_magnitude_vector.weight": torch.zeros(32)}, "DoRA"),
        ({"text_encoder_2.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)}, "does not have"),
        ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 32)},
         "cannot read"),
        ({}, "no lora_A"),
    ],
    ids=["unknown-layer", "wrong-input-size", "rank-mismatch", "missing-up", "other-model", "not-lora",
         "dora", "missing-component", "kohya-without-up", "empty"],
)
def test_bad_lora_raises_lora_error_and_changes_nothing(tiny_path, state, message):
    pipe = compiled(tiny_path)
    original = weights(pipe)
    with pytest.raises(LoraError, match=message):
        load_lora(pipe, state)
    assert lora_scales(pipe) == {}
    assert all(torch.equal(w, original[n]) for n, w in weights(pipe).items())


@pytest.mark.parametrize("scale", ["abc", "0.5", None, True, float("nan"), float("inf")],
                         ids=["text", "number-as-text", "none", "bool", "nan", "inf"])
def test_a_scale_that_is_not_a_finite_number_raises_lora_error_and_changes_nothing(tiny_path, scale):
    pipe = compiled(tiny_path)
    original = weights(pipe)
    with pytest.raises(LoraError, match="scale of a LoRA must be a finite number"):
        load_lora(pipe, peft_format(lora_factors(pipe, seed=1)), scale=scale)
    assert lora_scales(pipe) == {} and all(torch.equal(w, original[n]) for n, w in weights(pipe).items())
    load_lora(pipe, peft_format(lora_factors(pipe, seed=1)), scale=0.5, adapter_name="a")
    merged = weights(pipe)
    with pytest.raises(LoraError, match="scale of LoRA 'a' must be a finite number"):
        set_lora_scales(pipe, {"a": scale})
    assert lora_scales(pipe) == {"a": 0.5} and all(torch.equal(w, merged[n]) for n, w in weights(pipe).items())


def _fail_once_after(monkeypatch, layers):
    """Make the merge fail when it reaches its layer number `layers` (as running out of memory would)."""
    import diffjet.lora as lora_module

    views, calls = lora_module._weight_views, []

    def failing(pipe, key):
        calls.append(key)
        if len(calls) == layers + 1:
            raise torch.cuda.OutOfMemoryError("injected after some layers")
        return views(pipe, key)

    monkeypatch.setattr(lora_module, "_weight_views", failing)
    return calls


@pytest.mark.parametrize("earlier", [False, True], ids=["first-adapter", "over-another"])
def test_a_load_that_fails_part_way_restores_every_weight_and_unregisters_the_adapter(tiny_path, monkeypatch,
                                                                                       earlier):
    pipe, clean = compiled(tiny_path), compiled(tiny_path)
    if earlier:
        load_lora(pipe, peft_format(lora_factors(pipe, seed=1)), scale=0.5, adapter_name="a")
        load_lora(clean, peft_format(lora_factors(clean, seed=1)), scale=0.5, adapter_name="a")
    before = weights(pipe)
    calls = _fail_once_after(monkeypatch, 5)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        load_lora(pipe, kohya_format(lora_factors(pipe, seed=2)), adapter_name="b")
    assert len(calls) > 5, "the failure came part-way, after some weights were written"
    assert lora_scales(pipe) == ({"a": 0.5} if earlier else {})
    assert all(torch.equal(w, before[n]) for n, w in weights(pipe).items()), "no weight is left half-merged"

    load_lora(pipe, kohya_format(lora_factors(pipe, seed=2)), adapter_name="b")  # a retry is not refused
    load_lora(clean, kohya_format(lora_factors(clean, seed=2)), adapter_name="b")
    clean_weights = weights(clean)
    assert all(torch.equal(w, clean_weights[n]) for n, w in weights(pipe).items())


@pytest.mark.parametrize("change", ["unload", "scales"])
def test_an_unload_or_new_scales_failing_part_way_change_nothing(tiny_path, monkeypatch, change):
    pipe = compiled(tiny_path)
    load_lora(pipe, peft_format(lora_factors(pipe, seed=1)), adapter_name="a")
    load_lora(pipe, kohya_format(lora_factors(pipe, seed=2)), scale=0.5, adapter_name="b")
    before = weights(pipe)
    _fail_once_after(monkeypatch, 5)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        unload_lora(pipe, "a") if change == "unload" else set_lora_scales(pipe, {"a": 2.0, "b": -1.0})
    assert lora_scales(pipe) == {"a": 1.0, "b": 0.5}
    assert all(torch.equal(w, before[n]) for n, w in weights(pipe).items())


def test_missing_file_unknown_adapter_and_taken_name_raise_lora_error(tiny_path, tmp_path):
    pipe = compiled(tiny_path)
    with pytest.raises(LoraError, match="no LoRA file"):
        load_lora(pipe, tmp_path / "missing.safetensors")
    load_lora(pipe, peft_format(lora_factors(pipe, seed=1)), adapter_name="a")
    with pytest.raises(LoraError, match="loaded already"):
        load_lora(pipe, peft_format(lora_factors(pipe, seed=2)), adapter_name="a")
    with pytest.raises(LoraError, match="no LoRA named 'b'"):
        unload_lora(pipe, "b")
    with pytest.raises(LoraError, match="no LoRA named 'b'"):
        set_lora_scales(pipe, {"b": 1.0})


# --- the random LoRA of diffjet.models ------------------------------------------------------------


def test_random_lora_adapts_every_attention_ff_and_text_layer_and_is_deterministic(tiny_path):
    from diffjet.models import lora_layers, random_lora

    pipe = load(tiny_path)
    layers = lora_layers(pipe)
    attentions = [n for n, m in pipe.unet.named_modules() if type(m).__name__ == "Attention"]
    assert len([p for p in layers["unet"] if p.endswith(".to_q")]) == len(attentions)
    assert any(p.endswith("ff.net.0.proj") for p in layers["unet"])
    assert any(p.endswith("mlp.fc2") for p in layers["text_encoder"])
    first, again, other = random_lora(pipe, seed=0), random_lora(pipe, seed=0), random_lora(pipe, seed=1)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first[next(iter(first))], other[next(iter(other))])
    # each delta's RMS is `strength` (0.05) of its weight's, within sampling noise
    path = layers["unet"][0]
    weight = pipe.unet.get_submodule(path).weight.float()
    delta = first[f"unet.{path}.lora_B.weight"].flatten(1) @ first[f"unet.{path}.lora_A.weight"].flatten(1)
    assert 0.03 < (delta.pow(2).mean().sqrt() / weight.pow(2).mean().sqrt()).item() < 0.07


def test_random_lora_through_diffjet_equals_diffusers_and_changes_the_image(tiny_path):
    pytest.importorskip("peft")
    from diffjet.models import random_lora

    pipe = compiled(tiny_path)
    base = generate(pipe)
    state = random_lora(pipe, seed=3)
    load_lora(pipe, state, scale=0.8)
    reference = load(tiny_path)
    reference.load_lora_weights(dict(state))
    reference.fuse_lora(lora_scale=0.8)
    with_lora = generate(pipe)
    assert relative_error(with_lora, generate(reference)) < TOL
    assert relative_error(with_lora, base) > 100 * TOL
