"""The run picker: runs under runs/ with state, model, step, loss, age; Enter attaches."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from app.text import assemble, data
from engine.client import age_text, list_runs


class RunPicker(Screen):
    BINDINGS = [Binding("enter", "attach", "Attach"), Binding("r", "reload", "Reload"), Binding("q", "app.quit", "Quit")]

    class RunChosen(Message):
        def __init__(self, path: str) -> None:
            super().__init__()
            self.path = path

    def __init__(self, root: str = "runs") -> None:
        super().__init__()
        self.root = root
        self.paths: list[str] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="picker-title", markup=False)
        yield DataTable(id="picker-table", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns("run", "state", "model", "step", "loss", "age")
        self.action_reload()

    def action_reload(self) -> None:
        runs = list_runs(self.root)
        table = self.query_one(DataTable)
        table.clear()
        self.paths = [r["path"] for r in runs]
        for r in runs:
            loss = f"{r['loss']:.4f}" if isinstance(r["loss"], (int, float)) else "–"
            model = str(r["model"] or "")
            table.add_row(data(r["run"], limit=40), data(r["state"], limit=12),
                          data(("…" + model[-31:]) if len(model) > 32 else model), data(r["step"], limit=10),
                          loss, age_text(r["age_s"]))
        root = data(self.root, limit=60)
        self.query_one("#picker-title", Static).update(
            assemble(f"{len(runs)} run(s) under ", root, "/ — Enter attaches") if runs else
            assemble("no runs under ", root, "/ (start one with `voxtui run … --detach` or `voxtui demo`)"))
        table.focus()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_attach()

    def action_attach(self) -> None:
        table = self.query_one(DataTable)
        if self.paths:
            self.post_message(self.RunChosen(self.paths[table.cursor_row]))
