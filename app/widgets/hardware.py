"""GPUs (or the CPU host) and per-rank speed, with the straggler marked."""

from __future__ import annotations

import statistics

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from app.state import RunState
from app.text import assemble, data

STRAGGLER = 1.2  # a rank is a straggler when its step time is above this × the median of the others


def straggler(step_times: list[float]) -> int | None:
    """The rank whose step time is clearly above the others' (> 1.2 × their median), or None."""
    if len(step_times) < 2:
        return None
    slow = max(range(len(step_times)), key=lambda i: step_times[i])
    others = [t for i, t in enumerate(step_times) if i != slow]
    return slow if step_times[slow] > STRAGGLER * statistics.median(others) else None


class Hardware(Vertical):
    def compose(self) -> ComposeResult:
        yield Static(id="hw-host", markup=False)
        yield DataTable(id="hw-gpus", cursor_type="row", zebra_stripes=True)
        yield DataTable(id="hw-ranks", cursor_type="row")

    def on_mount(self) -> None:
        self.query_one("#hw-gpus", DataTable).add_columns("GPU", "name", "util %", "memory GiB", "power W",
                                                         "temp °C", "SM MHz", "throttle")
        self.query_one("#hw-ranks", DataTable).add_columns("rank", "step time s", "tokens/s", "")

    def show(self, s: RunState) -> None:
        t = s.telemetry
        host = self.query_one("#hw-host", Static)
        gpus = self.query_one("#hw-gpus", DataTable)
        gpus.clear()
        if t is None:
            host.update(assemble("no telemetry yet"))
        elif not t.gpus:
            host.update(assemble("CPU run on ", data(t.host, limit=60),
                                 f": process CPU {t.cpu_percent or 0:.0f}%, RSS {t.rss or 0:.2f} GiB, "
                                 f"host memory {100 * (t.mem_used_frac or 0):.0f}% used"))
        else:
            host.update(assemble(f"{len(t.gpus)} GPU(s) on ", data(t.host, limit=60)))
            for g in t.gpus:
                gpus.add_row(data(g.index), data(g.name, limit=40), f"{g.util:.0f}",
                             f"{g.mem_used:.1f}/{g.mem_total:.0f}", f"{g.power:.0f}", f"{g.temp:.0f}",
                             f"{g.sm_clock:.0f}", data(",".join(map(str, g.throttle)) or "–", limit=60))
        ranks = self.query_one("#hw-ranks", DataTable)
        ranks.clear()
        last = s.last_step
        if last is not None and last.step_time_rank:
            slow = straggler(list(last.step_time_rank))
            tps_rank = list(last.tokens_per_s_rank) + [None] * len(last.step_time_rank)
            for r, st in enumerate(last.step_time_rank):
                tps = tps_rank[r]
                ranks.add_row(str(r), f"{st:.3f}", f"{tps:,.0f}" if tps is not None else "–",
                              "straggler" if r == slow else "")
