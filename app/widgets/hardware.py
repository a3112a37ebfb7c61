"""GPUs (or the CPU host) and per-rank speed, with the straggler marked."""

from __future__ import annotations

import math
import statistics

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from app.state import RANK_TIMES_KEPT, RunState
from app.text import assemble, data, show_text
from app.widgets.tables import fill_table

STRAGGLER = 1.2  # a rank is a straggler when its step time is above this × the median of the others
STRAGGLER_RULE = f"straggler: step time > {STRAGGLER:g}× the others' median (over the last {RANK_TIMES_KEPT} steps)"


def straggler(step_times: list[float]) -> int | None:
    """The rank whose step time is clearly above the others' (> 1.2 × their median), or None. A rank
    without a measured time (0, not finite) is never one, and is not counted among the others."""
    times = [(i, t) for i, t in enumerate(step_times)
             if isinstance(t, (int, float)) and math.isfinite(t) and t > 0]
    if len(times) < 2:
        return None
    slow, worst = max(times, key=lambda it: it[1])
    others = [t for i, t in times if i != slow]
    return slow if worst > STRAGGLER * statistics.median(others) else None


class Hardware(Vertical):
    def compose(self) -> ComposeResult:
        yield Static(id="hw-host", markup=False)
        yield DataTable(id="hw-gpus", cursor_type="row", zebra_stripes=True)
        yield DataTable(id="hw-ranks", cursor_type="row")
        yield Static(STRAGGLER_RULE, id="hw-rule", markup=False)

    def on_mount(self) -> None:
        self.query_one("#hw-gpus", DataTable).add_columns("GPU", "name", "util %", "memory GiB", "power W",
                                                         "temp °C", "SM MHz", "throttle")
        self.query_one("#hw-ranks", DataTable).add_columns("rank", "step time s", "tokens/s", "")
        self.query_one("#hw-gpus", DataTable).display = False  # until a GPU is reported (never on a CPU run)

    def show(self, s: RunState) -> None:
        t = s.telemetry
        host = self.query_one("#hw-host", Static)
        gpus = self.query_one("#hw-gpus", DataTable)
        gpu_rows = []
        every = s.gpus()
        hosts = {h for h, _ in every}
        if t is None:
            show_text(host, assemble("no telemetry yet"))
        elif not every:
            show_text(host, assemble("CPU run on ", data(t.host, limit=60),
                                     f": process CPU {t.cpu_percent or 0:.0f}%, RSS {t.rss or 0:.2f} GiB, "
                                     f"host memory {100 * (t.mem_used_frac or 0):.0f}% used"))
        else:
            show_text(host, assemble(f"{len(every)} GPU(s) on ", data(", ".join(sorted(hosts)), limit=60)))
            for h, g in every:
                where = f"{h}:" if len(hosts) > 1 else ""
                gpu_rows.append((data(f"{where}{g.index}", limit=30), data(g.name, limit=40), f"{g.util:.0f}",
                                 f"{g.mem_used:.1f}/{g.mem_total:.0f}", f"{g.power:.0f}", f"{g.temp:.0f}",
                                 f"{g.sm_clock:.0f}", data(",".join(map(str, g.throttle)) or "–", limit=60)))
        fill_table(gpus, gpu_rows)
        gpus.display = bool(every)
        rank_rows = []
        last = s.last_step
        if last is not None and last.step_time_rank:
            slow = straggler(s.rank_step_times())
            tps_rank = list(last.tokens_per_s_rank) + [None] * len(last.step_time_rank)
            for r, st in enumerate(last.step_time_rank):
                tps = tps_rank[r]
                rank_rows.append((str(r), f"{st:.3f}", f"{tps:,.0f}" if tps is not None else "–",
                                  "straggler" if r == slow else ""))
        fill_table(self.query_one("#hw-ranks", DataTable), rank_rows)
        self.query_one("#hw-rule", Static).display = last is not None and len(last.step_time_rank) > 1
