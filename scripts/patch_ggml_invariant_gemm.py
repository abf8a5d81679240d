"""Batch-invariant repacked matmul at GEMM speed on x86 (scripts/build_llamacpp.sh applies it).

Applied after scripts/patch_ggml_invariant.py (same source tree). That patch makes every position of a
repacked weight run the GEMV kernel under GGML_CPU_BATCH_INVARIANT=1, because stock ggml's GEMM (groups of
4 positions) and GEMV (the rest) round differently. On x86 AVX2/AVX512 the two differ in one place only:

* Q4_K 8x8 (ggml_gemm/gemv_q4_K_8x8_q8_K, arch/x86/repack.cpp): the integer dot products are exact in
  both (int16 partial sums of at most 16 products of 4-bit x 8-bit values, int32 after the 6-bit sub-block
  scales), and both apply the scales as fma(float(isum), d_w * d_a, acc); but the GEMM does that fma once
  per 64 values (each pair of 32-value sub-blocks, for the scaled sums and for the min/bsums term), the
  GEMV once per 256-value super-block, after adding the four 64-value integer sums.
* Q4_0 8x8 (gemm/gemv_q4_b32_8x8_q8_0_lut_avx): already identical (one fma per 32-value block in both).
* activation quantization: groups of 4 positions go through ggml_quantize_mat_q8_K_4x8 (AVX2), single
  positions through quantize_row_q8_K (= the scalar reference on x86). Same values except when a 256-value
  block holds both +amax and -amax: the reference takes the sign of the first one, the AVX2 code the
  positive one (a different sign of d, hence different int8 values). Q8_0 (quantize_row_q8_0 vs
  ggml_quantize_mat_q8_0_4x8) uses the same AVX arithmetic in both.

With GGML_CPU_BATCH_INVARIANT=1 this patch, for Q4_K and Q4_0 8x8 on AVX2 builds only:

* the GEMV accumulates in floating point per 64 values, as the GEMM does (2 fma more per 64 values; the
  kernel is memory bound at one position), so a position's bits are the GEMM's whatever the width;
* groups of 4 positions run the stock GEMM (and its stock AVX2 4-row quantizer) again;
* Q4_K: the positions left over (width % 4, a lone decode position) are quantized by that same 4-row
  quantizer (the row given 4 times) and taken out of its layout, so a position's int8 values and scale
  do not depend on whether it sat in a group of 4 (this costs a few microseconds a row).

Other repacked types (and non-x86 builds) keep the all-GEMV path of patch_ggml_invariant.py;
GGML_CPU_INVARIANT_GEMM=0 also keeps it (and the stock GEMV arithmetic) for every type. Without
GGML_CPU_BATCH_INVARIANT the build is stock. Fails loudly if the source moved.

Usage: python patch_ggml_invariant_gemm.py LLAMA_CPP_SOURCE_DIR   (after patch_ggml_invariant.py)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patch_ggml_invariant import FLAG, apply  # noqa: E402

GEMM_FLAG = """
static bool ggml_cpu_specdec_invariant_gemm(void) {
    static const bool on = [] {
        const char * env = getenv("GGML_CPU_INVARIANT_GEMM");
        return ggml_cpu_specdec_invariant_flag() && (env == nullptr || atoi(env) != 0);
    }();
    return on;
}
"""

EXACT_QUANT = """
// specdec: a lone row quantized by the GEMM's 4-row quantizer (the row's super-block given 4 times), then
// taken out of the 4-row layout (ggml_quantize_mat_q8_K_4x8_generic's): the values that row gets inside a
// group of 4. quantize_row_q8_K (the reference) differs when a block holds both +amax and -amax.
static void ggml_specdec_quantize_row_q8_K_as_4x8(const float * GGML_RESTRICT x, void * GGML_RESTRICT vy, int64_t k) {
    block_q8_K * GGML_RESTRICT y = (block_q8_K *) vy;
    float buf[4 * QK_K];
    block_q8_Kx4 t;
    for (int64_t i = 0; i < k / QK_K; i++) {
        for (int row = 0; row < 4; row++) {
            memcpy(buf + row * QK_K, x + i * QK_K, QK_K * sizeof(float));
        }
        ggml_quantize_mat_q8_K_4x8(buf, &t, QK_K);
        y[i].d = t.d[0];
        for (int j = 0; j < QK_K; j++) {
            y[i].qs[j] = t.qs[(j / 8) * 32 + (j % 8)];
        }
        for (int g = 0; g < QK_K / 16; g++) {
            y[i].bsums[g] = t.bsums[(g / 4) * 16 + (g % 4)];
        }
    }
}

"""

GEMM_EXACT_MEMBER = """
    // specdec: the GEMM gives each column exactly the bits of the (patched) GEMV and of a lone column
    static bool specdec_gemm_exact() {
#if defined(__AVX2__)
        if constexpr (INTER_SIZE == 8 && NB_COLS == 8 &&
                      ((std::is_same_v<BLOC_TYPE, block_q4_K> && PARAM_TYPE == GGML_TYPE_Q8_K) ||
                       (std::is_same_v<BLOC_TYPE, block_q4_0> && PARAM_TYPE == GGML_TYPE_Q8_0))) {
            return ggml_cpu_specdec_invariant_gemm();
        }
#endif
        return false;
    }

    void forward_mul_mat_one_chunk("""

EDITS = {
    "ggml/src/ggml-cpu/repack.cpp": [
        (FLAG, FLAG + GEMM_FLAG),
        (
            '} // extern "C"\n\ntemplate <int64_t INTER_SIZE, ggml_type PARAM_TYPE>\nvoid ggml_quantize_mat_t(',
            '} // extern "C"\n'
            + EXACT_QUANT
            + "template <int64_t INTER_SIZE, ggml_type PARAM_TYPE>\nvoid ggml_quantize_mat_t(",
        ),
        ("\n    void forward_mul_mat_one_chunk(", GEMM_EXACT_MEMBER),
        (
            "        const int64_t nrows4 = ggml_cpu_specdec_invariant_flag() ? 0 : nrows - (nrows % 4);\n",
            "        const int64_t nrows4 = ggml_cpu_specdec_invariant_flag() && !specdec_gemm_exact() ? 0 : nrows - (nrows % 4);\n",
        ),
        (
            "            const int64_t n4 = ggml_cpu_specdec_invariant_flag() ? 0 : ne11 - ne11 % 4;\n",
            "            const bool specdec_exact = ggml_cpu_specdec_invariant_flag() && specdec_gemm_exact();\n"
            "            const int64_t n4 = ggml_cpu_specdec_invariant_flag() && !specdec_exact ? 0 : ne11 - ne11 % 4;\n",
        ),
        (
            "            for (int64_t i11 = i11_processed + ith; i11 < ne11; i11 += nth) {\n"
            "                from_float((float *) (data_ptr + i11 * nb11), (void *) (wdata_ptr + i11 * nbw1), ne10);\n",
            "            for (int64_t i11 = i11_processed + ith; i11 < ne11; i11 += nth) {\n"
            "                if constexpr (INTER_SIZE == 8 && PARAM_TYPE == GGML_TYPE_Q8_K) {\n"
            "                    if (specdec_exact) {\n"
            "                        ggml_specdec_quantize_row_q8_K_as_4x8((float *) (data_ptr + i11 * nb11), (void *) (wdata_ptr + i11 * nbw1), ne10);\n"
            "                        continue;\n"
            "                    }\n"
            "                }\n"
            "                from_float((float *) (data_ptr + i11 * nb11), (void *) (wdata_ptr + i11 * nbw1), ne10);\n",
        ),
    ],
    "ggml/src/ggml-cpu/arch/x86/repack.cpp": [
        (
            "#define UNUSED GGML_UNUSED\n",
            "#define UNUSED GGML_UNUSED\n" + FLAG + GEMM_FLAG,
        ),
        # ggml_gemv_q4_K_8x8_q8_K: fma per 64 values (each sb), as ggml_gemm_q4_K_8x8_q8_K does
        (
            "    const block_q4_Kx8 * b_ptr_start = (const block_q4_Kx8 *)vx;\n"
            "    const block_q8_K * a_ptr_start = (const block_q8_K *)vy;\n"
            "\n"
            "    // Process Q8_K blocks one by one\n",
            "    const block_q4_Kx8 * b_ptr_start = (const block_q4_Kx8 *)vx;\n"
            "    const block_q8_K * a_ptr_start = (const block_q8_K *)vy;\n"
            "    const bool specdec_sb_fma = ggml_cpu_specdec_invariant_gemm();\n"
            "\n"
            "    // Process Q8_K blocks one by one\n",
        ),
        (
            "                    // Accumulate for the complete block\n"
            "                    iacc_b = _mm256_add_epi32(iacc_b, iacc_sb);\n"
            "                    iacc_min_b = _mm256_add_epi32(iacc_min_b, iacc_min_sb);\n"
            "                }\n"
            "\n"
            "                // Multiply-Add with scale values for the complete super block\n"
            "                acc_row = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc_b), _mm256_mul_ps(col_scale_f32, row_scale_f32), acc_row);\n"
            "                acc_min_rows = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc_min_b), _mm256_mul_ps(col_dmin_f32, row_scale_f32), acc_min_rows);\n",
            "                    if (specdec_sb_fma) {\n"
            "                        acc_row = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc_sb), _mm256_mul_ps(col_scale_f32, row_scale_f32), acc_row);\n"
            "                        acc_min_rows = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc_min_sb), _mm256_mul_ps(col_dmin_f32, row_scale_f32), acc_min_rows);\n"
            "                        continue;\n"
            "                    }\n"
            "                    // Accumulate for the complete block\n"
            "                    iacc_b = _mm256_add_epi32(iacc_b, iacc_sb);\n"
            "                    iacc_min_b = _mm256_add_epi32(iacc_min_b, iacc_min_sb);\n"
            "                }\n"
            "\n"
            "                if (!specdec_sb_fma) {\n"
            "                // Multiply-Add with scale values for the complete super block\n"
            "                acc_row = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc_b), _mm256_mul_ps(col_scale_f32, row_scale_f32), acc_row);\n"
            "                acc_min_rows = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc_min_b), _mm256_mul_ps(col_dmin_f32, row_scale_f32), acc_min_rows);\n"
            "                }\n",
        ),
    ],
}


def main(root: str) -> int:
    if "ggml_cpu_specdec_invariant_flag" not in (Path(root) / "ggml/src/ggml-cpu/repack.cpp").read_text():
        raise SystemExit("ggml/src/ggml-cpu/repack.cpp: run patch_ggml_invariant.py first")
    apply(root, EDITS, "ggml_cpu_specdec_invariant_gemm")
    print(f"patched {root}: GGML_CPU_BATCH_INVARIANT GEMM for Q4_K/Q4_0 8x8 on AVX2")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
