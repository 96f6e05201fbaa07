"""A deliberately broken rung: the base checkpoint with one decoder layer's weights scaled.

The gate's test case (issue 16): a variant whose perplexity may still look passable but whose chat
answers and next tokens drift from the base's. Scaling one layer's MLP output (down_proj) by `scale`
(0 removes it; 3 triples it) damages the model a known amount without changing its shape, so vLLM
serves it like any dense checkpoint.

    python -m loadtests.broken BASE_DIR OUT_DIR --layer 3 --scale 3
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def break_checkpoint(base: Path, out: Path, layer: int, scale: float) -> Path:
    """Copy `base` to `out` with `model.layers.{layer}.mlp.down_proj.weight` multiplied by `scale`
    (optimizers/drill.py's, the registry's `drill-broken` rung); made once."""
    from optimizers.drill import scale_layer

    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    scale_layer(base, tmp, layer, scale)
    tmp.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--scale", type=float, default=3.0)
    args = parser.parse_args()
    print(break_checkpoint(args.base, args.out, args.layer, args.scale))


if __name__ == "__main__":
    main()
