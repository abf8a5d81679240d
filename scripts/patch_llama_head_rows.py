"""A drafter's LM head cut to its most frequent tokens: llama.cpp computes the first ``specdec.head_rows``
rows of ``output.weight`` when the GGUF file says so.

The 0.5B drafter's output layer is 151,936 rows of 896 weights (145 MB in Q8_0): measured with ``perf``
on 2 threads it is a third of a drafting step, for tokens that almost never come up. A drafting file
(``specdec_core/runtime/backends/draft_file.py``) orders the head's rows by how often their tokens occur
and stores ``specdec.head_rows`` (u32); with this patch llama.cpp then multiplies only those rows (a view
of the weight, no copy) and writes each output's logits to the first ``head_rows`` floats of its row,
the rest -inf, so a caller reads token ``ids[j]``'s logit at column ``j``. Files without the key (every
target, every stock GGUF) run as before. The head is left whole where it is repacked or has a bias or a
scale (the view would not fit them; drafting files have none). Fails loudly if the source moved.

Usage: python patch_llama_head_rows.py LLAMA_CPP_SOURCE_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patch_ggml_invariant import apply  # noqa: E402

HPARAMS_OLD = """struct llama_hparams {
"""
HPARAMS_NEW = """struct llama_hparams {
    // specdec (scripts/patch_llama_head_rows.py): LM head rows computed (0: all), from specdec.head_rows
    uint32_t n_head_rows = 0;

"""

LOAD_OLD = """    // get general kv
    ml.get_key(LLM_KV_GENERAL_NAME, name, false);
"""
LOAD_NEW = """    // specdec (scripts/patch_llama_head_rows.py): a drafting file's head rows
    {
        const int64_t kid = gguf_find_key(ctx, "specdec.head_rows");
        if (kid >= 0 && gguf_get_kv_type(ctx, kid) == GGUF_TYPE_UINT32) {
            hparams.n_head_rows = gguf_get_val_u32(ctx, kid);
        }
    }

    // get general kv
    ml.get_key(LLM_KV_GENERAL_NAME, name, false);
"""

MM_OLD = """          ggml_tensor * w_s) const {
    ggml_tensor * res = ggml_mul_mat(ctx0, w, cur);
"""
MM_NEW = """          ggml_tensor * w_s) const {
    // specdec (scripts/patch_llama_head_rows.py): only the head's first n_head_rows rows (a view)
    if (hparams.n_head_rows > 0 && w->ne[1] > (int64_t) hparams.n_head_rows && w->extra == nullptr &&
        w_s == nullptr && strcmp(w->name, "output.weight") == 0) {
        w = ggml_view_2d(ctx0, w, w->ne[0], hparams.n_head_rows, w->nb[1], 0);
    }
    ggml_tensor * res = ggml_mul_mat(ctx0, w, cur);
"""

COPY_OLD = """                ggml_backend_tensor_get_async(backend_res, t_logits, logits_out, 0, n_outputs*n_vocab*sizeof(float));
            }
        }
"""
COPY_NEW = """                if (t_logits->ne[0] < n_vocab) {
                    // specdec (scripts/patch_llama_head_rows.py): a cut head's rows, the rest of each row -inf
                    const int64_t n_rows = t_logits->ne[0];
                    for (int64_t i = 0; i < n_outputs; ++i) {
                        ggml_backend_tensor_get_async(backend_res, t_logits, logits_out + i*n_vocab, i*t_logits->nb[1], n_rows*sizeof(float));
                        std::fill(logits_out + i*n_vocab + n_rows, logits_out + (i + 1)*n_vocab, -INFINITY);
                    }
                } else {
                    ggml_backend_tensor_get_async(backend_res, t_logits, logits_out, 0, n_outputs*n_vocab*sizeof(float));
                }
            }
        }
"""

EDITS = {
    "src/llama-hparams.h": [(HPARAMS_OLD, HPARAMS_NEW)],
    "src/llama-model.cpp": [(LOAD_OLD, LOAD_NEW)],
    "src/llama-graph.cpp": [(MM_OLD, MM_NEW)],
    "src/llama-context.cpp": [(COPY_OLD, COPY_NEW)],
}


def main(root: str) -> int:
    apply(root, EDITS, "patch_llama_head_rows")
    print(f"patched {root}: a drafting file's LM head computes its first specdec.head_rows rows")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
