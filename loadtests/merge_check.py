"""optimizers/merge.py's SLERP against mergekit's own `slerp`, on the same inputs.

mergekit does not install beside either of quantgate's environments (it pins safetensors 0.5, accelerate 1.6
and pydantic 2.10, and its modules fail to import under pydantic 2.14), so its `lerp`, `slerp` and `normalize`
(numpy only) are read from its wheel and run as they are, on:
- random tensor pairs of equal norm, where the two methods must agree (same great circle, same magnitude);
- random pairs of different norms, where they differ by design (merge.py interpolates the norm linearly;
  mergekit applies the coefficients to the unnormalized tensors);
- every tensor of two real checkpoints (`--a`, `--b`), at `--t`.

    pip download mergekit==0.1.4 --no-deps -d /tmp/mk
    python -m loadtests.merge_check --mergekit-wheel /tmp/mk/mergekit-0.1.4-py3-none-any.whl \\
        --a CHECKPOINT_A --b CHECKPOINT_B --t 0.5 --out loadtests/results/DATE/merge-check.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from optimizers.merge import _tensors, check_compatible, slerp


def mergekit_slerp(wheel: Path) -> Any:
    """mergekit's `slerp`, executed from its wheel's source (the functions from `def lerp` on)."""
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read("mergekit/merge_methods/slerp.py").decode()
    namespace: dict[str, Any] = {"np": np, "torch": torch, "Union": Any}
    exec(compile(source[source.index("def lerp("):], f"{wheel.name}:slerp.py", "exec"), namespace)  # noqa: S102
    return namespace["slerp"]


def compare(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """||ours - theirs|| / ||theirs||, in float64."""
    diff = torch.linalg.vector_norm((ours.double() - theirs.double()).flatten())
    return float(diff / max(torch.linalg.vector_norm(theirs.double().flatten()), 1e-30))


def synthetic(mk: Any, t: float) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    equal, unequal = [], []
    for shape in [(64,), (32, 48), (7, 5, 3), (576, 1536)]:
        for _ in range(5):
            a = torch.randn(shape, generator=generator)
            b = torch.randn(shape, generator=generator)
            b_equal = b * (a.norm() / b.norm())
            equal.append(compare(slerp(t, a, b_equal), mk(t, a, b_equal).float()))
            b_long = b * (3 * a.norm() / b.norm())
            ours, theirs = slerp(t, a, b_long), mk(t, a, b_long).float()
            unequal.append({"relative_difference": compare(ours, theirs),
                            "norm_ours_over_lerp": float(ours.norm() / ((1 - t) * a.norm() + t * b_long.norm())),
                            "norm_mergekit_over_lerp": float(theirs.norm() / ((1 - t) * a.norm() + t * b_long.norm()))})  # fmt: skip
    return {"equal_norms_max_relative_difference": max(equal), "equal_norm_pairs": len(equal),
            "norm_ratio_3_pairs": unequal}  # fmt: skip


def checkpoints(mk: Any, a: Path, b: Path, t: float) -> dict[str, Any]:
    check_compatible([a, b], "slerp")
    rows = []
    for name, (x, y) in _tensors([a, b]):
        ours = slerp(t, x.float(), y.float())
        theirs = mk(t, x.float(), y.float()).float()
        rows.append({"tensor": name, "relative_difference": compare(ours, theirs),
                     "norm_a": float(x.float().norm()), "norm_b": float(y.float().norm())})  # fmt: skip
    diffs = [r["relative_difference"] for r in rows]
    return {"tensors": len(rows), "max_relative_difference": max(diffs), "median_relative_difference":
            statistics.median(diffs), "worst": sorted(rows, key=lambda r: -r["relative_difference"])[:5]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mergekit-wheel", type=Path, required=True)
    parser.add_argument("--a", type=Path)
    parser.add_argument("--b", type=Path)
    parser.add_argument("--t", type=float, default=0.5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    mk = mergekit_slerp(args.mergekit_wheel)
    report: dict[str, Any] = {"mergekit": args.mergekit_wheel.name, "t": args.t, "synthetic": synthetic(mk, args.t)}
    if args.a and args.b:
        report["checkpoints"] = {"a": str(args.a), "b": str(args.b), **checkpoints(mk, args.a, args.b, args.t)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "checkpoints"}, indent=1))
    if "checkpoints" in report:
        print(json.dumps({k: v for k, v in report["checkpoints"].items() if k != "worst"}, indent=1))


if __name__ == "__main__":
    main()
