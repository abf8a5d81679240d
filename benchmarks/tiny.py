"""Tiny random-config models and a tiny trained tokenizer, built in process (never downloaded): the test
suite's models and the load test's (`specdec loadtest`)."""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

FAMILIES = ("llama", "qwen2", "gpt2")

_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "The quick brown fox jumps over the lazy dog.",
    "import numpy as np\nx = np.zeros((3, 4))\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "Speculative decoding drafts tokens with a small model and verifies them with a large one.",
] * 20


@lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocab ~ 400) trained on a few lines of code and prose."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def tiny_model(family: str, seed: int = 0, layers: int = 2, hidden: int = 64) -> Any:
    """A random-weight causal LM of ``family`` over the tiny tokenizer's vocabulary."""
    vocab = len(tiny_tokenizer())
    torch.manual_seed(seed)
    if family in ("llama", "qwen2"):
        config_cls, model_cls = (
            (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config, Qwen2ForCausalLM)
        )
        cfg = config_cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
        model: Any = model_cls(cfg)  # type: ignore[arg-type]
    elif family == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=512)
        )
    else:
        raise ValueError(family)
    model.generation_config.pad_token_id = tiny_tokenizer().eos_token_id
    return model.eval()


def perturbed(model: Any, scale: float, seed: int = 1) -> Any:
    """A copy of ``model`` with Gaussian noise on every weight: a drafter that agrees often, not always."""
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std().clamp_min(1e-3))
    return draft.eval()


def save_tiny(family: str, path: Path, seed: int = 0, noise: float = 0.0) -> Path:
    """Save a tiny model (optionally a perturbed copy) with the tokenizer, loadable by name=path."""
    model = tiny_model(family, seed=seed)
    if noise:
        model = perturbed(model, noise)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The target's own greedy output (generated ids only), the reference for losslessness."""
    out = model.generate(
        torch.tensor([prompt_ids]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        eos_token_id=None,
    )
    return out[0, len(prompt_ids) :].tolist()


GGUF_FAMILIES = ("qwen2", "llama")  # GPT-2's fused attention weights are not written


def _permute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-half q/k rows to llama.cpp's interleaved pairs (what convert_hf_to_gguf.py does)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def save_tiny_gguf(
    family: str, path: Path, seed: int = 0, noise: float = 0.0, qtype: str = "Q4_1"
) -> tuple[Path, Any]:
    """Write the tiny ``family`` model as a GGUF file (``qtype`` matrices, F32 norms and biases, the tiny
    tokenizer's vocabulary) at ``path``, with the tokenizer saved beside it; return the path and the
    dense model holding the very weights the file does (dequantised), the reference for its logits.

    Q4_1 is never repacked by llama.cpp and multiplied position by position at any width; Q4_0 is
    repacked on x86 (the kernels of the built-in Q4_K models), which the patched build keeps invariant
    (``runtime/backends/llamacpp.py``).
    """
    import gguf
    import numpy as np

    if family not in GGUF_FAMILIES:
        raise ValueError(f"GGUF writer covers {GGUF_FAMILIES}, not {family!r}")
    model = tiny_model(family, seed=seed)
    if noise:
        model = perturbed(model, noise)
    cfg, tok = model.config, tiny_tokenizer()
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), family)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    quant = gguf.GGMLQuantizationType[qtype]
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{qtype}"])
    _add_vocab(writer, tok)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    state = model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if key in names:
                name = names[key]
            else:
                _, _, layer, rest = key.split(".", 3)
                base = next(k for k in per_layer if rest.startswith(k))
                name = f"blk.{layer}.{per_layer[base]}{rest[len(base) :]}"
            data = value.float()
            if family == "llama" and (".attn_q." in name or ".attn_k." in name):
                heads = cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads
                data = _permute_rope(data, heads)
            if data.ndim == 2:  # quantized, and the dense model gets the values the file holds
                q = gguf.quants.quantize(data.numpy(), quant)
                writer.add_tensor(name, q, raw_dtype=quant)
                back = torch.from_numpy(gguf.quants.dequantize(q, quant).copy())
                if family == "llama" and (".attn_q." in name or ".attn_k." in name):
                    back = _unpermute_rope(back, heads)
                value.copy_(back.reshape(value.shape))
            else:
                writer.add_tensor(name, data.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tok.save_pretrained(path.parent)
    return path, model


def _unpermute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_vocab(writer: Any, tok: PreTrainedTokenizerFast) -> None:
    """The tokenizer's byte-level BPE as llama.cpp reads it (tokens by id, their types, merges)."""
    import json

    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["id"] for t in spec["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if i in special else 1 for _, i in vocab])  # 3: control
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_bos_token_id(tok.bos_token_id)
