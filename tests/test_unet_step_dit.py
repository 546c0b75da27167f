"""bench/unet_step.py on DiTs (tiny-flux, tiny-sd3), on CPU: the step inputs it records are the pipeline's own,
diffjet's passes fuse the joint attention and keep the step's output, the torch-compile recipe fuses QKV only
where diffusers' fused attention is exact, a DiT profile's kernel names fall in the right categories, and
the FLOPs count every Linear layer as GEMM work."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from diffjet.bench import recipes
from diffjet.models import load_pipeline

from .conftest import relative_error

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "unet_step.py"
_SPEC = importlib.util.spec_from_file_location("unet_step", SCRIPT)
unet_step = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(unet_step)

DITS = ["tiny-flux", "tiny-sd3"]


@pytest.fixture(scope="module")
def pipes(_preset_cache):
    return {name: load_pipeline(name, device="cpu", dtype=torch.float32) for name in DITS}


def step(name):
    """The preset's transformer (float32, CPU) and one image's step inputs at 64²."""
    return unet_step.step_inputs(name, 64, unet_step.default_batch(name), device="cpu")


@pytest.mark.parametrize(("name", "component", "batch"), [
    ("flux-dev", "transformer", 1), ("flux-schnell", "transformer", 1), ("sd35-medium", "transformer", 2),
    ("tiny-flux", "transformer", 1), ("tiny-sd3", "transformer", 2), ("sd15", "unet", 2), ("sdxl", "unet", 2)])
def test_dits_step_their_transformer_at_one_images_batch(name, component, batch):
    assert (unet_step.component(name), unet_step.default_batch(name)) == (component, batch)


@pytest.mark.parametrize(("name", "height", "batch", "shape"), [
    ("tiny-flux", 64, 1, (1, 16, 64)), ("tiny-flux", 128, 2, (2, 64, 64)),  # packed 2×2 latent patches
    ("tiny-sd3", 64, 2, (2, 16, 8, 8)), ("tiny-sd3", 128, 4, (4, 16, 16, 16))])
def test_recorded_inputs_give_the_transformers_output_in_the_pipeline(pipes, name, height, batch, shape):
    pipe = pipes[name]
    outputs = []
    handle = pipe.transformer.register_forward_hook(lambda module, args, out: outputs.append(out[0].clone()))
    try:
        args, kwargs = unet_step.dit_inputs(pipe, height, batch)
    finally:
        handle.remove()
    assert tuple(kwargs["hidden_states"].shape) == shape and kwargs["return_dict"] is False
    with torch.no_grad():
        again = pipe.transformer(*args, **kwargs)[0]
    assert len(outputs) == 1 and torch.equal(again, outputs[0])


@pytest.mark.parametrize(("name", "height", "batch"), [("tiny-flux", 64, 1), ("tiny-flux", 128, 2), ("tiny-sd3", 64, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_few_blocks_step_on_the_pipelines_inputs_shapes_and_dtypes(pipes, name, height, batch, dtype):
    pipe = pipes[name] if dtype == torch.float32 else load_pipeline(name, device="cpu", dtype=dtype)
    _, recorded = unet_step.dit_inputs(pipe, height, batch)
    transformer, args, kwargs = unet_step.synthetic_dit_step(name, height, batch, (1, 2), device="cpu", dtype=dtype)
    assert args == () and kwargs.keys() == recorded.keys()
    for key, value in recorded.items():
        if torch.is_tensor(value):
            assert (kwargs[key].shape, kwargs[key].dtype) == (value.shape, value.dtype), key
        else:
            assert kwargs[key] == value, key
    if name == "tiny-flux":  # the rotary embedding's positions: rows, then columns of the packed latents
        assert torch.equal(kwargs["img_ids"], recorded["img_ids"])
        assert (len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)) == (1, 2)
    else:
        assert len(transformer.transformer_blocks) == 1
    with torch.no_grad():
        assert transformer(*args, **kwargs)[0].shape == recorded["hidden_states"].shape


def test_sd3_batch_is_whole_images_of_two_rows(pipes):
    with pytest.raises(ValueError, match="2 rows per image"):
        unet_step.dit_inputs(pipes["tiny-sd3"], 64, 3)


@pytest.mark.slow  # a few seconds each: the default run stays within its time
@pytest.mark.parametrize("name", DITS)
def test_diffjets_passes_fuse_the_joint_attention_and_keep_the_step(name):
    transformer, args, kwargs = step(name)
    with torch.no_grad():
        want = transformer(*args, **kwargs)[0]
        assert unet_step.prepared(transformer, "transformer") is transformer
        got = transformer(*args, **kwargs)[0]
    attentions = [m for m in transformer.modules() if hasattr(m, "to_q")]
    assert attentions and all(hasattr(m, "to_qkv") for m in attentions)
    # Token sequences: no channels-last (SD3's patch embedding stays NCHW), and no half precision off CUDA.
    assert not any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                   for p in transformer.parameters())
    assert {p.dtype for p in transformer.parameters()} == {torch.float32}
    assert relative_error(got, want) < 1e-5


@pytest.mark.slow  # a few seconds each: the default run stays within its time
@pytest.mark.parametrize(("name", "fused"), [("tiny-flux", True), ("tiny-sd3", False)])  # SD 3.5's QK norms
def test_torch_compile_recipe_fuses_qkv_where_diffusers_fused_attention_is_exact(name, fused):
    transformer, args, kwargs = step(name)
    with torch.no_grad():
        want = transformer(*args, **kwargs)[0]
    compiled, fused_qkv = recipes.compiled_denoiser(transformer, "transformer", "reduce-overhead")
    assert fused_qkv == fused
    assert compiled._orig_mod is transformer
    assert any(getattr(m, "fused_projections", False) for m in transformer.modules()) == fused
    with torch.no_grad():
        assert relative_error(transformer(*args, **kwargs)[0], want) < 1e-5


# Kernel names of bf16 DiT steps on Hopper: cuBLAS (nvjet, xmma, gemv, split-K), CUTLASS, cuDNN's and flash
# SDPA, PyTorch's memory-efficient attention, Inductor's Triton kernels (Flux's RoPE and SD 3.5's QK norms
# fused into SDPA's inputs), ATen's kernels and the driver's copies.
KERNELS = {
    "gemm": [
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_bias_TNT",
        "nvjet_sm90_tst_64x8_64x16_4x1_v_bz_bias_TNT",
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off"
         "_kernel__5x_cublas"),
        ("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128_warpgroupsize1x1x1_execute_segment_k_off"
         "_kernel__5x_cublas"),
        ("cutlass3x_sm90_tensorop_gemm_bf16_bf16_f32_bf16_bf16_128x256x64_1x2x1_0_tnn_align8_warpspecialized"
         "_cooperative_epi_tma"),
        ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x1_tn_align8>"
         "(cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x1_tn_align8::Params)"),
        "ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x4_tn",
        ("void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128, 16, 4, 4, false, false, "
         "cublasGemvParamsEx<int, cublasGemvTensorStridedBatched<__nv_bfloat16 const>, "
         "cublasGemvTensorStridedBatched<__nv_bfloat16 const>, cublasGemvTensorStridedBatched<__nv_bfloat16>, "
         "float> >(cublasGemvParamsEx<int, cublasGemvTensorStridedBatched<__nv_bfloat16 const>, "
         "cublasGemvTensorStridedBatched<__nv_bfloat16 const>, cublasGemvTensorStridedBatched<__nv_bfloat16>, "
         "float>, float, float)"),
        ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, true, "
         "false, false>(cublasLt::cublasSplitKParams<float>, float const*, __nv_bfloat16 const*, "
         "__nv_bfloat16*, float const*, float const*, __nv_bfloat16 const*, float const*, __nv_bfloat16*, "
         "void*, long, float*, int*)"),
        "triton_tem_fused_addmm_gelu_0",
    ],
    "attention": [
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_bf16_knob_7_64x128x128_4x1x1_cga1x1x1_kernel0_0",
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, "
         "cutlass::bfloat16_t, Flash_kernel_traits<128, 128, 64, 4, cutlass::bfloat16_t> >, false, false, "
         "false, false, true, true, false, false>(pytorch_flash::Flash_fwd_params)"),
        ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t, "
         "cutlass::arch::Sm80, true, 64, 128, 128, true, true>::Params)"),
    ],
    "normalisation": [
        "_qk_norm_rope",  # diffjet's Flux kernel: the QK norms, rotary embedding and layout
        "triton_per_fused_native_layer_norm_3",
        "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_7",
        "triton_per_fused__scaled_dot_product_cudnn_attention__to_copy_add_mean_mul_pow_rsqrt_12",
        ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>(int, float, "
         "c10::BFloat16 const*, c10::BFloat16 const*, c10::BFloat16 const*, float*, float*, c10::BFloat16*)"),
    ],
    "elementwise": [
        "triton_poi_fused_add_mul_5",
        "triton_poi_fused_gelu_mul_9",
        "triton_poi_fused__scaled_dot_product_cudnn_attention_add_cat_mul_stack_11",
        ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl(at::TensorIteratorBase&, "
         "at::native::GeluType)::{lambda()#2}::operator()() const::{lambda()#4}::operator()() const::"
         "{lambda(c10::BFloat16)#1}, std::array<char*, 2ul> >(int, at::native::GeluCUDAKernelImpl(at::"
         "TensorIteratorBase&, at::native::GeluType)::{lambda()#2}::operator()() const::{lambda()#4}::operator()() "
         "const::{lambda(c10::BFloat16)#1}, std::array<char*, 2ul>)"),
    ],
    "copies/layout": [
        "triton_poi_fused_clone_2",
        "triton_poi_fused_cat_8",
        "triton_poi_fused__to_copy_1",
        "triton_poi_fused_split_with_sizes_4",
        "triton_poi_fused__scaled_dot_product_cudnn_attention_6",
        "triton_poi_fused__scaled_dot_product_flash_attention_clone_13",
        ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType"
         "<2u>, unsigned int, 3, 128, 1>(at::native::(anonymous namespace)::OpaqueType<2u>*, at::native::"
         "(anonymous namespace)::CatArrInputTensorMetadata<at::native::(anonymous namespace)::OpaqueType<2u>, "
         "unsigned int, 128, 1>, at::native::(anonymous namespace)::TensorSizeStride<unsigned int, 4u>, int, "
         "unsigned int)"),
        "Memcpy DtoD (Device -> Device)",
    ],
    "convolution": [  # SD3's patch embedding
        ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nchw_tilesize128x128x64_warpgroupsize1x1x1"
         "_g1_execute_segment_k_off_kernel__5x_cudnn"),
    ],
}


@pytest.mark.parametrize(("kernel", "expected"), [(k, c) for c, names in KERNELS.items() for k in names])
def test_dit_kernel_names_fall_in_their_categories(kernel, expected):
    assert unet_step.category(kernel) == expected


def test_idle_time_is_the_gaps_between_kernels_within_a_step():
    flash = "kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90FlashAttentionForwardSm90"
    gemm = "nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN"
    step = [(0, 100, gemm), (104, 150, "_qk_norm_rope"), (160, 400, flash),
            (390, 395, "Memset (Unknown)"), (401, 500, gemm)]  # a memset inside the attention: no gap
    replays = step + [(start + 5000, end + 5000, name) for start, end, name in step]  # the host between them
    idle = unet_step.idle_between_kernels(replays, reps=2, between_steps_us=1000)
    assert idle["idle_ms"] == pytest.approx(0.015)
    assert idle["idle_by_next_category_ms"] == {"attention": 0.01, "normalisation": 0.004, "gemm": 0.001}
    top = idle["idle_top_pairs"][0]
    assert top["pair"].startswith("_qk_norm_rope -> kernel_cutlass") and top["count"] == 1 and top["us_each"] == 10


@pytest.mark.slow  # a few seconds each: the default run stays within its time
@pytest.mark.parametrize("name", DITS)
def test_flops_count_every_linear_layer_as_gemm_work(name):
    transformer, args, kwargs = step(name)
    unet_step.prepared(transformer, "transformer")
    macs = []

    def count(layer, inputs, output):
        macs.append(inputs[0].numel() // layer.in_features * layer.in_features * layer.out_features)

    handles = [m.register_forward_hook(count) for m in transformer.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            tflop = unet_step.flops_by_category(transformer, args, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    assert tflop["gemm"] == pytest.approx(2 * sum(macs) / 1e12, rel=1e-12)
    assert "other" not in tflop and ("convolution" in tflop) == (name == "tiny-sd3")  # SD3's patch embedding


def test_the_in_place_accumulations_baseline_computes_the_same_projection():
    # `inductor-dit-kernels-addmm` times the copy `diffjet::addmm_into` removed: it must be the same projection.
    from diffjet.passes import kernels as kernel_pass

    g = torch.Generator().manual_seed(0)
    proj = nn.Linear(6 + 10, 4)
    attn, mlp = torch.randn(2, 3, 6, generator=g), torch.randn(2, 3, 10, generator=g)
    with torch.no_grad():
        want = proj(torch.cat([attn, mlp], -1))
        for split in (kernel_pass.split_projection, unet_step._split_projection_with_copy):
            assert relative_error(split(attn, mlp, proj), want) < 1e-6
