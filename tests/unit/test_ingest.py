"""Ingest refuses what must never be loaded, with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.models.embedded import find_bundled_gguf
from server.registry.ingest import IngestError, checkpoint_sha256, inspect_hf_dir, read_gguf


def _gguf_bytes(arch: str = "llama", sizes: dict[str, int] | None = None, output_tensor: bool = False,
                chat_template: str | None = None) -> bytes:
    """A real (tiny) GGUF file, written by gguf's own writer: metadata and one or two tensors."""
    import tempfile

    import gguf
    import numpy as np

    sizes = {"embedding_length": 8, "feed_forward_length": 16, "block_count": 2} if sizes is None else sizes
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.gguf"
        writer = gguf.GGUFWriter(path, arch)
        for key, value in sizes.items():
            writer.add_uint32(f"{arch}.{key}", value)
        if chat_template is not None:
            writer.add_chat_template(chat_template)
        writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
        if output_tensor:
            writer.add_tensor("output.weight", np.zeros((4, 8), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


def _checkpoint(path: Path, config: dict | None = None, files: dict[str, bytes] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or {"architectures": ["LlamaForCausalLM"]}))
    for name, content in (files or {"model.safetensors": b"weights"}).items():
        (path / name).write_bytes(content)
    return path


def test_a_plain_safetensors_checkpoint_passes(tmp_path) -> None:
    assert inspect_hf_dir(_checkpoint(tmp_path / "ok")) == "LlamaForCausalLM"


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_pickle_weights_are_refused(tmp_path, name: str) -> None:
    path = _checkpoint(tmp_path / "p", files={"model.safetensors": b"w", name: b"pickle"})
    with pytest.raises(IngestError, match=f"pickle weights are refused.*{name}"):
        inspect_hf_dir(path)


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_remote_code_is_refused(tmp_path, where: str) -> None:
    path = _checkpoint(tmp_path / "r")
    target = path / where
    data = json.loads(target.read_text()) if target.exists() else {}
    target.write_text(json.dumps({**data, "auto_map": {"AutoModel": "modeling_x.XModel"}}))
    with pytest.raises(IngestError, match=rf"remote-code models are refused \({where} has auto_map\)"):
        inspect_hf_dir(path)


@pytest.mark.parametrize(
    ("config", "files", "fragment"),
    [
        ({"architectures": ["A"]}, {"x.txt": b""}, "no \\*.safetensors"),
        ({"architectures": []}, None, "exactly one architecture"),
    ],
)
def test_incomplete_checkpoints_are_refused(tmp_path, config: dict, files: dict | None, fragment: str) -> None:
    with pytest.raises(IngestError, match=fragment):
        inspect_hf_dir(_checkpoint(tmp_path / "x", config, files))


def test_missing_config_is_refused(tmp_path) -> None:
    with pytest.raises(IngestError, match="no config.json"):
        inspect_hf_dir(tmp_path)


def test_hash_covers_weights_and_config(tmp_path) -> None:
    a = checkpoint_sha256(_checkpoint(tmp_path / "a"))
    b = checkpoint_sha256(_checkpoint(tmp_path / "b"))
    c = checkpoint_sha256(_checkpoint(tmp_path / "c", files={"model.safetensors": b"other"}))
    assert a == b != c


BAD_SOURCES = {  # name -> (files under the directory, the path posted relative to it, what the 400 says)
    "config.json a list": ({"config.json": b"[1, 2]", "model.safetensors": b"w"}, "", "must be a JSON object"),
    "config.json not JSON": ({"config.json": b"{not json", "model.safetensors": b"w"}, "", "not valid JSON"),
    "config.json not UTF-8": ({"config.json": b"\xff\xfe{", "model.safetensors": b"w"}, "", "not valid JSON"),
    "architecture not a name": ({"config.json": b'{"architectures": [{"a": 1}]}', "model.safetensors": b"w"}, "",
                                "exactly one architecture"),
    "tokenizer config a string": ({"config.json": b'{"architectures": ["LlamaForCausalLM"]}',
                                   "tokenizer_config.json": b'"x"', "model.safetensors": b"w"}, "",
                                  "must be a JSON object"),
    "not a GGUF file": ({"m.gguf": b"hello, not gguf"}, "m.gguf", "not a GGUF file"),
    "a GGUF header only": ({"m.gguf": b"GGUF" + b"\0" * 12}, "m.gguf", "not a readable GGUF file"),
    "a GGUF cut short": ({"m.gguf": _gguf_bytes()[:60]}, "m.gguf", "not a readable GGUF file"),
    "a GGUF of an architecture not converted": ({"m.gguf": _gguf_bytes("clip")}, "m.gguf",
                                                "GGUF architecture 'clip' is not one quantgate converts"),
    "a GGUF without its layer count": ({"m.gguf": _gguf_bytes(sizes={"embedding_length": 8})}, "m.gguf",
                                       "llama.block_count is missing"),
    "a component too long": ({}, "x" * 300, "cannot be used"),
    "a path too long": ({}, "/".join(["y" * 200] * 30), "cannot be used"),
    "a NUL byte": ({}, "a\0b", "NUL byte"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_sources_are_a_400_naming_the_problem_never_a_500(tmp_path, case: str) -> None:
    # Each of these was a 500 from POST /admin/models (the hardening issue); the file contents are not echoed.
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import Settings

    files, relative, fragment = BAD_SOURCES[case]
    source = tmp_path / "source"
    source.mkdir()
    for name, content in files.items():
        (source / name).write_bytes(content)
    settings = Settings(home=tmp_path / "home", embedded_model=False, admin_key="a" * 24)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        response = client.post("/admin/models", json={"path": f"{source}/{relative}", "name": "bad"},
                               headers={"Authorization": "Bearer " + "a" * 24})  # fmt: skip
        assert response.status_code == 400, response.text
        message = response.json()["error"]["message"]
        assert fragment in message and "not json" not in message and "hello" not in message, message
        assert client.get("/admin/models", headers={"Authorization": "Bearer " + "a" * 24}).json()["models"] == []


def test_gguf_metadata_gives_the_model_without_converting_it(tmp_path) -> None:
    # Registration reads this in the request; the conversion runs later as the base variant's job.
    header = read_gguf(find_bundled_gguf())
    info = header.info
    assert (info.architecture, info.hidden_size, info.intermediate_size, info.num_layers,
            info.tie_word_embeddings) == ("LlamaForCausalLM", 576, 1536, 30, True)
    assert "<|im_start|>" in header.chat_template and "tools" not in header.chat_template
    (tmp_path / "untied.gguf").write_bytes(_gguf_bytes(output_tensor=True, chat_template="{{ tools }}"))
    untied = read_gguf(tmp_path / "untied.gguf")
    assert (untied.info.hidden_size, untied.info.num_layers, untied.info.tie_word_embeddings) == (8, 2, False)
    assert untied.chat_template == "{{ tools }}"
