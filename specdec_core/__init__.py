"""specdec core: the transport-free speculative decoding engine.

Sampling, the rejection rule, drafting policies, model runners with persistent KV caches, model
provisioning and the generation loop. Imports neither grpc nor generated protobuf code; the services
and the client import this package, never the other way round.
"""

from .drafting import DraftBlock, Drafter, DrafterUnavailable, ModelDrafter
from .engine import Chunk, GenerationStats, SpeculativeDecoder, StopCriteria, TargetSession
from .runtime.runner import ModelRunner, Row, Sequence
from .runtime.scheduler import Scheduler
from .sampling import SamplingParams, SparseDist, logits_to_probs
from .verification import Verdict, verify_greedy, verify_sampled

__all__ = [
    "Chunk",
    "DraftBlock",
    "Drafter",
    "DrafterUnavailable",
    "GenerationStats",
    "ModelDrafter",
    "ModelRunner",
    "Row",
    "SamplingParams",
    "Scheduler",
    "Sequence",
    "SparseDist",
    "SpeculativeDecoder",
    "StopCriteria",
    "TargetSession",
    "Verdict",
    "logits_to_probs",
    "verify_greedy",
    "verify_sampled",
]
