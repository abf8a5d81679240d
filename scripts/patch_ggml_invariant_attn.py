"""Batch-invariant flash attention at GEMM speed on the CPU (scripts/build_llamacpp.sh applies it).

Applied after scripts/patch_ggml_invariant.py (same source tree). That patch sends every query through
flash attention's reference path under GGML_CPU_BATCH_INVARIANT=1: each query walks its cells one by one
(an f16 dot product, an f16 multiply-add into an f16 accumulator and an exp per cell), so a prompt chunk of
n positions over c cached cells costs n * c of those, and a long conversation's new turn waits for it
(docs/benchmarks.md, "A six-turn chat"). Stock ggml's tiled kernel (64+ queries) does the same work as two
small f32 GEMMs per 64 x 64 tile, but it is not batch invariant: it runs only from 64 queries (fewer take
the reference path or, for one query over 512+ cells, a KV split across threads), and its tiles are cut at
fixed cell indices, so where a sequence's cells lie in the unified cache moves a query's online-softmax
rescaling points.

With GGML_CPU_BATCH_INVARIANT=1 (and GGML_CPU_INVARIANT_ATTN unset or 1) every query runs this kernel,
whatever the batch:

* a query's arithmetic is the stock tiled kernel's, per row: Q and K in f32, the score an fma chain over
  the head dimension (simd_gemm computes each element alone, in the same order for any number of rows),
  an online softmax per tile of 64 cells, and the output an fma chain over the tile's cells into an f32
  accumulator;
* the tiles are cut in the query's own list of visible cells (mask not -inf, in cell order), 64 at a
  time, not at fixed cell indices: masked cells never enter a tile, so another sequence's cells, and how
  many there are, change nothing;
* a tile's rows are the query heads that share a KV head (grouped-query attention) at consecutive
  positions whose visible lists are prefixes of one another (a causal chunk of one sequence): they share
  one f32 copy of each K and V tile. A row whose list is shorter sees the extra cells masked, which adds
  exact zeros, so a row computes the same bits in any group, alone or not. Positions that do not nest
  (other sequences) start a new group.

So a position's attention output depends on its own visible cells, in cell order, and nothing else (as
the reference path's did), and a prefill chunk runs at the tiled kernel's speed. Kernels, types or masks
it does not cover (a quantized KV cache, a mask per head) keep the reference path. Without
GGML_CPU_BATCH_INVARIANT the build is stock. Fails loudly if the source moved.

Usage: python patch_ggml_invariant_attn.py LLAMA_CPP_SOURCE_DIR   (after patch_ggml_invariant.py)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patch_ggml_invariant import apply  # noqa: E402

KERNEL = r"""
static bool ggml_cpu_specdec_invariant_attn(void) {
    static const bool on = [] {
        const char * env = getenv("GGML_CPU_INVARIANT_ATTN");
        return ggml_cpu_specdec_invariant_flag() && (env == nullptr || atoi(env) != 0);
    }();
    return on;
}

static inline bool ggml_specdec_fa_sees(const ggml_fp16_t * m, int64_t c) {
    return m == nullptr || GGML_CPU_FP16_TO_FP32(m[c]) != -INFINITY;
}

// every cell visible from position a is visible from b, and they come first among b's: a's visible list
// is a prefix of b's (the causal rows of one sequence)
static bool ggml_specdec_fa_nested(const ggml_fp16_t * ma, const ggml_fp16_t * mb, int64_t nek1) {
    if (ma == nullptr || mb == nullptr) {
        return ma == mb;
    }
    bool past_a = false;
    for (int64_t c = 0; c < nek1; ++c) {
        const bool va = ggml_specdec_fa_sees(ma, c);
        const bool vb = ggml_specdec_fa_sees(mb, c);
        if (va && (!vb || past_a)) {
            return false;
        }
        if (vb && !va) {
            past_a = true;
        }
    }
    return true;
}

// specdec: batch-invariant tiled flash attention (scripts/patch_ggml_invariant_attn.py). Returns false,
// having done nothing, where it does not apply (the same answer on every thread).
static bool ggml_compute_forward_flash_attn_ext_specdec(
        const ggml_compute_params * params,
        ggml_tensor * dst) {
    const ggml_tensor * q     = dst->src[0];
    const ggml_tensor * k     = dst->src[1];
    const ggml_tensor * v     = dst->src[2];
    const ggml_tensor * mask  = dst->src[3];
    const ggml_tensor * sinks = dst->src[4];

    GGML_TENSOR_LOCALS(int64_t, neq, q,   ne)
    GGML_TENSOR_LOCALS(size_t,  nbq, q,   nb)
    GGML_TENSOR_LOCALS(int64_t, nek, k,   ne)
    GGML_TENSOR_LOCALS(size_t,  nbk, k,   nb)
    GGML_TENSOR_LOCALS(int64_t, nev, v,   ne)
    GGML_TENSOR_LOCALS(size_t,  nbv, v,   nb)
    GGML_TENSOR_LOCALS(int64_t, ne,  dst, ne)
    GGML_TENSOR_LOCALS(size_t,  nb,  dst, nb)

    static constexpr int64_t QT = ggml_fa_tile_config::Q;
    static constexpr int64_t KT = ggml_fa_tile_config::KV;

    if (q->type != GGML_TYPE_F32 || k->type != v->type ||
        (k->type != GGML_TYPE_F16 && k->type != GGML_TYPE_F32) ||
        (mask != nullptr && (mask->type != GGML_TYPE_F16 || mask->ne[2] != 1)) ||
        nek2 != nev2 || nek3 != nev3 || neq2 % nek2 != 0 || neq3 % nek3 != 0 || neq2 / nek2 > QT) {
        return false;
    }

    const int64_t DK = nek0;
    const int64_t DV = nev0;
    const int64_t N  = neq1;
    const int64_t G  = neq2 / nek2;  // query heads per KV head: one tile's rows share its K and V
    const int64_t P  = QT / G;       // positions per work item
    const int64_t rk3 = neq3 / nek3;

    float scale         = 1.0f;
    float max_bias      = 0.0f;
    float logit_softcap = 0.0f;

    memcpy(&scale,         (float *) dst->op_params + 0, sizeof(float));
    memcpy(&max_bias,      (float *) dst->op_params + 1, sizeof(float));
    memcpy(&logit_softcap, (float *) dst->op_params + 2, sizeof(float));

    if (logit_softcap != 0) {
        scale /= logit_softcap;
    }

    const uint32_t n_head      = neq2;
    const uint32_t n_head_log2 = 1u << (uint32_t) floor(log2(n_head));

    const float m0 = powf(2.0f, -(max_bias       ) / n_head_log2);
    const float m1 = powf(2.0f, -(max_bias / 2.0f) / n_head_log2);

    const int ith = params->ith;
    const int nth = params->nth;

    // the stock tiled kernel's per-thread scratch (ggml_graph_plan reserves it)
    float * base   = (float *) params->wdata + ith*(QT*DK + 2*QT*KT + QT*DV + KT*DV + KT*DK + CACHE_LINE_SIZE_F32);
    float * Q_f32  = base;
    float * KQ     = Q_f32 + QT*DK;
    float * mask32 = KQ + QT*KT;
    float * VKQ32  = mask32 + QT*KT;
    float * V32    = VKQ32 + QT*DV;
    float * K_f32  = V32 + KT*DV;

    float   S[QT];
    float   M[QT];
    float   slope[QT];
    bool    skip[QT];
    int64_t cells[KT];

    const int64_t nblk  = (N + P - 1) / P;
    const int64_t nwork = neq3*nek2*nblk;

    for (int64_t w = ith; w < nwork; w += nth) {
        const int64_t iq3 = w / (nek2*nblk);
        const int64_t ik2 = (w / nblk) % nek2;
        const int64_t ik3 = iq3 / rk3;
        const int64_t p0  = (w % nblk)*P;
        const int64_t p1  = std::min(p0 + P, N);

        auto mask_row = [&](int64_t iq1) -> const ggml_fp16_t * {
            return mask ? (const ggml_fp16_t *)((const char *) mask->data + iq1*mask->nb[1] + (iq3%mask->ne[3])*mask->nb[3]) : nullptr;
        };

        for (int64_t s = p0; s < p1; ) {
            int64_t e = s;  // positions s..e: each one's visible cells a prefix of the next one's
            while (e + 1 < p1 && ggml_specdec_fa_nested(mask_row(e), mask_row(e + 1), nek1)) {
                ++e;
            }
            const int64_t R = (e - s + 1)*G;  // rows: (position, query head of this KV head)
            const ggml_fp16_t * mlast = mask_row(e);

            for (int64_t r = 0; r < R; ++r) {
                const int64_t iq1 = s + r / G;
                const int64_t iq2 = ik2*G + r % G;
                const float * pq = (const float *) ((const char *) q->data + (iq1*nbq1 + iq2*nbq2 + iq3*nbq3));
                memcpy(Q_f32 + r*DK, pq, DK*sizeof(float));
                const uint32_t h = iq2;
                slope[r] = (max_bias > 0.0f) ? h < n_head_log2 ? powf(m0, h + 1) : powf(m1, 2*(h - n_head_log2) + 1) : 1.0f;
                S[r] = 0.0f;
                M[r] = -INFINITY;
            }
            memset(VKQ32, 0, R*DV*sizeof(float));

            int64_t c = 0;  // the next cell to look at
            while (true) {
                // the next KT cells the last position sees (the others see a prefix of its list)
                int64_t n = 0;
                for (; c < nek1 && n < KT; ++c) {
                    if (ggml_specdec_fa_sees(mlast, c)) {
                        cells[n++] = c;
                    }
                }
                if (n == 0) {
                    break;
                }

                if (mask) {
                    for (int64_t r = 0; r < R; ++r) {
                        const ggml_fp16_t * mp = mask_row(s + r / G);
                        for (int64_t t = 0; t < n; ++t) {
                            mask32[r*KT + t] = slope[r]*GGML_CPU_FP16_TO_FP32(mp[cells[t]]);
                        }
                        for (int64_t t = n; t < KT; ++t) {
                            mask32[r*KT + t] = -INFINITY;
                        }
                    }
                }

                // K tile transposed (K_f32[dk][t]) and V tile, f32, zero past n
                for (int64_t t = 0; t < n; ++t) {
                    const char * k_data = (const char *) k->data + cells[t]*nbk1 + ik2*nbk2 + ik3*nbk3;
                    const char * v_data = (const char *) v->data + cells[t]*nbv1 + ik2*nbv2 + ik3*nbv3;
                    if (k->type == GGML_TYPE_F16) {
                        const ggml_fp16_t * k_f16 = (const ggml_fp16_t *) k_data;
                        for (int64_t dk = 0; dk < DK; dk++) {
                            K_f32[dk*KT + t] = GGML_CPU_FP16_TO_FP32(k_f16[dk]);
                        }
                        ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) v_data, V32 + t*DV, DV);
                    } else {
                        const float * k_src = (const float *) k_data;
                        for (int64_t dk = 0; dk < DK; dk++) {
                            K_f32[dk*KT + t] = k_src[dk];
                        }
                        memcpy(V32 + t*DV, v_data, DV*sizeof(float));
                    }
                }
                if (n < KT) {
                    for (int64_t dk = 0; dk < DK; dk++) {
                        memset(K_f32 + dk*KT + n, 0, (KT - n)*sizeof(float));
                    }
                    memset(V32 + n*DV, 0, (KT - n)*DV*sizeof(float));
                }

                memset(KQ, 0, R*KT*sizeof(float));
                simd_gemm(KQ, Q_f32, K_f32, R, DK, KT);
                ggml_vec_scale_f32(R*KT, KQ, scale);

                if (logit_softcap != 0.0f) {
                    ggml_vec_tanh_f32(R*KT, KQ, KQ);
                    ggml_vec_scale_f32(R*KT, KQ, logit_softcap);
                }

                if (n < KT) {
                    for (int64_t r = 0; r < R; ++r) {
                        for (int64_t t = n; t < KT; ++t) {
                            KQ[r*KT + t] = -INFINITY;
                        }
                    }
                }

                if (mask) {
                    ggml_vec_add_f32(R*KT, KQ, KQ, mask32);
                }

                for (int64_t r = 0; r < R; ++r) {
                    float * kq_row = KQ + r*KT;

                    float tile_max;
                    ggml_vec_max_f32(KT, &tile_max, kq_row);

                    skip[r] = tile_max == -INFINITY;
                    if (skip[r]) {
                        memset(kq_row, 0, KT*sizeof(float));
                        continue;
                    }

                    const float Mold = M[r];
                    const float Mnew = fmaxf(Mold, tile_max);

                    if (Mnew > Mold) {
                        const float ms = expf(Mold - Mnew);
                        ggml_vec_scale_f32(DV, VKQ32 + r*DV, ms);
                        S[r] *= ms;
                    }
                    M[r] = Mnew;

                    S[r] += ggml_vec_soft_max_f32(KT, kq_row, kq_row, Mnew);
                }

                simd_gemm(VKQ32, KQ, V32, R, KT, DV);
            }

            for (int64_t r = 0; r < R; ++r) {
                const int64_t iq1 = s + r / G;
                const int64_t iq2 = ik2*G + r % G;

                if (sinks) {
                    const float sv = ((const float *) sinks->data)[iq2];

                    float ms = 1.0f;
                    float vs = 1.0f;

                    if (sv > M[r]) {
                        ms = expf(M[r] - sv);
                        ggml_vec_scale_f32(DV, VKQ32 + r*DV, ms);
                    } else {
                        vs = expf(sv - M[r]);
                    }

                    S[r] = S[r]*ms + vs;
                }

                const float S_inv = S[r] == 0.0f ? 0.0f : 1.0f/S[r];
                ggml_vec_scale_f32(DV, VKQ32 + r*DV, S_inv);

                // permute(0, 2, 1, 3)
                memcpy((char *) dst->data + (iq3*ne2*ne1 + iq2 + iq1*ne1)*nb1, VKQ32 + r*DV, nb1);
            }

            s = e + 1;
        }
    }
    return true;
}

static void ggml_compute_forward_flash_attn_ext_f16(
"""

EDITS = {
    "ggml/src/ggml-cpu/ops.cpp": [
        (
            "\nstatic void ggml_compute_forward_flash_attn_ext_f16(\n",
            KERNEL,
        ),
        (
            "    // When use_ref is set, force the vec-only reference implementation (no tiling, no KV-chunking)\n",
            "    if (ggml_cpu_specdec_invariant_attn() && ggml_compute_forward_flash_attn_ext_specdec(params, dst)) {\n"
            "        return;\n"
            "    }\n\n"
            "    // When use_ref is set, force the vec-only reference implementation (no tiling, no KV-chunking)\n",
        ),
    ],
}


def main(root: str) -> int:
    apply(root, EDITS, "ggml_compute_forward_flash_attn_ext_specdec")
    print(f"patched {root}: batch-invariant tiled flash attention")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
