"""Everything the dashboard shows, folded from the run's events (no Textual here: plain data)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class RunState:
    run: str = ""
    last_seq: int = 0
    state: str = "new"
    status_message: str = ""
    info: dict = field(default_factory=dict)  # run_info
    params: dict = field(default_factory=dict)  # param_table
    steps: list = field(default_factory=list)  # (step, loss, lr, grad_norm, tokens_per_s, mfu)
    last_step: object = None
    evals: list = field(default_factory=list)  # (step, loss, ppl)
    best: tuple | None = None
    previews: dict = field(default_factory=dict)  # index → list of preview events (history)
    checkpoints: dict = field(default_factory=dict)  # step → checkpoint event
    alerts: deque = field(default_factory=lambda: deque(maxlen=200))
    telemetry: object = None
    inference: dict = field(default_factory=dict)  # name → latest inference event
    events: deque = field(default_factory=lambda: deque(maxlen=5000))
    started: float | None = None
    gaps: int = 0

    def apply(self, ev) -> None:
        if ev.seq <= self.last_seq:
            return
        if self.last_seq and ev.seq != self.last_seq + 1:
            self.gaps += 1
        self.last_seq = ev.seq
        self.run = ev.run or self.run
        self.events.append(ev)
        match ev.type:
            case "status":
                self.state, self.status_message = ev.state, ev.message
                if ev.state == "running" and self.started is None:
                    self.started = ev.time
            case "run_info":
                self.info = {"model_id": ev.model_id, "world_size": ev.world_size, "device": ev.device,
                             "total_steps": ev.total_steps, "steps_per_epoch": ev.steps_per_epoch,
                             "train_rows": ev.train_rows, "val_rows": ev.val_rows}
            case "param_table":
                self.params = {"rows": ev.rows, "trainable": ev.trainable, "total": ev.total}
            case "step":
                self.last_step = ev
                self.steps.append((ev.step, ev.loss, ev.lr, ev.grad_norm, ev.tokens_per_s, ev.mfu, ev.time))
            case "eval":
                self.evals.append((ev.step, ev.loss, ev.ppl))
                self.best = (ev.best_step, ev.best_loss)
            case "preview":
                self.previews.setdefault(ev.index, []).append(ev)
            case "checkpoint":
                self.checkpoints[ev.step] = ev
            case "alert":
                self.alerts.append(ev)
            case "telemetry":
                self.telemetry = ev
            case "inference":
                self.inference[ev.name] = ev

    @property
    def step(self) -> int:
        return self.last_step.step if self.last_step is not None else 0

    @property
    def total_steps(self) -> int:
        return int(self.info.get("total_steps", 0))

    def eta_s(self) -> float | None:
        """Seconds left at the pace of the last 20 steps."""
        if len(self.steps) < 2 or not self.total_steps or self.state in ("finished", "failed"):
            return None
        recent = self.steps[-20:]
        (s0, *_, t0), (s1, *_, t1) = recent[0], recent[-1]
        if s1 <= s0:
            return None
        return (self.total_steps - s1) * (t1 - t0) / (s1 - s0)

    def epoch(self) -> float:
        return getattr(self.last_step, "epoch", 0.0) if self.last_step is not None else 0.0

    def age(self) -> float:
        return time.time() - self.events[-1].time if self.events else 0.0


def fmt_duration(s: float | None) -> str:
    if s is None:
        return "–"
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"
