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
