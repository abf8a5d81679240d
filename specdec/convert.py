"""Conversions between protocol messages and core types (pure functions, no I/O)."""

from __future__ import annotations

import torch

from specdec import placement
from specdec.v1 import specdec_pb2 as pb
from specdec.wire import sampling_from_pb, sampling_to_pb, stats_from_pb  # noqa: F401 - re-exported
from specdec_core.drafting import CONFIDENCE_BINS, DraftBlock, EarlyStop
from specdec_core.models import vocab_by_id
from specdec_core.sampling import SparseDist
from specdec_core.stats import GenerationStats
from specdec_core.stopping import StopCriteria


def stop_from_pb(
    msg: pb.StopConditions, eos_token_id: int | None, default_max_new_tokens: int
) -> StopCriteria:
    eos = frozenset() if msg.ignore_eos or eos_token_id is None else frozenset({eos_token_id})
    return StopCriteria(
        max_new_tokens=int(msg.max_new_tokens) or default_max_new_tokens,
        eos_token_ids=eos,
        stop_strings=tuple(s for s in msg.stop if s),
    )


def dist_to_pb(dist: SparseDist) -> pb.SparseDistribution:
    return pb.SparseDistribution(token_ids=dist.token_ids.tolist(), probs=dist.probs.tolist())


def dist_from_pb(msg: pb.SparseDistribution) -> SparseDist:
    if len(msg.token_ids) != len(msg.probs) or not msg.token_ids:
        raise ValueError("a sparse distribution needs as many probs as token ids, and at least one")
    return SparseDist(
        token_ids=torch.tensor(list(msg.token_ids), dtype=torch.long),
        probs=torch.tensor(list(msg.probs), dtype=torch.float32),
    )


def early_stop_from_pb(step: pb.DraftStep) -> EarlyStop:
    if not 0.0 <= step.stop_below <= 1.0:
        raise ValueError("stop_below must be in [0, 1]")
    table = tuple(float(a) for a in step.acceptance_by_confidence)
    if table and len(table) != CONFIDENCE_BINS:
        raise ValueError(f"acceptance_by_confidence needs {CONFIDENCE_BINS} entries (or none)")
    return EarlyStop(below=float(step.stop_below), acceptance=table)


def block_to_pb(block: DraftBlock) -> pb.DraftResponse:
    return pb.DraftResponse(
        tokens=block.tokens,
        dists=[dist_to_pb(d) for d in block.dists],
        draft_s=block.draft_s,
        confidences=block.confidences,
    )


def block_from_pb(msg: pb.DraftResponse | pb.VerifyRequest) -> DraftBlock:
    if isinstance(msg, pb.DraftResponse):
        tokens, dists, draft_s = list(msg.tokens), list(msg.dists), msg.draft_s
        confidences = list(msg.confidences) if len(msg.confidences) == len(tokens) else []
    else:
        tokens, dists, draft_s, confidences = list(msg.draft_tokens), list(msg.draft_dists), 0.0, []
    return DraftBlock(
        tokens=tokens, dists=[dist_from_pb(d) for d in dists], draft_s=draft_s, confidences=confidences
    )


def stats_to_pb(stats: GenerationStats) -> pb.GenerationStats:
    d = stats.to_dict()
    sources, copying = d.pop("drafter_source"), d.pop("lookup_copying")
    msg = pb.GenerationStats(**{k: d[k] for k in pb.GenerationStats.DESCRIPTOR.fields_by_name if k in d})
    msg.lookup_copying.CopyFrom(pb.SourceStats(**copying))
    for source, counts in sources.items():
        msg.drafter_source[source].CopyFrom(pb.SourceStats(**counts))
    return msg


def lookup_info_to_pb(name: str, sessions: int) -> pb.InfoResponse:
    """Info of a drafter serving prompt lookup: no model, no vocabulary (it only copies token ids)."""
    msg = pb.InfoResponse(model=name, device="cpu", eos_token_id=-1, drafter_source="ngram")
    msg.host_id = placement.host_id()
    msg.cpus.extend(placement.cpus())
    msg.active_sequences = sessions
    return msg


def info_to_pb(model_name, runner, tokenizer, fingerprint, include_vocab) -> pb.InfoResponse:
    eos = tokenizer.eos_token_id
    msg = pb.InfoResponse(
        model=model_name,
        vocab_fingerprint=fingerprint,
        vocab_size=runner.vocab_size,
        device=str(runner.device),
        dtype=str(runner.describe()["dtype"]),
        eos_token_id=-1 if eos is None else eos,
    )
    msg.host_id = placement.host_id()
    msg.cpus.extend(placement.cpus())
    msg.active_sequences = runner.active_sequences
    msg.kv_tokens = runner.kv_tokens_held
    msg.prefix_cache_tokens = runner.prefix.budget
    if include_vocab:
        msg.vocab.extend(vocab_by_id(tokenizer))
    return msg
