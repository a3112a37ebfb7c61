"""GPUs (or the CPU host) and per-rank speed, with the straggler marked."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from app.state import RunState


class Hardware(Vertical):
    def compose(self) -> ComposeResult:
        yield Static(id="hw-host")
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
            host.update("no telemetry yet")
        elif not t.gpus:
            host.update(f"CPU run on {t.host}: process CPU {t.cpu_percent or 0:.0f}%, RSS {t.rss or 0:.2f} GiB, "
                        f"host memory {100 * (t.mem_used_frac or 0):.0f}% used")
        else:
            host.update(f"{len(t.gpus)} GPU(s) on {t.host}")
            for g in t.gpus:
                gpus.add_row(str(g.index), g.name, f"{g.util:.0f}", f"{g.mem_used:.1f}/{g.mem_total:.0f}",
                             f"{g.power:.0f}", f"{g.temp:.0f}", f"{g.sm_clock:.0f}", ",".join(g.throttle) or "–")
        ranks = self.query_one("#hw-ranks", DataTable)
        ranks.clear()
        last = s.last_step
        if last is not None and last.step_time_rank:
            slow = max(range(len(last.step_time_rank)), key=lambda i: last.step_time_rank[i])
            for r, (st, tps) in enumerate(zip(last.step_time_rank, last.tokens_per_s_rank)):
                mark = "straggler" if r == slow and len(last.step_time_rank) > 1 else ""
                ranks.add_row(str(r), f"{st:.3f}", f"{tps:,.0f}", mark)
