"""Q6_K weights times 4 positions at once, each position's bits those of the one-position kernel (x86 AVX2).

ggml multiplies Q6_K weights that are not repacked (the Qwen pair's output layer, some ``ffn_down`` and
``attn_v``: a third of the Q4_K_M file's bytes) one weight row by one position at a time
(``ggml_vec_dot_q6_K_q8_K``). With 4 positions each weight block is unpacked from its 4 + 2 bit layout 4
times: measured on the 1.5B target, 2 threads, the Q6_K share of a forward grew from 23 ms at one position
to 43 ms at 4 (the verifier keeps llama.cpp's tiled K-quant kernel off, ``GGML_CPU_TILED_MM=0``, because
it rounds differently from the one-position kernel).

This patch adds ``ggml_vec_dot_q6_K_q8_K_x4``: one weight row against 4 positions, the block unpacked once
and each position's integer sums and its one fma per block done exactly as ``ggml_vec_dot_q6_K_q8_K``'s
AVX2 path does them, so every position gets the same bits it gets alone. ``mul_mat`` uses it for groups of
4 consecutive positions of contiguous (quantized) activations; the rest go one by one as before. It
changes speed, not numbers, so it is on in every process of the build (``GGML_CPU_Q6K_X4=0`` turns it
off). Fails loudly if the source moved.

Usage: python patch_ggml_q6k_columns.py LLAMA_CPP_SOURCE_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patch_ggml_invariant import apply  # noqa: E402

KERNEL = r"""
#if defined __AVX2__
// specdec (scripts/patch_ggml_q6k_columns.py): one Q6_K row against 4 q8_K columns, by bytes apart; each
// column's arithmetic is ggml_vec_dot_q6_K_q8_K's AVX2 path, the weights unpacked once for the 4
void ggml_vec_dot_q6_K_q8_K_x4(int n, float * GGML_RESTRICT s, const void * GGML_RESTRICT vx, const void * GGML_RESTRICT vy, size_t by) {
    assert(n % QK_K == 0);

    const block_q6_K * GGML_RESTRICT x = vx;
    const block_q8_K * GGML_RESTRICT y[4];
    for (int c = 0; c < 4; ++c) {
        y[c] = (const block_q8_K *) ((const char *) vy + c*by);
    }

    const int nb = n / QK_K;

    const __m256i m3 = _mm256_set1_epi8(3);
    const __m256i m15 = _mm256_set1_epi8(15);

    __m256 acc[4];
    for (int c = 0; c < 4; ++c) {
        acc[c] = _mm256_setzero_ps();
    }

    for (int i = 0; i < nb; ++i) {

        const float xd = GGML_CPU_FP16_TO_FP32(x[i].d);

        const uint8_t * GGML_RESTRICT q4 = x[i].ql;
        const uint8_t * GGML_RESTRICT qh = x[i].qh;

        const __m128i scales = _mm_loadu_si128((const __m128i*)x[i].scales);
        const __m256i scales_16 = _mm256_cvtepi8_epi16(scales);

        __m256i sumi[4];
        for (int c = 0; c < 4; ++c) {
            sumi[c] = _mm256_setzero_si256();
        }

        int is = 0;

        for (int j = 0; j < QK_K/128; ++j) {
            const __m256i q4bits1 = _mm256_loadu_si256((const __m256i*)q4); q4 += 32;
            const __m256i q4bits2 = _mm256_loadu_si256((const __m256i*)q4); q4 += 32;
            const __m256i q4bitsH = _mm256_loadu_si256((const __m256i*)qh); qh += 32;

            const __m256i q4h_0 = _mm256_slli_epi16(_mm256_and_si256(q4bitsH, m3), 4);
            const __m256i q4h_1 = _mm256_slli_epi16(_mm256_and_si256(q4bitsH, _mm256_set1_epi8(12)), 2);
            const __m256i q4h_2 = _mm256_and_si256(q4bitsH, _mm256_set1_epi8(48));
            const __m256i q4h_3 = _mm256_srli_epi16(_mm256_and_si256(q4bitsH, _mm256_set1_epi8(-64)), 2);

            const __m256i q4_0 = _mm256_or_si256(_mm256_and_si256(q4bits1, m15), q4h_0);
            const __m256i q4_1 = _mm256_or_si256(_mm256_and_si256(q4bits2, m15), q4h_1);
            const __m256i q4_2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4bits1, 4), m15), q4h_2);
            const __m256i q4_3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4bits2, 4), m15), q4h_3);

            const __m256i sc_0 = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, get_scale_shuffle(is + 0)));
            const __m256i sc_1 = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, get_scale_shuffle(is + 1)));
            const __m256i sc_2 = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, get_scale_shuffle(is + 2)));
            const __m256i sc_3 = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, get_scale_shuffle(is + 3)));
            is += 4;

            for (int c = 0; c < 4; ++c) {
                const int8_t * GGML_RESTRICT q8 = y[c][i].qs + j*128;

                const __m256i q8_0 = _mm256_loadu_si256((const __m256i*)(q8 +  0));
                const __m256i q8_1 = _mm256_loadu_si256((const __m256i*)(q8 + 32));
                const __m256i q8_2 = _mm256_loadu_si256((const __m256i*)(q8 + 64));
                const __m256i q8_3 = _mm256_loadu_si256((const __m256i*)(q8 + 96));

                const __m256i p16_0 = _mm256_madd_epi16(sc_0, _mm256_maddubs_epi16(q4_0, q8_0));
                const __m256i p16_1 = _mm256_madd_epi16(sc_1, _mm256_maddubs_epi16(q4_1, q8_1));
                const __m256i p16_2 = _mm256_madd_epi16(sc_2, _mm256_maddubs_epi16(q4_2, q8_2));
                const __m256i p16_3 = _mm256_madd_epi16(sc_3, _mm256_maddubs_epi16(q4_3, q8_3));

                sumi[c] = _mm256_add_epi32(sumi[c], _mm256_add_epi32(p16_0, p16_1));
                sumi[c] = _mm256_add_epi32(sumi[c], _mm256_add_epi32(p16_2, p16_3));
            }
        }

        for (int c = 0; c < 4; ++c) {
            const float d = y[c][i].d * xd;
            const __m256i q8sums = _mm256_loadu_si256((const __m256i*)y[c][i].bsums);
            const __m256i q8sclsub = _mm256_slli_epi32(_mm256_madd_epi16(q8sums, scales_16), 5);
            const __m256i si = _mm256_sub_epi32(sumi[c], q8sclsub);
            acc[c] = _mm256_fmadd_ps(_mm256_broadcast_ss(&d), _mm256_cvtepi32_ps(si), acc[c]);
        }
    }

    for (int c = 0; c < 4; ++c) {
        s[c] = hsum_float_8(acc[c]);
    }
}
#endif

void ggml_vec_dot_q6_K_q8_K(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc) {
"""

DECL = """void ggml_vec_dot_q6_K_q8_K(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);
// specdec (scripts/patch_ggml_q6k_columns.py): x86 AVX2 builds only
void ggml_vec_dot_q6_K_q8_K_x4(int n, float * GGML_RESTRICT s, const void * GGML_RESTRICT vx, const void * GGML_RESTRICT vy, size_t by);
"""

SWITCH = """
#if defined(__AVX2__)
// specdec (scripts/patch_ggml_q6k_columns.py): Q6_K rows times 4 positions at once, the same bits
static bool ggml_specdec_q6k_x4(void) {
    static int on = -1;
    if (on < 0) {
        const char * env = getenv("GGML_CPU_Q6K_X4");
        on = env == NULL || atoi(env) != 0;
    }
    return on != 0;
}
#endif

static void ggml_compute_forward_mul_mat_one_chunk(
"""

LOOP_OLD = """    // attempt to reduce false-sharing (does not seem to make a difference)
    // 16 * 2, accounting for mmla kernels
    float tmp[32];
"""

LOOP_NEW = """    // attempt to reduce false-sharing (does not seem to make a difference)
    // 16 * 2, accounting for mmla kernels
    float tmp[32];

#if defined(__AVX2__)
    if (type == GGML_TYPE_Q6_K && num_rows_per_vec_dot == 1 && (src1_cont || src1->type != vec_dot_type) &&
        ggml_specdec_q6k_x4()) {
        float tmp4[4*16];
        for (int64_t iir1 = ir1_start; iir1 < ir1_end; iir1 += blck_1) {
            for (int64_t iir0 = ir0_start; iir0 < ir0_end; iir0 += blck_0) {
                const int64_t ir0_stop = MIN(iir0 + blck_0, ir0_end);
                const int64_t ir1_stop = MIN(iir1 + blck_1, ir1_end);
                for (int64_t ir1 = iir1; ir1 < ir1_stop; ) {
                    const int64_t i13 = (ir1 / (ne12 * ne1));
                    const int64_t i12 = (ir1 - i13 * ne12 * ne1) / ne1;
                    const int64_t i11 = (ir1 - i13 * ne12 * ne1 - i12 * ne1);
                    const int64_t nc = MIN(MIN(4, ir1_stop - ir1), ne1 - i11);  // columns of one i12, i13

                    const char * src0_row = (const char*)src0->data + ((i12 / r2) * nb02 + (i13 / r3) * nb03);
                    const char * src1_col = (const char*)wdata + (i11 + i12 * ne11 + i13 * ne12 * ne11) * row_size;

                    if (nc == 4) {
                        float t4[4];
                        for (int64_t ir0 = iir0; ir0 < ir0_stop; ++ir0) {
                            ggml_vec_dot_q6_K_q8_K_x4(ne00, t4, src0_row + ir0 * nb01, src1_col, row_size);
                            for (int c = 0; c < 4; ++c) {
                                tmp4[c*16 + (ir0 - iir0)] = t4[c];
                            }
                        }
                    } else {
                        for (int64_t c = 0; c < nc; ++c) {
                            for (int64_t ir0 = iir0; ir0 < ir0_stop; ++ir0) {
                                vec_dot(ne00, &tmp4[c*16 + (ir0 - iir0)], 0, src0_row + ir0 * nb01, 0, src1_col + c * row_size, 0, 1);
                            }
                        }
                    }
                    for (int64_t c = 0; c < nc; ++c) {
                        float * dst_col = (float*)((char*)dst->data + ((i11 + c) * nb1 + i12 * nb2 + i13 * nb3));
                        memcpy(&dst_col[iir0], tmp4 + c*16, (ir0_stop - iir0) * sizeof(float));
                    }
                    ir1 += nc;
                }
            }
        }
        return;
    }
#endif
"""

EDITS = {
    "ggml/src/ggml-cpu/arch/x86/quants.c": [
        (
            "\nvoid ggml_vec_dot_q6_K_q8_K(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc) {\n",
            KERNEL,
        ),
    ],
    "ggml/src/ggml-cpu/quants.h": [
        (
            "void ggml_vec_dot_q6_K_q8_K(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);\n",
            DECL,
        ),
    ],
    "ggml/src/ggml-cpu/ggml-cpu.c": [
        ("\nstatic void ggml_compute_forward_mul_mat_one_chunk(\n", SWITCH),
        (LOOP_OLD, LOOP_NEW),
    ],
}


def main(root: str) -> int:
    apply(root, EDITS, "ggml_vec_dot_q6_K_q8_K_x4")
    print(f"patched {root}: Q6_K times 4 positions at once (AVX2)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
