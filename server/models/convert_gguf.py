"""Convert a GGUF file into a dequantized Hugging Face safetensors checkpoint.

Run as its own process (`python -m server.models.convert_gguf GGUF OUT`) so the gateway never
imports torch: the conversion holds the whole model in memory for ~30 s, then exits.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def convert(gguf: Path, out: Path, dtype: str = "bfloat16") -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    torch_dtype = getattr(torch, dtype)
    # dequantize=True: otherwise the weights stay packed and save_pretrained refuses.
    quant = GgufConfig(gguf_file=gguf.name, dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=quant, dtype=torch_dtype
    )
    model = model.to(torch_dtype)
    # Drop the quantization_config so vLLM sees a plain dense checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(out)
    logger.info("converted %s into %s", gguf, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("gguf", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    convert(args.gguf, args.out, args.dtype)


if __name__ == "__main__":
    main()
