"""Hostile and malformed input: every case answers its documented status naming the field, and the services
keep serving (health SERVING, a valid request afterwards gives the same ids as before)."""

import math
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_services import Pair
from tiny import perturbed, tiny_model, tiny_tokenizer

from specdec.rpc import channel
from specdec.v1 import specdec_pb2 as pb
from specdec.v1 import specdec_pb2_grpc as pb_grpc

PROMPT = "def add(a, b):\n"
VOCAB = len(tiny_tokenizer())  # the tiny models' vocabulary (tests/tiny.py)


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("qwen2", seed=0)
    p = Pair(target, perturbed(target, 0.1))
    yield p
    p.stop()


def generate(stub, request, timeout=30):
    return [t for r in stub.Generate(request, timeout=timeout) for t in r.token_ids]


def valid_request(drafter):
    return pb.GenerateRequest(
        text=PROMPT,
        stop=pb.StopConditions(max_new_tokens=10, ignore_eos=True),
        num_draft_tokens=3,
        drafter=drafter,
    )


def dist(ids, probs):
    return pb.SparseDistribution(token_ids=ids, probs=probs)


def gen(**fields):
    base = {"text": PROMPT, "stop": pb.StopConditions(max_new_tokens=8)}
    base.update(fields)
    if "token_ids" in base:
        base.pop("text")
    return pb.GenerateRequest(**base)


GENERATE_CASES = {
    "no prompt": (pb.GenerateRequest(stop=pb.StopConditions(max_new_tokens=4)), "prompt"),
    "empty text": (gen(text=""), "text"),
    "huge text": (gen(text="x" * ((1 << 20) + 1)), "text"),
    "empty token ids": (gen(token_ids=pb.TokenIds()), "token_ids"),
    "token id past the vocabulary": (gen(token_ids=pb.TokenIds(ids=[1, VOCAB])), "token_ids.ids[1]"),
    "negative token id": (gen(token_ids=pb.TokenIds(ids=[-1])), "token_ids.ids[0]"),
    "prompt + max_new_tokens past the context": (
        gen(stop=pb.StopConditions(max_new_tokens=10**6)),
        "max_new_tokens",
    ),
    "NaN temperature": (gen(sampling=pb.SamplingParams(temperature=math.nan)), "sampling.temperature"),
    "inf temperature": (gen(sampling=pb.SamplingParams(temperature=math.inf)), "sampling.temperature"),
    "negative temperature": (gen(sampling=pb.SamplingParams(temperature=-1)), "sampling.temperature"),
    "top_p above 1": (gen(sampling=pb.SamplingParams(top_p=1.5)), "sampling.top_p"),
    "negative top_p": (gen(sampling=pb.SamplingParams(top_p=-0.5)), "sampling.top_p"),
    "NaN top_p": (gen(sampling=pb.SamplingParams(top_p=math.nan)), "sampling.top_p"),
    "too many stop strings": (gen(stop=pb.StopConditions(max_new_tokens=4, stop=["a"] * 17)), "stop.stop"),
    "huge stop string": (gen(stop=pb.StopConditions(max_new_tokens=4, stop=["a" * 300])), "stop.stop[0]"),
    "draft length past the cap": (gen(num_draft_tokens=65), "num_draft_tokens"),
    "huge request id": (gen(request_id="r" * 200), "request_id"),
    "huge tenant": (gen(tenant="t" * 200), "tenant"),
}


@pytest.mark.parametrize("case", GENERATE_CASES)
def test_bad_generate_requests_name_their_field(pair, case):
    request, field = GENERATE_CASES[case]
    stub = pb_grpc.GenerationStub(channel(pair.verifier_addr))
    with pytest.raises(grpc.RpcError) as err:
        generate(stub, request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert field in err.value.details() and "Traceback" not in err.value.details()


def _raw_generate_bytes(stop_bytes: bytes) -> bytes:
    """A GenerateRequest whose stop string holds ``stop_bytes`` (protobuf refuses to build invalid UTF-8)."""
    stop = b"\x12" + bytes([len(stop_bytes)]) + stop_bytes  # StopConditions.stop (field 2), length-delimited
    stop_conditions = b"\x08\x04" + stop  # max_new_tokens (field 1) = 4, then the stop string
    head = pb.GenerateRequest(text=PROMPT).SerializeToString()
    return head + b"\x2a" + bytes([len(stop_conditions)]) + stop_conditions  # GenerateRequest.stop (field 5)


def test_undecodable_and_oversized_messages(pair):
    assert pb.GenerateRequest.FromString(_raw_generate_bytes(b"ok")).stop.stop == [
        "ok"
    ]  # the encoding is right
    ch = grpc.insecure_channel(pair.verifier_addr, options=[("grpc.max_send_message_length", 128 << 20)])
    raw = ch.unary_stream("/specdec.v1.Generation/Generate")  # bytes in, bytes out
    with pytest.raises(grpc.RpcError) as err:
        list(raw(_raw_generate_bytes(b"\xff\xfe"), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        list(raw(b"\x0a\xff\xff", timeout=30))  # truncated
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:  # past the server's 64 MiB receive limit
        list(raw(pb.GenerateRequest(text="x" * (65 << 20)).SerializeToString(), timeout=60))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    ch.close()


def verify(session="s", tokens=(1, 2, 3), reset=True, draft=(5,), dists=(), **kw):
    return pb.VerifyRequest(
        session_id=session,
        tokens=list(tokens),
        reset=reset,
        draft_tokens=list(draft),
        draft_dists=list(dists),
        sampling=kw.pop("sampling", pb.SamplingParams(temperature=1.0)),
        **kw,
    )


VERIFY_CASES = {
    "no session id": (verify(session=""), grpc.StatusCode.INVALID_ARGUMENT, "session_id"),
    "unknown session": (
        verify(session="never-opened", reset=False),
        grpc.StatusCode.NOT_FOUND,
        "never-opened",
    ),
    "reset without history": (verify(tokens=()), grpc.StatusCode.INVALID_ARGUMENT, "history"),
    "history token past the vocabulary": (
        verify(tokens=(1, 9999)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "tokens[1]",
    ),
    "drafted token past the vocabulary": (
        verify(draft=(VOCAB,), dists=[dist([VOCAB], [1.0])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "draft_tokens[0]",
    ),
    "too many drafted tokens": (verify(draft=[1] * 65), grpc.StatusCode.INVALID_ARGUMENT, "draft_tokens"),
    "negative probability": (
        verify(dists=[dist([5, 6], [1.5, -0.5])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "draft_dists[0].probs",
    ),
    "NaN probability": (
        verify(dists=[dist([5], [math.nan])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "draft_dists[0].probs",
    ),
    "not normalised": (verify(dists=[dist([5, 6], [0.2, 0.3])]), grpc.StatusCode.INVALID_ARGUMENT, "sum to"),
    "duplicate ids": (
        verify(dists=[dist([5, 5], [0.5, 0.5])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "duplicate",
    ),
    "support over the cap": (
        verify(dists=[dist(list(range(1025)), [1 / 1025] * 1025)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "cap",
    ),
    "drafted token outside its support": (
        verify(dists=[dist([6, 7], [0.5, 0.5])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "no probability",
    ),
    "more distributions than tokens": (
        verify(dists=[dist([5], [1.0]), dist([6], [1.0])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "2 distributions for 1",
    ),
    "ids and probs of different lengths": (
        verify(dists=[dist([5, 6], [1.0])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "draft_dists[0]",
    ),
    "sampled block without distributions": (
        verify(dists=[]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "distribution",
    ),
    "bad top_p": (
        verify(sampling=pb.SamplingParams(top_p=2.0)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.top_p",
    ),
}


@pytest.mark.parametrize("case", VERIFY_CASES)
def test_bad_verify_requests_answer_their_documented_status(pair, case):
    request, code, fragment = VERIFY_CASES[case]
    stub = pb_grpc.VerifierStub(channel(pair.verifier_addr))
    with pytest.raises(grpc.RpcError) as err:
        stub.Verify(request, timeout=30)
    assert err.value.code() == code, err.value.details()
    assert fragment in err.value.details()


def start(context=(1, 2, 3), **kw):
    return pb.DraftRequest(start=pb.DraftStart(context=list(context), **kw))


def step(**kw):
    return pb.DraftRequest(step=pb.DraftStep(**kw))


DRAFT_CASES = {
    "step before start": ([step(num_draft_tokens=2)], "start"),
    "neither start nor step": ([pb.DraftRequest()], "kind"),
    "empty context": ([start(context=())], "start.context"),
    "context past the vocabulary": ([start(context=(1, VOCAB))], "start.context[1]"),
    "bad sampling": ([start(sampling=pb.SamplingParams(temperature=-2))], "start.sampling.temperature"),
    "huge cache salt": ([start(cache_salt="s" * 200)], "start.cache_salt"),
    "draft length past the cap": ([start(), step(num_draft_tokens=1000)], "step.num_draft_tokens"),
    "stop_below outside [0, 1]": ([start(), step(num_draft_tokens=2, stop_below=2.0)], "step.stop_below"),
    "more accepted than drafted": (
        [
            start(),
            step(num_draft_tokens=2),
            step(num_draft_tokens=2, has_verdict=True, num_accepted=5, next_token=1),
        ],
        "step.num_accepted",
    ),
    "verdict token past the vocabulary": (
        [start(), step(num_draft_tokens=2), step(num_draft_tokens=2, has_verdict=True, next_token=VOCAB)],
        "step.next_token",
    ),
    "committed token past the vocabulary": (
        [start(), step(num_draft_tokens=2, committed=[-3])],
        "step.committed",
    ),
}


@pytest.mark.parametrize("case", DRAFT_CASES)
def test_bad_draft_streams_are_refused_naming_the_field(pair, case):
    messages, field = DRAFT_CASES[case]
    stub = pb_grpc.DrafterStub(channel(pair.drafter_addr))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Draft(iter(messages), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert field in err.value.details()


def test_services_keep_serving_after_all_of_it(pair):
    stub = pb_grpc.GenerationStub(channel(pair.verifier_addr))
    before = generate(stub, valid_request(pair.drafter_addr))
    for request, _ in GENERATE_CASES.values():
        with pytest.raises(grpc.RpcError):
            generate(stub, request)
    verifier = pb_grpc.VerifierStub(channel(pair.verifier_addr))
    for request, _, _ in VERIFY_CASES.values():
        with pytest.raises(grpc.RpcError):
            verifier.Verify(request, timeout=30)
    drafter = pb_grpc.DrafterStub(channel(pair.drafter_addr))
    for messages, _ in DRAFT_CASES.values():
        with pytest.raises(grpc.RpcError):
            list(drafter.Draft(iter(messages), timeout=30))
    for address in (pair.verifier_addr, pair.drafter_addr):
        status = health_pb2_grpc.HealthStub(channel(address)).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert generate(stub, valid_request(pair.drafter_addr)) == before
    deadline = time.monotonic() + 10  # the drafter's stream closes just after the verifier's generation
    while pair.d_engine.runner.active_sequences and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pair.v_engine.runner.active_sequences == 0 and pair.d_engine.runner.active_sequences == 0
