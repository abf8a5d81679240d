"""Access to the services: TLS, mutual TLS, bearer tokens, and no dialing of addresses a request chooses."""

import logging

import grpc
import pytest
from certs import CA
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tiny import hf_greedy, perturbed, tiny_model, tiny_tokenizer

from client import SpecDecClient
from drafter_service.server import start as start_drafter
from drafter_service.sessions import DrafterEngine
from specdec.config import DrafterConfig, VerifierConfig
from specdec.rpc import make_server
from specdec.security import ClientSecurity, is_loopback
from specdec.v1 import specdec_pb2 as pb
from specdec.v1 import specdec_pb2_grpc as pb_grpc
from verifier_service.server import start as start_verifier
from verifier_service.verifier import VerifierEngine

PROMPT = "def add(a, b):\n"
TOKEN = "tok-7f3a9c1e5b"


@pytest.fixture(scope="module")
def models():
    target = tiny_model("qwen2", seed=0)
    return target, perturbed(target, 0.1)


@pytest.fixture(scope="module")
def expected(models):
    return hf_greedy(models[0], tiny_tokenizer()(PROMPT)["input_ids"], 12)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    good, other = CA(d, "good"), CA(d, "other")
    return {
        "ca": good.path,
        "other_ca": other.path,
        "verifier": good.issue("verifier", server=True),
        "drafter": good.issue("drafter", server=True),
        "client": good.issue("client", server=False),
        "stranger": other.issue("client", server=False),
    }


class Services:
    """A drafter and a verifier on loopback with the given access settings (tiny models)."""

    def __init__(self, models, drafter_kw=None, verifier_kw=None, configure_drafter=True):
        target, drafter = models
        self.d_engine = DrafterEngine(
            DrafterConfig(model="tiny-drafter", quantization="none"), drafter, tiny_tokenizer()
        )
        d_cfg = DrafterConfig(port=0, host="127.0.0.1", model="tiny-drafter", **(drafter_kw or {}))
        self.d_server, d_port, _ = start_drafter(d_cfg, self.d_engine)
        self.drafter_addr = f"localhost:{d_port}"
        v_cfg = VerifierConfig(
            port=0,
            host="127.0.0.1",
            model="tiny-target",
            fast_verify="off",
            drafters=(self.drafter_addr,) if configure_drafter else (),
            **(verifier_kw or {}),
        )
        self.v_engine = VerifierEngine(v_cfg, target, tiny_tokenizer())
        self.v_server, v_port, _ = start_verifier(v_cfg, self.v_engine)
        self.verifier_addr = f"localhost:{v_port}"

    def generate(self, security=None, drafter=None):
        with SpecDecClient(
            self.verifier_addr, drafter, security=security or ClientSecurity(), retries=0
        ) as c:
            return c.generate(PROMPT, max_new_tokens=12, ignore_eos=True, num_draft_tokens=3)

    def stop(self):
        self.v_server.stop(0)
        self.d_server.stop(0)
        self.v_engine.close()
        self.d_engine.close()


def refused(services, security) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        services.generate(security)
    return err.value.code()


def test_tls_and_mutual_tls(models, expected, pki, monkeypatch):
    cert, key = pki["verifier"]
    tls = Services(models, verifier_kw={"tls_cert": cert, "tls_key": key})
    try:
        assert tls.generate(ClientSecurity(ca=pki["ca"])).token_ids == expected
        assert refused(tls, ClientSecurity()) == grpc.StatusCode.UNAVAILABLE  # plaintext client
        assert (
            refused(tls, ClientSecurity(ca=pki["other_ca"])) == grpc.StatusCode.UNAVAILABLE
        )  # untrusted server
        # the probe docker-compose runs: `specdec health`, with the client's TLS settings from the environment
        from client.cli import main as cli

        monkeypatch.setenv("SPECDEC_TLS_CA", str(pki["ca"]))
        assert cli(["health", "--address", tls.verifier_addr]) == 0
        monkeypatch.delenv("SPECDEC_TLS_CA")
        assert cli(["health", "--address", tls.verifier_addr, "--timeout", "1"]) == 1
    finally:
        tls.stop()
    mtls = Services(models, verifier_kw={"tls_cert": cert, "tls_key": key, "tls_client_ca": pki["ca"]})
    try:
        client_cert, client_key = pki["client"]
        with_cert = ClientSecurity(ca=pki["ca"], cert=client_cert, key=client_key)
        assert mtls.generate(with_cert).token_ids == expected
        assert (
            refused(mtls, ClientSecurity(ca=pki["ca"])) == grpc.StatusCode.UNAVAILABLE
        )  # no client certificate
        stranger_cert, stranger_key = pki["stranger"]  # signed by a CA the server does not trust
        stranger = ClientSecurity(ca=pki["ca"], cert=stranger_cert, key=stranger_key)
        assert refused(mtls, stranger) == grpc.StatusCode.UNAVAILABLE
    finally:
        mtls.stop()


def test_bearer_token_is_required_but_health_stays_open(models, expected, monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("SPECDEC_VERIFIER_AUTH_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    s = Services(models)
    try:
        assert refused(s, ClientSecurity()) == grpc.StatusCode.UNAUTHENTICATED
        assert refused(s, ClientSecurity(token=TOKEN[:-1] + "x")) == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            s.generate(ClientSecurity(token="x"))
        assert "bearer token" in err.value.details() and TOKEN not in err.value.details()
        assert s.generate(ClientSecurity(token=TOKEN)).token_ids == expected
        with grpc.insecure_channel(s.verifier_addr) as ch:  # probes need no token
            status = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        s.stop()
    assert TOKEN not in caplog.text
    # the token from a file, through the client's environment
    monkeypatch.delenv("SPECDEC_VERIFIER_AUTH_TOKEN")
    (tmp_path / "token").write_text(TOKEN + "\n")
    s = Services(models, verifier_kw={"auth_token_file": str(tmp_path / "token")})
    try:
        monkeypatch.setenv("SPECDEC_TOKEN_FILE", str(tmp_path / "token"))
        assert s.generate(ClientSecurity.from_env()).token_ids == expected
    finally:
        s.stop()


def test_drafter_refuses_a_verifier_without_credentials(models, expected, pki, tmp_path):
    (tmp_path / "drafter-token").write_text(TOKEN)
    cert, key = pki["drafter"]
    drafter_kw = {
        "tls_cert": cert,
        "tls_key": key,
        "tls_client_ca": pki["ca"],
        "auth_token_file": str(tmp_path / "drafter-token"),
    }
    client_cert, client_key = pki["client"]
    # a verifier with no credentials for its drafter: the drafter refuses it, generation goes on target-only
    s = Services(models, drafter_kw=drafter_kw)
    try:
        r = s.generate()
        assert r.token_ids == expected and r.stats["drafted"] == 0
        tls_no_token = ClientSecurity(ca=pki["ca"], cert=client_cert, key=client_key)
        with tls_no_token.channel(s.drafter_addr) as ch, pytest.raises(grpc.RpcError) as err:
            pb_grpc.DrafterStub(ch).Info(pb.InfoRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        s.stop()
    # with its own certificate and the token, the drafter serves it
    verifier_kw = {
        "drafter_tls_ca": pki["ca"],
        "drafter_tls_cert": client_cert,
        "drafter_tls_key": client_key,
        "drafter_token_file": str(tmp_path / "drafter-token"),
    }
    s = Services(models, drafter_kw=drafter_kw, verifier_kw=verifier_kw)
    try:
        r = s.generate()
        assert r.token_ids == expected and r.stats["drafted"] > 0
    finally:
        s.stop()


def test_a_request_cannot_make_the_verifier_dial_an_address(models, expected):
    s = Services(models)
    try:
        with pytest.raises(grpc.RpcError) as err:
            s.generate(drafter="127.0.0.1:9")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "--allow-any-drafter" in err.value.details() and "127.0.0.1:9" in err.value.details()
        assert s.generate(drafter=s.drafter_addr).stats["drafted"] > 0  # a configured drafter may be named
    finally:
        s.stop()
    s = Services(models, verifier_kw={"allow_any_drafter": True}, configure_drafter=False)
    try:
        r = s.generate(drafter=s.drafter_addr)
        assert r.token_ids == expected and r.stats["drafted"] > 0
    finally:
        s.stop()


def test_plaintext_on_a_public_address_is_announced(caplog):
    caplog.set_level(logging.WARNING)
    server, _, _ = make_server(0, [], [], host="127.0.0.1", role="drafter")
    server.stop(0)
    assert "without" not in caplog.text
    server, _, _ = make_server(0, [], [], host="0.0.0.0", role="drafter")
    server.stop(0)
    assert "drafter listens on 0.0.0.0 without TLS and a bearer token" in caplog.text
    assert is_loopback("[::1]") and is_loopback("localhost") and not is_loopback("[::]")
