"""Tiny random Llamas built in the unit tests of prune-structured and distill (tests/unit/test_prune_structured.py,
tests/unit/test_prune_distill.py): a model, a checkpoint with a word-level tokenizer, and token windows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 256


def llama(layers: int = 4, intermediate: int = 128, seed: int = 0, heads: int = 4,
           kv_heads: int = 2) -> LlamaForCausalLM:  # fmt: skip
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                         tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A tiny bf16 checkpoint with the bundled model's tokenizer files absent: handlers copy the source's."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path / "tiny"
    llama().to(torch.bfloat16).save_pretrained(path)
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0").save_pretrained(path)
    return path


def windows(n: int, length: int, seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(VOCAB, (n, length), generator=generator).tolist()
