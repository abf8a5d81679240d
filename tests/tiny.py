"""The tiny models of the tests live with the load test that uses them too (benchmarks/tiny.py)."""

from benchmarks.tiny import (  # noqa: F401
    FAMILIES,
    hf_greedy,
    perturbed,
    save_tiny,
    save_tiny_gguf,
    tiny_model,
    tiny_tokenizer,
)
