"""Checkpoints: the complete ones on disk now (pruned ones gone, ones saved after the engine died
included, lora_final too) with step, val loss, the one best and final; run inference on one or all;
metrics by job (finished jobs from infer/*/metrics.json on disk, running ones from events), and the
sample generations of the selected job beside their references."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, DataTable, Static

from app.state import RunState
from app.text import BLEU_FORMAT, assemble, data, lines, show_text
from app.widgets.tables import fill_table

METRICS = (("rougeL", "{:.4f}"), ("distinct_1", "{:.4f}"), ("distinct_2", "{:.4f}"), ("bleu", BLEU_FORMAT),
           ("perplexity", "{:.2f}"))


class Checkpoints(Vertical):
    class InferenceRequested(Message):
        """Inference on a checkpoint: ``step`` (None: lora_final), ``name`` (its folder); or, with
        ``every``, on each of these (step, name) ("Infer all")."""

        def __init__(self, step: int | None, name: str, every: list | None = None) -> None:
            super().__init__()
            self.step, self.name, self.every = step, name, every

    def compose(self) -> ComposeResult:
        yield DataTable(id="ck-table", cursor_type="row", zebra_stripes=True)
        with Horizontal(id="ck-buttons"):
            yield Button("Infer selected", id="ck-one")
            yield Button("Infer all", id="ck-all")
        yield DataTable(id="ck-metrics", cursor_type="row")
        yield Static(id="ck-note", markup=False)
        yield Static(id="ck-samples", markup=False)

    def on_mount(self) -> None:
        self.query_one("#ck-table", DataTable).add_columns("step", "val loss", "best", "final", "checkpoint")
        self.query_one("#ck-metrics", DataTable).add_columns("state", "rows", "ROUGE-L", "Distinct-1", "Distinct-2",
                                                           "BLEU", "ppl", "job")
        self._rows: list[tuple[int | None, str]] = []  # (step or None for lora_final, folder name)
        self._shown_rows: list = []
        self._jobs: list[str] = []
        self._job_view: dict = {}
        self.busy: set[str] = set()  # "infer:<name>" keys in flight
        # what the note says: "empty" (no checkpoint), "unreadable" (the folder), "running:<name>" (inference on
        # it runs already; "running:all": on every checkpoint), "" (other)
        self._note_kind = ""

    def selected(self) -> tuple[int | None, str] | None:
        if not self._rows:
            return None
        table = self.query_one("#ck-table", DataTable)
        return self._rows[min(max(table.cursor_row, 0), len(self._rows) - 1)]

    def infer_selected(self) -> None:
        """The i key: as the "Infer selected" button, also while it is off (the screen then says why: the
        checkpoint's inference runs already)."""
        self.one()

    def infer_all(self) -> None:
        """The a key: as the "Infer all" button, also while it is off (the screen then says why)."""
        self.all()

    @on(Button.Pressed, "#ck-one")
    def one(self) -> None:
        chosen = self.selected()
        if chosen is None:
            self.note("no checkpoint yet", "empty")
            return
        self.post_message(self.InferenceRequested(*chosen))

    @on(Button.Pressed, "#ck-all")
    def all(self) -> None:
        if not self._rows:
            self.note("no checkpoint yet", "empty")
            return
        self.post_message(self.InferenceRequested(None, "all", every=list(self._rows)))

    def note(self, text: str, kind: str = "") -> None:
        """One line under the buttons; ``kind`` names a note that a later fact takes back (clear_note)."""
        show_text(self.query_one("#ck-note", Static), data(text, limit=400))
        self._note_kind = kind

    def clear_note(self, kind: str) -> None:
        """The note goes if it is of ``kind`` (no longer true: checkpoints came, the folder was read)."""
        if self._note_kind == kind:
            self.note("")

    def sync_buttons(self, busy: set[str] | None = None) -> None:
        """"Infer selected" is off while the selected checkpoint's inference is asked for or running; "Infer
        all" while every checkpoint's is (it skips those)."""
        if busy is not None:
            self.busy = busy
        if self._note_kind.startswith("running:"):  # "inference on X is running already": true while it runs
            name = self._note_kind.removeprefix("running:")
            still = (all(inference_running(n, self.busy) for _, n in self._rows) if name == "all"
                     else inference_running(name, self.busy))
            if not still:
                self.note("")
        chosen = self.selected()
        self.query_one("#ck-one", Button).disabled = chosen is not None and inference_running(chosen[1], self.busy)
        self.query_one("#ck-all", Button).disabled = bool(self._rows) and all(
            inference_running(name, self.busy) for _, name in self._rows)

    @on(DataTable.RowHighlighted, "#ck-table")
    def _checkpoint_highlighted(self) -> None:
        self.sync_buttons()

    def show(self, s: RunState, running: dict | None = None) -> None:
        """``running``: checkpoint name → pid of inference jobs this dashboard started without an engine."""
        running = running or {}
        table = self.query_one("#ck-table", DataTable)
        rows: list[tuple[int | None, str]] = [(c["step"], c["name"]) for c in s.disk_checkpoints or []]
        best = s.best_step()
        final_step = next((st for st, _ in reversed(rows) if st is not None and s.is_final_checkpoint(st)), None)
        if s.disk_final:
            rows.append((None, "lora_final"))
        shown = []
        for step, name in rows:
            if step is None:  # the final adapter alone (the same weights as the final checkpoint, if kept)
                loss = s.val_loss_at(final_step) if final_step is not None else None
                shown.append(("–" if final_step is None else str(final_step),
                              f"{loss:.4f}" if loss is not None else "–", "", "adapter", name))
                continue
            loss = s.val_loss_at(step)
            shown.append((str(step), f"{loss:.4f}" if loss is not None else "–", "★" if step == best else "",
                          "final" if s.is_final_checkpoint(step) else "", name))
        if shown != self._shown_rows:
            chosen = self.selected()
            self._rows, self._shown_rows = rows, shown
            table.clear()
            for cells in shown:
                table.add_row(*(data(c, limit=60) for c in cells))
            if rows:
                table.move_cursor(row=rows.index(chosen) if chosen in rows else len(rows) - 1)
        if s.disk_checkpoints is not None and not rows and self._note_kind != "unreadable":
            self.note("no complete checkpoint in the run folder yet", "empty")
        elif rows:
            self.clear_note("empty")
        self.sync_buttons()
        self._show_jobs(s, running)

    def _show_jobs(self, s: RunState, running: dict) -> None:
        """One row per job: finished ones from disk (the truth), else the latest event."""
        view: dict[str, dict] = {}
        for name, d in s.disk_inference.items():
            state = d.get("state", "")
            if state == "incomplete" and (str(d.get("checkpoint")) in running or "all" in running):
                state = "running"
            view[name] = {"state": state, "rows": str(d["rows"]) if "rows" in d else f"{d.get('done', 0)}/?",
                          "metrics": d, "samples": d.get("samples") or []}
        for name, ev in s.inference.items():
            disk = view.get(name)
            if disk is not None and disk["state"] == "finished":
                if not disk["samples"]:
                    disk["samples"] = list(getattr(ev, "samples", None) or [])
                continue
            view[name] = {"state": ev.state, "rows": f"{ev.done}/{ev.total}", "metrics": ev.metrics or {},
                          "samples": list(getattr(ev, "samples", None) or []), "message": ev.message}
        metrics = self.query_one("#ck-metrics", DataTable)
        row = metrics.cursor_row
        before = set(self._jobs)
        self._jobs = sorted(view)
        new = [i for i, name in enumerate(self._jobs) if name not in before] if before else []
        self._job_view = view
        table_rows = []
        for name in self._jobs:
            v = view[name]
            m = v["metrics"] if isinstance(v["metrics"], dict) else {}
            cells = [fmt.format(m[k]) if isinstance(m.get(k), (int, float)) else "–" for k, fmt in METRICS]
            # the job's name last: a long one never pushes the metrics off an 80-column screen
            table_rows.append((data(v["state"], limit=20), data(v["rows"], limit=20), *cells, data(name, limit=60)))
        if fill_table(metrics, table_rows) and self._jobs and metrics.cursor_row != row:
            metrics.move_cursor(row=min(max(row, 0), len(self._jobs) - 1))
        if new:  # a job just started: shown (the table scrolls to it), not left below the fold
            metrics.move_cursor(row=new[0])
        self._show_samples()

    @on(DataTable.RowHighlighted, "#ck-metrics")
    def _job_highlighted(self) -> None:
        self._show_samples()

    def _show_samples(self) -> None:
        box = self.query_one("#ck-samples", Static)
        if not self._jobs:
            show_text(box, "")
            box.display = False
            return
        name = self._jobs[min(max(self.query_one("#ck-metrics", DataTable).cursor_row, 0), len(self._jobs) - 1)]
        v = self._job_view[name]
        samples = [x for x in v["samples"] if isinstance(x, dict)]
        if not samples:
            if v["state"] == "failed":
                text = assemble(data(name, "bold", limit=60), " failed: ", data(v.get("message", ""), limit=300))
            elif v["state"] != "finished":
                text = assemble(data(name, limit=60), ": sample generations appear when the job finishes")
            else:
                text = None
            show_text(box, text or "")
            box.display = text is not None
            return
        rows = [assemble(data(name, "bold", limit=60), " — sample generations (line: prompt → prediction | reference)")]
        for x in samples:
            score = f" ROUGE-L {x['rougeL']:.2f}" if isinstance(x.get("rougeL"), (int, float)) else ""
            rows.append(assemble((f"line {plain_line(x.get('line'))}{score}", "dim"), " ",
                                 data(x.get("prompt", ""), limit=80)))
            rows.append(assemble("  → ", data(x.get("prediction", ""), limit=160)))
            rows.append(assemble(("  | ", "dim"), data(x.get("reference", ""), "dim", limit=160)))
        show_text(box, lines(*rows))
        box.display = True


def inference_running(name: str, busy: set[str]) -> bool:
    """Whether inference on checkpoint ``name`` is asked for or running: ``busy`` holds "infer:<name>" keys,
    "infer:all" for a job on every checkpoint-N (lora_final is no part of it)."""
    return f"infer:{name}" in busy or ("infer:all" in busy and name != "lora_final")


def plain_line(value) -> str:
    return str(value) if isinstance(value, int) else "?"
