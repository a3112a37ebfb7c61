"""Checkpoints: complete ones with step and val loss; run inference on one or all; metrics by step, and
the sample generations of the selected inference job beside their references."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.markup import escape
from textual.message import Message
from textual.widgets import Button, DataTable, Static

from app.state import RunState


class Checkpoints(Vertical):
    class InferenceRequested(Message):
        def __init__(self, step: int | None) -> None:
            super().__init__()
            self.step = step

    def compose(self) -> ComposeResult:
        yield DataTable(id="ck-table", cursor_type="row", zebra_stripes=True)
        with Horizontal(id="ck-buttons"):
            yield Button("Infer selected", id="ck-one")
            yield Button("Infer all", id="ck-all")
        yield DataTable(id="ck-metrics", cursor_type="row")
        yield Static(id="ck-note")
        yield Static(id="ck-samples")

    def on_mount(self) -> None:
        self.query_one("#ck-table", DataTable).add_columns("step", "val loss", "best", "final", "checkpoint")
        self.query_one("#ck-metrics", DataTable).add_columns("job", "state", "rows", "ROUGE-L", "Distinct-1",
                                                           "Distinct-2", "BLEU", "ppl")
        self._steps: list[int] = []
        self._jobs: list[str] = []
        self._state: RunState | None = None

    def selected_step(self) -> int | None:
        table = self.query_one("#ck-table", DataTable)
        if not self._steps:
            return None
        return self._steps[min(table.cursor_row, len(self._steps) - 1)]

    @on(Button.Pressed, "#ck-one")
    def one(self) -> None:
        step = self.selected_step()
        if step is None:
            self.query_one("#ck-note", Static).update("no checkpoint yet")
            return
        self.post_message(self.InferenceRequested(step))

    @on(Button.Pressed, "#ck-all")
    def all(self) -> None:
        for step in self._steps:
            self.post_message(self.InferenceRequested(step))

    def show(self, s: RunState) -> None:
        table = self.query_one("#ck-table", DataTable)
        steps = sorted(s.checkpoints)
        if steps != self._steps:
            self._steps = steps
            row = table.cursor_row
            table.clear()
            for st in steps:
                c = s.checkpoints[st]
                table.add_row(str(st), f"{c.val_loss:.4f}" if c.val_loss is not None else "–",
                              "★" if c.best else "", "final" if c.final else "", c.path.rsplit("/", 1)[-1])
            if steps:
                table.move_cursor(row=min(row, len(steps) - 1))
        self._state = s
        metrics = self.query_one("#ck-metrics", DataTable)
        row = metrics.cursor_row
        metrics.clear()
        self._jobs = sorted(s.inference)
        for name, ev in sorted(s.inference.items()):
            m = ev.metrics
            cell = lambda k, f="{:.4f}", m=m: f.format(m[k]) if k in m and m[k] is not None else "–"  # noqa: E731
            metrics.add_row(name, ev.state, f"{ev.done}/{ev.total}", cell("rougeL"), cell("distinct_1"),
                            cell("distinct_2"), cell("bleu", "{:.2f}"), cell("perplexity", "{:.2f}"))
        if self._jobs:
            metrics.move_cursor(row=min(max(row, 0), len(self._jobs) - 1))
        self._show_samples()

    @on(DataTable.RowHighlighted, "#ck-metrics")
    def _job_highlighted(self) -> None:
        self._show_samples()

    def _show_samples(self) -> None:
        box = self.query_one("#ck-samples", Static)
        s = self._state
        if s is None or not self._jobs:
            box.update("")
            box.display = False
            return
        name = self._jobs[min(self.query_one("#ck-metrics", DataTable).cursor_row, len(self._jobs) - 1)]
        ev = s.inference[name]
        samples = getattr(ev, "samples", None) or []
        if not samples:
            text = f"{name}: sample generations appear when the job finishes" if ev.state != "finished" else ""
            box.update(text)
            box.display = bool(text)
            return
        lines = [f"[b]{name}[/b] — sample generations (line: prompt → prediction | reference)"]
        for x in samples:
            score = f" ROUGE-L {x['rougeL']:.2f}" if x.get("rougeL") is not None else ""
            lines.append(f"[dim]line {x.get('line', '?')}{score}[/dim] {escape(_one_line(x.get('prompt', ''), 80))}")
            lines.append(f"  → {escape(_one_line(x.get('prediction', ''), 160))}")
            lines.append(f"  [dim]| {escape(_one_line(x.get('reference', ''), 160))}[/dim]")
        box.update("\n".join(lines))
        box.display = True


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
