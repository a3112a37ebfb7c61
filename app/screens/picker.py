"""The run picker: runs under runs/ with state, model, step, loss, age; Enter attaches; space marks runs
(the ``cmp`` column shows each marked run's marker and colour in the comparison, in marking order) and
``c`` compares the marked ones (app/screens/compare.py)."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from app.text import assemble, data
from app.widgets.compare import MARKERS, colour
from engine.client import age_text, list_runs

# the columns' widths but the run name's and the model's (state, step, loss, age, cmp) and each column's
# padding: what a narrow terminal has left is shared between the name and the model, the name first
FIXED = 8 + 6 + 6 + 4 + 3 + 7 * 2
NAME_MAX, MODEL_MAX = 40, 32


def name_widths(width: int) -> tuple[int, int]:
    """How many characters the run name and the model may take at a terminal ``width``: the name gets
    two thirds of what is left (at least 12), the model the rest (at least 8); both are cut with …, so a
    long name never pushes the other columns off the screen."""
    left = max(width - FIXED - 2, 20)  # the scroll bar
    name = min(NAME_MAX, max(12, left * 2 // 3))
    return name, min(MODEL_MAX, max(8, left - name))


class RunPicker(Screen):
    BINDINGS = [Binding("enter", "attach", "Attach"), Binding("space", "mark", "Mark"),
                Binding("c", "compare", "Compare"), Binding("r", "reload", "Reload"),
                Binding("q", "app.quit", "Quit")]

    class RunChosen(Message):
        def __init__(self, path: str) -> None:
            super().__init__()
            self.path = path

    def __init__(self, root: str = "runs") -> None:
        super().__init__()
        self.root = root
        self.paths: list[str] = []
        self.runs: list[dict] = []
        self.marked: list[str] = []  # paths, in the order they were marked (the comparison's order)
        self._widths: tuple[int, int] | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="picker-title", markup=False)
        yield DataTable(id="picker-table", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_column("run", key="run")
        table.add_columns("state", "model", "step", "loss", "age")
        table.add_column("cmp", key="mark")
        self.action_reload()

    def on_resize(self) -> None:
        if self._widths != name_widths(self.size.width):
            self.fill()

    def action_reload(self) -> None:
        self.runs = list_runs(self.root)
        self.paths = [r["path"] for r in self.runs]
        self.marked = [p for p in self.marked if p in self.paths]
        self.fill()
        self.query_one(DataTable).focus()

    def fill(self) -> None:
        """The table from ``self.runs``, the names cut to the terminal's width; the cursor stays on its row."""
        table = self.query_one(DataTable)
        row = table.cursor_row
        table.clear()
        self._widths = _, model_limit = name_widths(self.size.width)
        for r in self.runs:
            loss = f"{r['loss']:.4f}" if isinstance(r["loss"], (int, float)) else "–"
            model = str(r["model"] or "")
            if len(model) > model_limit:
                model = "…" + model[-(model_limit - 1):]  # the end of a path says most
            table.add_row(self._name_cell(r), data(r["state"], limit=9), data(model), data(r["step"], limit=7), loss,
                          age_text(r["age_s"]), self._mark(r["path"]), key=r["path"])
        if self.runs:
            table.move_cursor(row=min(row, len(self.runs) - 1))
        self._title()

    def _name_cell(self, run: dict) -> Text:
        """The run's name, cut to fit; bold in its comparison colour when marked."""
        path = run["path"]
        style = f"bold {colour(self.marked.index(path))}" if path in self.marked else ""
        return data(run["run"], style, limit=self._widths[0] if self._widths else NAME_MAX)

    def _mark(self, path: str) -> Text:
        """A marked run's marker and colour in the comparison (its legend, its plots), in marking order."""
        if path not in self.marked:
            return Text("", end="")
        i = self.marked.index(path)
        return Text(f" {MARKERS[i % len(MARKERS)]}", style=f"bold {colour(i)}", end="")

    def _title(self) -> None:
        root = data(self.root, limit=40)
        n = len(self.runs)
        marked = f" · {len(self.marked)} marked" if self.marked else ""
        self.query_one("#picker-title", Static).update(
            assemble(f"{n} run(s) under ", root, f"/ — Enter attaches · space marks · c compares{marked}") if n else
            assemble("no runs under ", root, "/ (start one with `voxtui run … --detach` or `voxtui demo`)"))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_attach()

    def action_attach(self) -> None:
        table = self.query_one(DataTable)
        if self.paths:
            self.post_message(self.RunChosen(self.paths[table.cursor_row]))

    def action_mark(self) -> None:
        """Mark the highlighted run for comparison, or unmark it; the cursor moves on to the next run."""
        if not self.paths:
            return
        table = self.query_one(DataTable)
        path = self.paths[table.cursor_row]
        if path in self.marked:
            self.marked.remove(path)
        else:
            self.marked.append(path)
        by_path = {r["path"]: r for r in self.runs}
        for p in {path, *self.marked}:  # unmarking one renumbers those marked after it
            table.update_cell(p, "run", self._name_cell(by_path[p]))
            table.update_cell(p, "mark", self._mark(p))
        table.action_cursor_down()
        self._title()

    def action_compare(self) -> None:
        """Compare the marked runs; with none marked, the highlighted one alone (and say how to mark)."""
        from app.screens.compare import CompareScreen

        if not self.paths:
            self.notify("no runs to compare", severity="warning")
            return
        paths = list(self.marked)
        if not paths:
            paths = [self.paths[self.query_one(DataTable).cursor_row]]
            self.notify("no runs marked (space marks them): showing the highlighted run alone", timeout=4)
        self.app.push_screen(CompareScreen(paths))
