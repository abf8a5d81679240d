"""Property-based fuzzing of the three request types over a real gRPC wire (tiny models).

For every generated GenerateRequest, VerifyRequest and Draft stream: the answer is OK or one of the
documented status codes, no status message carries a traceback, and afterwards both services are SERVING
and a valid request gives the same ids as before the fuzzing. Derandomized: CI runs the same cases.
"""

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_services import Pair
from tiny import perturbed, tiny_model, tiny_tokenizer

from specdec.rpc import channel
from specdec.v1 import specdec_pb2 as pb
from specdec.v1 import specdec_pb2_grpc as pb_grpc

VOCAB = len(tiny_tokenizer())
CASES = 2000
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.DEADLINE_EXCEEDED,  # a valid request that generates past the test's short deadline
}
FUZZ = settings(
    max_examples=CASES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)

# -- strategies: mostly hostile values, with enough valid ones to reach the models ------------------------
INT32 = st.integers(-(2**31), 2**31 - 1)
token = st.one_of(st.integers(0, VOCAB - 1), INT32)
tokens = st.lists(token, max_size=12)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
text = st.text(max_size=40)


@st.composite
def sampling(draw):
    msg = pb.SamplingParams(
        temperature=draw(st.one_of(st.just(0.0), floats)),
        top_k=draw(st.one_of(st.just(0), st.integers(0, 2**32 - 1))),
        top_p=draw(st.one_of(st.just(0.0), st.just(1.0), floats)),
    )
    if draw(st.booleans()):
        msg.seed = draw(st.integers(0, 2**64 - 1))
    return msg


@st.composite
def sparse(draw):
    n = draw(st.integers(0, 5))
    return pb.SparseDistribution(
        token_ids=draw(st.lists(token, min_size=n, max_size=n + draw(st.integers(0, 1)))),
        probs=draw(st.lists(st.one_of(st.just(1.0 / max(n, 1)), floats), min_size=n, max_size=n + 1)),
    )


@st.composite
def generate_requests(draw):
    req = pb.GenerateRequest(
        chat=draw(st.booleans()),
        sampling=draw(sampling()),
        stop=pb.StopConditions(
            max_new_tokens=draw(st.one_of(st.integers(0, 4), st.integers(0, 2**32 - 1))),
            stop=draw(st.lists(text, max_size=3)),
            ignore_eos=draw(st.booleans()),
        ),
        num_draft_tokens=draw(st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1))),
        adaptive_draft=draw(st.booleans()),
        no_draft=draw(st.booleans()),
        drafter=draw(st.one_of(st.just(""), text)),
        request_id=draw(st.one_of(st.just(""), text)),
    )
    kind = draw(st.sampled_from(["text", "ids", "none"]))
    if kind == "text":
        req.text = draw(text)
    elif kind == "ids":
        req.token_ids.ids.extend(draw(tokens))
    return req


@st.composite
def verify_requests(draw):
    n = draw(st.integers(0, 4))
    return pb.VerifyRequest(
        session_id=draw(st.one_of(st.sampled_from(["a", "b", ""]), text)),
        tokens=draw(tokens),
        reset=draw(st.booleans()),
        sampling=draw(sampling()),
        draft_tokens=draw(st.lists(token, min_size=n, max_size=n)),
        draft_dists=draw(st.lists(sparse(), max_size=n + 1)),
        return_logprobs=draw(st.booleans()),
    )


@st.composite
def draft_streams(draw):
    messages = []
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            messages.append(
                pb.DraftRequest(
                    start=pb.DraftStart(
                        context=draw(tokens),
                        sampling=draw(sampling()),
                        max_support=draw(st.integers(0, 2**32 - 1)),
                        request_id=draw(text),
                    )
                )
            )
        else:
            messages.append(
                pb.DraftRequest(
                    step=pb.DraftStep(
                        has_verdict=draw(st.booleans()),
                        num_accepted=draw(st.integers(0, 2**32 - 1)),
                        next_token=draw(token),
                        num_draft_tokens=draw(st.one_of(st.integers(0, 6), st.integers(0, 2**32 - 1))),
                        stop_below=draw(floats),
                        acceptance_by_confidence=draw(st.lists(floats, max_size=3)),
                        committed=draw(st.lists(token, max_size=3)),
                    )
                )
            )
    return messages


# -- the properties --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair():
    target = tiny_model("qwen2", seed=0)
    p = Pair(target, perturbed(target, 0.1))
    yield p
    p.stop()


def answer(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        details = exc.details() or ""
        assert exc.code() in DOCUMENTED, f"{exc.code()}: {details}"
        assert "Traceback" not in details and 'File "' not in details, details
        return exc.code()
    return grpc.StatusCode.OK


def valid_ids(pair) -> list[int]:
    stub = pb_grpc.GenerationStub(channel(pair.verifier_addr))
    request = pb.GenerateRequest(
        text="def add(a, b):\n",
        stop=pb.StopConditions(max_new_tokens=12, ignore_eos=True),
        num_draft_tokens=3,
        drafter=pair.drafter_addr,
    )
    return [t for r in stub.Generate(request, timeout=30) for t in r.token_ids]


def still_serving(pair, before: list[int]) -> None:
    for address in (pair.verifier_addr, pair.drafter_addr):
        status = health_pb2_grpc.HealthStub(channel(address)).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert valid_ids(pair) == before


def fuzz(pair, strategy, call) -> tuple[list[int], set[grpc.StatusCode]]:
    """The ids of a valid request before, then ``call(case)`` for every case: the codes answered."""
    before = valid_ids(pair)
    seen: set[grpc.StatusCode] = set()

    @FUZZ
    @given(strategy)
    def one(case):
        seen.add(answer(lambda: call(case)))

    one()
    return before, seen


def test_fuzzed_generate_requests(pair):
    stub = pb_grpc.GenerationStub(channel(pair.verifier_addr))
    before, seen = fuzz(pair, generate_requests(), lambda request: list(stub.Generate(request, timeout=2)))
    still_serving(pair, before)
    assert {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT} <= seen


def test_fuzzed_verify_requests(pair):
    stub = pb_grpc.VerifierStub(channel(pair.verifier_addr))
    before, seen = fuzz(pair, verify_requests(), lambda request: stub.Verify(request, timeout=5))
    for session in ("a", "b"):
        stub.CloseSession(pb.CloseSessionRequest(session_id=session))
    still_serving(pair, before)
    assert {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND} <= seen


def test_fuzzed_draft_streams(pair):
    stub = pb_grpc.DrafterStub(channel(pair.drafter_addr))
    before, seen = fuzz(pair, draft_streams(), lambda messages: list(stub.Draft(iter(messages), timeout=5)))
    still_serving(pair, before)
    assert {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT} <= seen
    deadline = time.monotonic() + 10  # the last streams' handlers finish after their clients have the answer
    while pair.d_engine.active_sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pair.d_engine.active_sessions == 0 and pair.d_engine.runner.active_sequences == 0
