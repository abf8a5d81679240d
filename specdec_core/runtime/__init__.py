"""The serving runtime: the batched model runner and its KV layout, and the scheduler that decides which
rows run each iteration. The speculative math (sampling, verification, drafting, draft length) lives beside
it in ``specdec_core`` and knows nothing of scheduling.
"""
