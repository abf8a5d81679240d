"""Protocol conversions a client needs: no torch, no model code (``convert`` holds the servers' ones)."""

from __future__ import annotations

from specdec.v1 import specdec_pb2 as pb
from specdec_core.params import SamplingParams


def sampling_from_pb(msg: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=float(msg.temperature),
        top_k=int(msg.top_k),
        top_p=float(msg.top_p) if msg.top_p > 0 else 1.0,
        seed=int(msg.seed) if msg.HasField("seed") else None,
    )


def sampling_to_pb(params: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    if params.seed is not None:
        msg.seed = params.seed
    return msg


def stats_from_pb(msg: pb.GenerationStats) -> dict:
    from google.protobuf.json_format import MessageToDict

    d = MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return {k: (float(v) if isinstance(v, float) else v) for k, v in d.items()}
