"""Where a training step's time goes: ``VOXTUI_PROFILE_STEPS=A:B`` (knobs.py) runs steps A to B under
``torch.profiler`` and writes ``<run>/profile.txt``: the device time summed by kind of kernel (matrix
products, attention, compiled elementwise kernels, copies, ...) and the kernels themselves, longest first;
the host's time in each phase of the step (``phase``: the batch, forward, backward, the step boundary's
gather, optimizer and report, ...); and how long the GPU sat idle with what the host was doing.
A benchmark's tool (``bench/throughput.py --profile``), never on in a user's run."""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from pathlib import Path

PHASE = "voxtui."  # the prefix of the host phases' ranges
_active = False  # a profiler is recording: phase() marks ranges

# kernel name → kind; the first pattern that matches wins
KINDS: list[tuple[str, re.Pattern]] = [
    ("attention", re.compile(r"flash|fmha|attention|sdpa|cudnn.*(attn|mha)", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|xmma|cutlass|wgmma|sm90_|ampere_|cublas|matmul|::mm$|::addmm|::bmm|::linear$", re.I)),
    ("compiled (triton)", re.compile(r"^triton_|triton", re.I)),
    ("reduction / softmax", re.compile(r"reduce|softmax|norm|sum", re.I)),
    ("copy / cast / fill", re.compile(r"copy|memcpy|memset|fill|cast|cat|index", re.I)),
    ("elementwise (eager)", re.compile(r"elementwise|vectorized|unrolled", re.I)),
]


def kind(name: str) -> str:
    for label, pattern in KINDS:
        if pattern.search(name):
            return label
    return "other"


def phase(name: str):
    """A named range of host work (``voxtui.<name>``) while a profile records; nothing otherwise."""
    if not _active:
        return contextlib.nullcontext()
    import torch

    return torch.profiler.record_function(PHASE + name)


class StepProfiler:
    """``before(step)`` / ``after(step)`` around each optimizer step (steps counted from 1)."""

    def __init__(self, steps: tuple[int, int], out: Path) -> None:
        self.first, self.last = steps
        self.out = out
        self.prof = None

    def before(self, step: int) -> None:
        if step == self.first and self.prof is None:
            import time

            self.t0 = time.perf_counter()
            import torch

            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
            global _active
            _active = True

    def after(self, step: int) -> None:
        if step == self.last and self.prof is not None:
            import time

            wall = time.perf_counter() - self.t0
            global _active
            _active = False
            self.prof.__exit__(None, None, None)
            n = self.last - self.first + 1
            text = report(self.prof, n)
            text += "\n" + phase_report(self.prof, n, wall)
            text += "\n" + idle_report(self.prof, n, wall)
            self.out.write_text(text, encoding="utf-8")
            self.prof = None


def report(prof, steps: int) -> str:
    """The GPU kernels' time per step by kind, then the 60 longest kernels (per step); without a GPU the
    CPU operators' own time."""
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        if t and e.device_type.name in ("CUDA", "PrivateUse1") and not _annotation(e):
            rows.append((e.key, float(t) / steps, e.count // max(steps, 1)))
    what = "GPU kernels"
    if not rows:  # no GPU: the CPU operators' own time instead
        what = "CPU operators"
        rows = [(e.key, float(e.self_cpu_time_total) / steps, e.count // max(steps, 1)) for e in prof.key_averages()]
    total = sum(r[1] for r in rows) or 1.0
    by_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, t, n in rows:
        k = by_kind[kind(name)]
        k[0] += t
        k[1] += n
    out = [f"time per step ({what}), {steps} steps profiled: {total / 1e3:.2f} ms", "",
           f"{'kind':<24}{'ms/step':>10}{'share':>8}{'kernels':>9}"]
    for label, (t, n) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        out.append(f"{label:<24}{t / 1e3:>10.2f}{100 * t / total:>7.1f}%{n:>9}")
    out += ["", f"{'ms/step':>9}{'share':>8}{'calls':>7}  kernel (kind)"]
    for name, t, n in sorted(rows, key=lambda r: -r[1])[:60]:
        out.append(f"{t / 1e3:>9.3f}{100 * t / total:>7.1f}%{n:>7}  {name[:150]} ({kind(name)})")
    return "\n".join(out) + "\n"


def _annotation(e) -> bool:
    """A range the profiler draws on the GPU's timeline for a ``phase`` (or any record_function): it spans the
    kernels launched within it, gaps included, so it is neither a kernel nor busy time."""
    return bool(getattr(e, "is_user_annotation", False)) or str(getattr(e, "key", None) or e.name).startswith(PHASE)


def phase_report(prof, steps: int, wall: float) -> str:
    """The host's time per step in each ``phase`` (outer phases include the inner ones)."""
    try:
        per: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for e in prof.events():
            if e.device_type.name == "CPU" and e.name.startswith(PHASE):
                p = per[e.name[len(PHASE):]]
                p[0] += e.time_range.end - e.time_range.start
                p[1] += 1
        out = [f"host time per step by phase (wall {1e3 * wall / steps:.2f} ms)", "",
               f"{'ms/step':>9}{'calls':>7}  phase"]
        for name, (t, n) in sorted(per.items(), key=lambda kv: -kv[1][0]):
            out.append(f"{t / 1e3 / steps:>9.2f}{n // max(steps, 1):>7}  {name}")
        return "\n".join(out) + "\n"
    except Exception as e:  # a report, never a reason to stop training
        return f"phase analysis failed: {type(e).__name__}: {e}\n"


def idle_report(prof, steps: int, wall: float) -> str:
    """How long the GPU sat idle within the profiled steps (wall time less the union of its kernels), and
    what the host was doing meanwhile: each gap of 50 µs or more is charged to the innermost host
    operation under way at its middle."""
    try:
        events = list(prof.events())
        kernels = sorted((e.time_range.start, e.time_range.end) for e in events
                         if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start
                         and not _annotation(e))
        if not kernels:
            return f"wall time per step {1e3 * wall / steps:.2f} ms (no GPU kernels)\n"
        busy, gaps = 0.0, []
        start, end = kernels[0]
        for a, b in kernels[1:]:
            if a > end:
                busy += end - start
                if a - end >= 50:
                    gaps.append((end, a))
                start, end = a, b
            else:
                end = max(end, b)
        busy += end - start
        import bisect

        host = sorted((e.time_range.start, e.time_range.end, e.name) for e in events if e.device_type.name == "CPU")
        starts = [h[0] for h in host]
        charged: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for a, b in gaps:
            mid = (a + b) / 2
            inner = "(no host operation)"
            i = bisect.bisect_right(starts, mid) - 1
            for j in range(i, max(i - 5000, -1), -1):  # the latest started that has not ended
                if host[j][1] >= mid:
                    inner = host[j][2]
                    break
            c = charged[inner]
            c[0] += b - a
            c[1] += 1
        ms = 1e3 * wall / steps
        out = [f"wall time per step {ms:.2f} ms; GPU busy {busy / 1e3 / steps:.2f} ms; idle in gaps of >= 50 µs "
               f"{sum(b - a for a, b in gaps) / 1e3 / steps:.2f} ms ({len(gaps) // max(steps, 1)} gaps a step)",
               "", f"{'ms/step':>9}{'gaps':>7}  host operation under way (innermost)"]
        for name, (t, n) in sorted(charged.items(), key=lambda kv: -kv[1][0])[:25]:
            out.append(f"{t / 1e3 / steps:>9.2f}{n // max(steps, 1):>7}  {name[:150]}")
        return "\n".join(out) + "\n"
    except Exception as e:  # a report, never a reason to stop training
        return f"idle analysis failed: {type(e).__name__}: {e}\n"
