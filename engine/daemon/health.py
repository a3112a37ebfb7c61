"""The run's health, judged by the engine from what the workers report: pure logic, no sockets.

``Health.step`` watches the step stream (loss spike, grad-norm blow-up, throughput drop against the
median of the last 50 steps, once 20 are known), ``Health.telemetry`` the GPUs' throttle reasons,
``Health.stall`` the time since the last step and ``Health.disk`` the run's free disk space. Each kind
is raised at most once per period (5 minutes; the disk every 10); what the engine then does is its
``--alert_action`` (docs/engine.md, "Health alerts").
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable

from engine.protocol import Alert, Step, Telemetry

WINDOW = 50  # steps kept for the medians
MIN_HISTORY = 20  # steps seen before a step is judged against them
EVERY = 300.0  # seconds between two alerts of one kind
DISK_EVERY = 600.0
THROTTLE_REASONS = ("hw_slowdown", "sw_thermal", "hw_thermal", "hw_power_brake")
MIN_FREE_BYTES = 2 * 2**30  # the disk is nearly full under this, or under 5% of its size
MIN_FREE_FRACTION = 0.05


class Health:
    """Alerts from the workers' events, rate-limited per kind. ``clock`` is ``time.monotonic`` (a test
    may pass its own)."""

    def __init__(self, stall_timeout: float = 600.0, min_free_bytes: float = MIN_FREE_BYTES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_timeout = stall_timeout
        self.min_free_bytes = min_free_bytes
        self.clock = clock
        self.loss: deque = deque(maxlen=WINDOW)
        self.gnorm: deque = deque(maxlen=WINDOW)
        self.tps: deque = deque(maxlen=WINDOW)
        self.last_alert: dict[str, float] = {}
        self.last_step_time = clock()

    def _once(self, kind: str, every: float = EVERY) -> bool:
        now = self.clock()
        if now - self.last_alert.get(kind, -1e9) < every:
            return False
        self.last_alert[kind] = now
        return True

    def step(self, ev: Step) -> list[Alert]:
        """A step against the recent ones: loss over 3× their median, grad norm over 10×, throughput
        under half."""
        self.last_step_time = self.clock()
        out = []
        if ev.loss is not None and len(self.loss) >= MIN_HISTORY:
            med = statistics.median(self.loss)
            if ev.loss > 3 * med and self._once("loss_spike"):
                out.append(Alert(level="warning", kind="loss_spike", step=ev.step,
                                 message=f"loss {ev.loss:.3f} at step {ev.step} is over 3× the recent median {med:.3f}"))
        if ev.grad_norm is not None and len(self.gnorm) >= MIN_HISTORY:
            med = statistics.median(self.gnorm)
            if med > 0 and ev.grad_norm > 10 * med and self._once("grad_norm_blowup"):
                out.append(Alert(level="warning", kind="grad_norm_blowup", step=ev.step,
                                 message=f"grad norm {ev.grad_norm:.3g} at step {ev.step} is over 10× the recent median {med:.3g}"))
        if len(self.tps) >= MIN_HISTORY:
            med = statistics.median(self.tps)
            if ev.tokens_per_s < 0.5 * med and self._once("throughput_drop"):
                out.append(Alert(level="warning", kind="throughput_drop", step=ev.step,
                                 message=f"{ev.tokens_per_s:,.0f} tokens/s at step {ev.step}, under half the recent median {med:,.0f}"))
        if ev.loss is not None:
            self.loss.append(ev.loss)
        if ev.grad_norm is not None:
            self.gnorm.append(ev.grad_norm)
        self.tps.append(ev.tokens_per_s)
        return out

    def telemetry(self, ev: Telemetry) -> list[Alert]:
        """A GPU that reports a thermal or power throttle reason (once per period for each GPU)."""
        out = []
        for g in ev.gpus:
            hot = [t for t in g.throttle if t in THROTTLE_REASONS]
            if hot and self._once(f"throttle-{g.index}"):
                out.append(Alert(level="warning", kind="gpu_throttle",
                                 message=f"GPU {g.index} is throttling ({', '.join(hot)}) at {g.temp:.0f}°C, {g.power:.0f} W"))
        return out

    def stall(self) -> Alert | None:
        """No optimizer step for ``stall_timeout`` seconds (asked only while the run is running and not
        stopping); the clock starts again after each alert."""
        if self.clock() - self.last_step_time <= self.stall_timeout:
            return None
        self.last_step_time = self.clock()
        return Alert(level="warning", kind="stall", message=f"no optimizer step for {self.stall_timeout:.0f} s")

    def disk(self, free: int, total: int) -> Alert | None:
        """The run's disk under ``min_free_bytes`` or 5% free (``shutil.disk_usage``'s figures)."""
        if free < max(self.min_free_bytes, MIN_FREE_FRACTION * total) and self._once("disk_full", DISK_EVERY):
            return Alert(level="warning", kind="disk_nearly_full", message=f"{free / 2**30:.1f} GiB free on the run's disk")
        return None
