"""The profile summary: kernels sorted by name, overlapping kernels counted once, idle = the rest."""

import pytest

from train.profile import IDLE, classify, summarize_trace


@pytest.mark.parametrize("name, category", [
    ("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NTN", "gemm"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>", "attention"),
    ("void transformer_engine::detail::cast_transpose_fused_kernel<...>", "fp8 cast"),
    ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", "compiled"),
    ("void at::native::multi_tensor_apply_kernel<...FusedAdamMathFunctor...>", "optimizer"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel...>", "other kernels"),
])
def test_kernel_names_fall_into_their_category(name, category):
    assert classify(name) == category


def test_summary_counts_overlaps_once_and_the_rest_as_idle():
    kernel = lambda name, ts, dur: {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}  # noqa: E731
    events = [kernel("nvjet_gemm", 0, 600), kernel("triton_poi_fused", 400, 400),  # overlap 400..600
              {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 1000, "dur": 100},
              {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5000},  # host side: not GPU time
              kernel("flash_fwd", 1500, 500)]
    summary = summarize_trace(events, window_us=4000, steps=2)
    assert summary["ms_per_step"]["gemm"] == pytest.approx(0.3)
    assert summary["ms_per_step"]["copies"] == pytest.approx(0.05)
    busy = 800 + 100 + 500  # 0..800, 1000..1100, 1500..2000
    assert summary["share"][IDLE] == pytest.approx((4000 - busy) / 4000)
    assert summary["window_ms_per_step"] == pytest.approx(2.0)


def test_top_kernels_are_the_costliest_names_summed_over_calls():
    kernel = lambda name, ts, dur: {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}  # noqa: E731
    events = [kernel("nvjet_a", 0, 100), kernel("flash_fwd", 100, 150), kernel("nvjet_a", 300, 100)]
    top = summarize_trace(events, window_us=1000, steps=1)["top_kernels"]
    assert [(k["name"], k["category"]) for k in top] == [("nvjet_a", "gemm"), ("flash_fwd", "attention")]
    assert top[0]["ms_per_step"] == pytest.approx(0.2)
