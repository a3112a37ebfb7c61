"""Where a training step's time goes: ``VOXTUI_PROFILE_STEPS=A:B`` (knobs.py) runs steps A to B under
``torch.profiler`` and writes ``<run>/profile.txt``: the device time summed by kind of kernel (matrix
products, attention, compiled elementwise kernels, copies, ...) and the kernels themselves, longest first.
A benchmark's tool (``bench/throughput.py --profile``), never on in a user's run."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

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


class StepProfiler:
    """``before(step)`` / ``after(step)`` around each optimizer step (steps counted from 1)."""

    def __init__(self, steps: tuple[int, int], out: Path) -> None:
        self.first, self.last = steps
        self.out = out
        self.prof = None

    def before(self, step: int) -> None:
        if step == self.first and self.prof is None:
            import torch

            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()

    def after(self, step: int) -> None:
        if step == self.last and self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.out.write_text(report(self.prof, self.last - self.first + 1), encoding="utf-8")
            self.prof = None


def report(prof, steps: int) -> str:
    """The GPU kernels' time per step by kind, then the 60 longest kernels (per step); without a GPU the
    CPU operators' own time."""
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        if t and e.device_type.name in ("CUDA", "PrivateUse1"):
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
