"""`distill` (issue 17): a structurally pruned student trained to imitate its teacher, the source model.

The student is `prune-structured`'s output (optimizers/prune_structured.py: layers and MLP channels removed,
ranked on the calibration windows); the teacher is the source checkpoint, frozen. The loss is the article's
two terms:

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))     per token, summed over the vocabulary
         + beta * sum_l |h_student(l) - h_teacher(map(l))|^2 / |h_teacher(map(l))|^2

where map(l) is the teacher layer the student's layer l was kept from, and h the hidden state a decoder
layer hands on. The squared error is divided by the teacher's mean square per layer (and averaged over
layers), so layers whose residual stream is large do not drown the rest and beta means the same at every
depth; T^2 keeps the KL term's gradients at the scale of T = 1 (Hinton et al.).

Training runs on the calibration windows, cut into `seq_len` pieces (a few held out to report the student's loss on text it did not
train on), AdamW with a linear warm-up and cosine decay, until `steps` or `time_budget_s`, whichever comes
first. Its state is saved beside the job's output every `save_every_s`: a job started again on the same
config resumes there. Progress events (phase `distilling`) reach the gateway like a calibration's. The
output holds the student in the source's dtype, `distill-history.json` (every step's losses, the held-out
losses) and `distill-loss.png` (the loss curve).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from optimizers.base import Artifact, MethodConfig, ModelInfo
from optimizers.progress import emit_progress
from optimizers.prune_structured import check_shape, pruned, save_like_source

HISTORY = "distill-history.json"
CURVE = "distill-loss.png"
STATE = "state.pt"


class DistillConfig(MethodConfig):
    method = "distill"
    bits = 16
    # The student: the source pruned as prune-structured prunes it.
    drop_layers: int = Field(4, ge=0, description="decoder layers the student drops (lowest block influence)")
    mlp_keep: float = Field(0.75, gt=0.0, le=1.0, description="share of each MLP's channels the student keeps")
    heads_keep: float = Field(1.0, gt=0.0, le=1.0, description="share of each KV group's query heads it keeps")
    temperature: float = Field(2.0, gt=0.0, le=20.0, description="T of the KL term")
    alpha: float = Field(1.0, ge=0.0, description="weight of the KL term")
    beta: float = Field(1.0, ge=0.0, description="weight of the hidden-state term")
    steps: int = Field(400, ge=1, le=1_000_000, description="optimizer steps at most")
    time_budget_s: float = Field(1200.0, gt=0.0, description="training time at most (seconds)")
    lr: float = Field(1e-4, gt=0.0, lt=1.0)
    warmup_steps: int = Field(20, ge=0)
    seq_len: int = Field(256, ge=8, le=8192, description="tokens of each training window (longer ones are cut)")
    batch: int = Field(2, ge=1, le=64, description="windows per step")
    held_out: float = Field(0.125, ge=0.0, lt=1.0, description="share of the windows kept out of training")
    eval_every: int = Field(50, ge=1, description="steps between held-out measurements")
    save_every_s: float = Field(120.0, gt=0.0, description="seconds between saved training states")
    seed: int = 0

    def check(self, model: ModelInfo, device: str) -> None:
        check_shape(self.drop_layers, self.mlp_keep, model, self.method, self.heads_keep)


def distill_loss(student_logits: Any, teacher_logits: Any, student_hidden: list[Any], teacher_hidden: list[Any],
                 temperature: float, alpha: float, beta: float) -> tuple[Any, float, float]:  # fmt: skip
    """(total, kl, hidden) for one batch: logits [batch, tokens, vocab], hidden states [batch, tokens, width]
    paired layer by layer. The KL is per token (summed over the vocabulary, averaged over tokens)."""
    import torch.nn.functional as F  # noqa: N812

    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits.float() / t, dim=-1), F.log_softmax(teacher_logits.float() / t, dim=-1),
                  log_target=True, reduction="none").sum(-1).mean()  # fmt: skip
    if student_hidden:
        hidden = sum(((s.float() - h.float()) ** 2).mean() / (h.float() ** 2).mean().clamp_min(1e-12)
                     for s, h in zip(student_hidden, teacher_hidden, strict=True)) / len(student_hidden)  # fmt: skip
    else:
        hidden = kl.new_zeros(())
    total = alpha * t * t * kl + beta * hidden
    return total, float(kl.detach()), float(hidden.detach())


class _Taps:
    """The hidden state each decoder layer of a model hands on, captured by forward hooks."""

    def __init__(self, model: Any, indices: list[int]) -> None:
        self.states: dict[int, Any] = {}
        layers = list(model.model.layers)
        self.indices = indices
        self._handles = [layers[i].register_forward_hook(self._hook(i)) for i in indices]

    def _hook(self, i: int):
        def hook(module: Any, args: tuple, output: Any) -> None:
            self.states[i] = output[0] if isinstance(output, tuple) else output

        return hook

    def take(self) -> list[Any]:
        states = [self.states[i] for i in self.indices]
        self.states.clear()
        return states

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def state_dir(out: Path) -> Path:
    """Where a job's training state lives: beside its output, named after the variant and not the attempt
    (optimizers/job.py writes into `.<name>.tmp-<pid>`), so a new attempt finds the last one's."""
    name = out.name.lstrip(".").split(".tmp-")[0]
    return out.parent / f".{name}.distill-state"


def distill(config: DistillConfig, source: Path, out: Path, calibration: list[list[int]]) -> Artifact:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(config.seed)
    # Every calibration window in pieces of seq_len tokens (the full profile's are 512 long).
    windows = [w[i : i + config.seq_len] for w in calibration for i in range(0, len(w), config.seq_len)
               if len(w[i : i + config.seq_len]) >= 2]  # fmt: skip
    held = max(1, round(len(windows) * config.held_out)) if config.held_out and len(windows) > 1 else 0
    # Held-out windows spread over the list (calibration alternates prose and chat windows).
    held_idx = set(range(0, len(windows), max(1, len(windows) // held))[:held]) if held else set()
    train = [w for i, w in enumerate(windows) if i not in held_idx]
    valid = [w for i, w in enumerate(windows) if i in held_idx]

    teacher = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    teacher.eval().requires_grad_(False)
    student, details = pruned(source, calibration, config.drop_layers, config.mlp_keep, config.heads_keep)
    kept: list[int] = details["kept_layers"]
    student.train()
    student.config.use_cache = False
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    history: dict[str, Any] = {"train": [], "held_out": [], "resumed_at": []}
    step, spent_s = 0, 0.0
    saved = state_dir(out)
    fingerprint = config.fingerprint()
    if (saved / STATE).is_file():
        state = torch.load(saved / STATE, weights_only=False)
        if state.get("fingerprint") == fingerprint and state.get("source") == str(source):
            student.load_state_dict(state["student"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            step, spent_s, history = state["step"], state["spent_s"], state["history"]
            history["resumed_at"].append(step)

    teacher_taps, student_taps = _Taps(teacher, kept), _Taps(student, list(range(len(kept))))

    def held_out_losses() -> dict[str, float]:
        """The student's next-token loss and its KL from the teacher on the held-out windows."""
        if not valid:
            return {}
        student.eval()
        ce = kl = 0.0
        with torch.no_grad():
            for window in valid:
                ids = torch.tensor([window])
                t_logits = teacher(input_ids=ids).logits
                s_logits = student(input_ids=ids).logits
                teacher_taps.take()  # the held-out passes' states are not compared
                student_taps.take()
                ce += float(torch.nn.functional.cross_entropy(s_logits[0, :-1], ids[0, 1:]))
                _, k, _ = distill_loss(s_logits, t_logits, [], [], 1.0, 1.0, 0.0)
                kl += k
        student.train()
        return {"step": step, "ce": ce / len(valid), "ppl": math.exp(ce / len(valid)), "kl": kl / len(valid)}

    if not history["held_out"]:
        history["held_out"].append(held_out_losses())
    started, last_save = time.monotonic() - spent_s, time.monotonic()
    order = torch.Generator().manual_seed(config.seed)
    while step < config.steps and time.monotonic() - started < config.time_budget_s:
        picks = torch.randint(len(train), (config.batch,), generator=order).tolist()
        total_loss, kl_sum, hidden_sum = 0.0, 0.0, 0.0
        optimizer.zero_grad(set_to_none=True)
        for pick in picks:
            ids = torch.tensor([train[pick]])
            with torch.no_grad():
                t_logits = teacher(input_ids=ids).logits
            t_hidden = teacher_taps.take()
            s_logits = student(input_ids=ids).logits
            loss, kl, hidden = distill_loss(s_logits, t_logits, student_taps.take(), t_hidden, config.temperature,
                                            config.alpha, config.beta)  # fmt: skip
            (loss / len(picks)).backward()
            total_loss, kl_sum, hidden_sum = total_loss + float(loss), kl_sum + kl, hidden_sum + hidden
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        n = len(picks)
        history["train"].append({"step": step, "loss": total_loss / n, "kl": kl_sum / n, "hidden": hidden_sum / n})
        elapsed = time.monotonic() - started
        emit_progress("distilling", max(step / config.steps, elapsed / config.time_budget_s),
                      step=step, steps=config.steps, loss=round(total_loss / n, 4))  # fmt: skip
        if step % config.eval_every == 0:
            history["held_out"].append(held_out_losses())
        if time.monotonic() - last_save >= config.save_every_s:
            _save_state(saved, student, optimizer, scheduler, step, elapsed, history, fingerprint, source)
            last_save = time.monotonic()
    if not history["held_out"] or history["held_out"][-1].get("step") != step:
        history["held_out"].append(held_out_losses())
    teacher_taps.remove()
    student_taps.remove()
    history["seconds"] = round(time.monotonic() - started, 1)
    history["stopped_by"] = "steps" if step >= config.steps else "time budget"

    save_like_source(student, source, out)
    (out / HISTORY).write_text(json.dumps(history, indent=1) + "\n")
    plot_history(history, out / CURVE)
    shutil.rmtree(saved, ignore_errors=True)
    first, last = history["held_out"][0], history["held_out"][-1]
    return Artifact(method=config.method, model_path=out, calibration_samples=len(train), details={
        "student": {k: details[k] for k in ("dropped_layers", "layers", "intermediate_size", "parameters")},
        "steps": step, "stopped_by": history["stopped_by"], "train_seconds": history["seconds"],
        "held_out_windows": len(valid),
        "held_out_ppl": f"{first.get('ppl', float('nan')):.3f} -> {last.get('ppl', float('nan')):.3f}",
        "held_out_kl": f"{first.get('kl', float('nan')):.4f} -> {last.get('kl', float('nan')):.4f}",
        "loss_curve": CURVE,
    })  # fmt: skip


def _save_state(saved: Path, student: Any, optimizer: Any, scheduler: Any, step: int, spent_s: float,
                history: dict, fingerprint: str, source: Path) -> None:  # fmt: skip
    import torch

    saved.mkdir(parents=True, exist_ok=True)
    tmp = saved / f"{STATE}.tmp"
    torch.save({"student": student.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "spent_s": spent_s, "history": history,
                "fingerprint": fingerprint, "source": str(source)}, tmp)  # fmt: skip
    tmp.replace(saved / STATE)


def plot_history(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = history["train"]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, label="train loss (KL x T^2 + hidden)")
    held = [r for r in history["held_out"] if r]
    if held:
        ax.plot([r["step"] for r in held], [r["kl"] for r in held], "o-", label="held-out KL from the teacher (T=1)")
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.set_title("distillation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
