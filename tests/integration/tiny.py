"""A tiny Llama made in the test session: the real code paths (compression, serving, the registry)
in seconds per method instead of minutes on the bundled model.

Seeded random weights (2 decoder layers, hidden 192, 3 heads / 1 KV head) with the bundled model's
tokenizer and chat template, saved as a bf16 safetensors checkpoint under the test home once and
reused (the registry keys its artifacts by the checkpoint's sha256, so its variants are reused too).
Its answers are noise: tests that use it check paths, not quality; the quality of the real rungs is
`make test-full`'s (tests/integration/test_registry.py, test_variants.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from server.models.embedded import ensure_checkpoint, find_bundled_gguf
from tests.integration.gateway_process import TEST_HOME

HIDDEN, INTERMEDIATE = 192, 384  # 192 is not a multiple of 128: group size must resolve to 64
VERSION = 1  # bump when the recipe below changes


def tiny_llama(home: Path = TEST_HOME, seed: int = 0) -> Path:
    """The tiny checkpoint, made once per test home (built in a temp dir and renamed); another `seed` gives
    another model of the same shape (a second parent for a merge)."""
    out = home / (f"tiny-llama-v{VERSION}" + (f"-seed{seed}" if seed else ""))
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    base = ensure_checkpoint(find_bundled_gguf(), home / "checkpoints", home / "logs")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
                         tie_word_embeddings=True, max_position_embeddings=2048)  # fmt: skip
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (base / name).exists():
            shutil.copy(base / name, tmp / name)
    os.replace(tmp, out)
    return out
