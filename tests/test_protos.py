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


def test_draft_messages_carry_the_early_stop_and_confidences():
    from specdec import convert
    from specdec.v1 import specdec_pb2 as pb
    from specdec_core.drafting import DraftBlock
    from specdec_core.sampling import SparseDist

    table = [0.1 * i for i in range(10)]
    stop = convert.early_stop_from_pb(pb.DraftStep(stop_below=0.4, acceptance_by_confidence=table))
    assert stop.below == pytest.approx(0.4) and stop.chance(0.95) == pytest.approx(0.9)
    with pytest.raises(ValueError):
        convert.early_stop_from_pb(pb.DraftStep(acceptance_by_confidence=[0.5, 0.5]))
    with pytest.raises(ValueError):
        convert.early_stop_from_pb(pb.DraftStep(stop_below=2.0))
    import torch

    dist = SparseDist(torch.tensor([3]), torch.tensor([1.0]))
    block = DraftBlock(tokens=[3, 3], dists=[dist, dist], draft_s=0.5, confidences=[0.25, 0.75])
    back = convert.block_from_pb(convert.block_to_pb(block))
    assert back.tokens == [3, 3] and back.confidences == [0.25, 0.75]
