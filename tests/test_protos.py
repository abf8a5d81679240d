"""The committed stubs in specdec/v1 are exactly what `make protos` generates from protos/."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools (dev extra) not installed"
)
def test_stubs_do_not_drift(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from gen_protos import generate

    generate(tmp_path)
    for name in ("specdec_pb2.py", "specdec_pb2.pyi", "specdec_pb2_grpc.py"):
        fresh = (tmp_path / "specdec" / "v1" / name).read_text()
        committed = (ROOT / "specdec" / "v1" / name).read_text()
        assert fresh == committed, f"specdec/v1/{name} is stale: run `make protos`"


def test_every_rpc_and_field_is_documented():
    text = (ROOT / "protos" / "specdec" / "v1" / "specdec.proto").read_text().splitlines()
    for i, line in enumerate(text):
        s = line.strip()
        is_field = s.endswith(";") and "=" in s and not s.startswith(("syntax", "package", "option", "//"))
        if s.startswith("rpc ") or is_field or s.startswith(("message ", "service ")):
            assert text[i - 1].strip().startswith("///"), f"line {i + 1} undocumented: {s}"
