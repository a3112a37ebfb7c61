"""The learning-rate schedule, and how a resume continues it (docs/training.md, "Checkpoints and resume").

A run's schedule is a linear warm-up over ``--warmup_steps``, then a cosine from ``--lr`` down to
``--min_lr_ratio`` × ``--lr`` at the last step. A resume whose total differs from the run's continues it
without a jump: within the warm-up the warm-up goes on into the new total's cosine; past it, the rate in
force at the checkpoint decays by a cosine to the floor at the new total. ``Schedule`` is what each
checkpoint's ``trainer_state.json`` keeps of it (``{"total", "start", "start_ratio"}``), so a later resume
with the same total continues it exactly.

Pure arithmetic, no torch: the worker hands ``Schedule.lr_lambda`` to ``torch.optim.lr_scheduler.LambdaLR``.
The factor is a plain closure on purpose: LambdaLR saves a callable *object*'s attributes in its
state_dict (and so in optimizer.pt), a function's never.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


def lr_lambda(warmup: int, total: int, min_ratio: float, start: int = 0,
              start_ratio: float | None = None) -> Callable[[int], float]:
    """The learning rate as a share of --lr after ``step`` scheduler steps: linear warm-up, then a cosine
    to ``min_ratio`` at ``total``. With ``start_ratio`` (a resume that changed the total): from step
    ``start`` on, a cosine from ``start_ratio`` (the share in force at the checkpoint) to ``min_ratio`` at
    ``total``, so the rate never jumps."""
    def f(step: int) -> float:
        if start_ratio is not None and step >= start:
            progress = (step - start) / max(total - start, 1)
            return min_ratio + (start_ratio - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return f


@dataclass(frozen=True)
class Schedule:
    """The schedule in force: its total, and where a continued cosine starts and from which share of --lr
    (``start_ratio`` None: the run's own warm-up and cosine)."""

    total: int | None
    start: int = 0
    start_ratio: float | None = None

    def lr_lambda(self, warmup: int, min_ratio: float) -> Callable[[int], float]:
        return lr_lambda(warmup, self.total, min_ratio, self.start, self.start_ratio)

    def to_dict(self) -> dict:
        """As ``trainer_state.json`` keeps it."""
        return {"total": self.total, "start": self.start, "start_ratio": self.start_ratio}

    @classmethod
    def saved(cls, state: dict) -> Schedule:
        """The schedule a checkpoint's trainer state was written under (an older checkpoint without one
        ran its own schedule over its ``total_steps``)."""
        s = state.get("schedule") or {}
        if not s:
            return cls(total=state.get("total_steps"))
        return cls(total=s.get("total"), start=s.get("start", 0), start_ratio=s.get("start_ratio"))


def resumed(saved: Schedule, total: int, step: int, warmup: int, min_ratio: float, lr: float,
            base_lr: float) -> tuple[Schedule, str]:
    """The schedule after a resume at ``step`` to ``total`` steps, and what to tell the user about it
    (empty when nothing changes). ``lr``: the rate in force at the checkpoint; ``base_lr``: --lr.

    The same total: the run's own schedule, exactly. A different total (a new --max_steps or --epochs,
    another rank count): the warm-up, if not over, goes on into the new total's cosine; past it, the rate
    in force at the checkpoint decays by a cosine to --min_lr_ratio × --lr at the new total, so it never
    jumps back up."""
    if saved.total == total:
        return saved, ""
    floor = min_ratio * base_lr
    if step < warmup and saved.start_ratio is None:
        return Schedule(total), (
            f"resume: {saved.total} steps before, {total} now; still warming up (step {step} of {warmup}): "
            f"the warm-up goes on, then a cosine to {floor:.3g} at step {total}")
    # below the floor only where the floor was raised (a finished run at 0 given --min_lr_ratio above 0)
    way = "rises" if lr < floor else "decays"
    return Schedule(total, step, lr / base_lr), (
        f"resume: {saved.total} steps before, {total} now: the learning rate goes on from {lr:.3g} (in force at "
        f"step {step}) and {way} by a cosine to {floor:.3g} at step {total}")
