"""Service configs come from flags, with environment-variable defaults."""

import argparse

from specdec.config import DrafterConfig, VerifierConfig, add_config_args, config_from_args


def parse(cls, prefix, argv):
    parser = argparse.ArgumentParser()
    add_config_args(parser, cls, prefix)
    return config_from_args(cls, parser.parse_args(argv))


def test_flags_override_environment_defaults(monkeypatch):
    monkeypatch.setenv("SPECDEC_VERIFIER_PORT", "6000")
    monkeypatch.setenv("SPECDEC_VERIFIER_DRAFTERS", "a:1,b:2")
    monkeypatch.setenv("SPECDEC_VERIFIER_MAX_SESSIONS", "3")
    cfg = parse(VerifierConfig, "VERIFIER", [])
    assert (cfg.port, cfg.drafters, cfg.max_sessions) == (6000, ("a:1", "b:2"), 3)
    cfg = parse(VerifierConfig, "VERIFIER", ["--port", "7000", "--drafter", "c:3", "--drafter", "d:4"])
    assert (cfg.port, cfg.drafters) == (7000, ("c:3", "d:4"))


def test_boolean_flags_and_environment(monkeypatch):
    assert parse(DrafterConfig, "DRAFTER", []).lookahead is False
    assert parse(DrafterConfig, "DRAFTER", ["--lookahead"]).lookahead is True
    monkeypatch.setenv("SPECDEC_DRAFTER_LOOKAHEAD", "true")
    assert parse(DrafterConfig, "DRAFTER", []).lookahead is True
    assert parse(DrafterConfig, "DRAFTER", ["--no-lookahead"]).lookahead is False
    monkeypatch.setenv("SPECDEC_DRAFTER_LOOKAHEAD", "0")
    assert parse(DrafterConfig, "DRAFTER", []).lookahead is False
