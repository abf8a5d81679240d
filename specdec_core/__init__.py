"""specdec core: the transport-free speculative decoding engine.

Sampling, the rejection rule, drafting policies, model runners with persistent KV caches, model
provisioning and the generation loop. Imports neither grpc nor generated protobuf code; the services
and the client import this package, never the other way round.
"""

_EXPORTS = {
    "DraftBlock": "drafting",
    "Drafter": "drafting",
    "DrafterUnavailable": "drafting",
    "ModelDrafter": "drafting",
    "Chunk": "stopping",
    "GenerationStats": "stats",
    "SpeculativeDecoder": "decoder",
    "StopCriteria": "stopping",
    "TargetSession": "target",
    "ModelRunner": "runtime.backends.torch_eager",
    "Row": "runtime.interface",
    "Sequence": "runtime.interface",
    "Scheduler": "runtime.scheduler",
    "SamplingParams": "params",
    "SparseDist": "sampling",
    "logits_to_probs": "sampling",
    "Verdict": "verification",
    "verify_greedy": "verification",
    "verify_sampled": "verification",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # imported on first use: ``specdec_core.params`` must not pull torch into a light client
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'specdec_core' has no attribute {name!r}")
