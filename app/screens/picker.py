"""The run picker: runs under runs/ with state, model, step, loss, age; Enter attaches; space marks runs
(the ``cmp`` column shows each marked run's marker and colour in the comparison, in marking order) and
``c`` compares the marked ones (app/screens/compare.py)."""

from __future__ import annotations

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from app.text import assemble, data
from app.widgets.compare import MARKERS, colour
from engine.client import age_text, list_runs, status_reply

# the columns' widths but the run name's and the model's (state, step, loss, age, cmp) and each column's
# padding: what a narrow terminal has left is shared between the name and the model, the name first
FIXED = 8 + 6 + 6 + 4 + 3 + 7 * 2
NAME_MAX, MODEL_MAX = 40, 32
REFRESH_S = 2.0  # the runs are read again this often (a thread: a slow disk never stalls the screen)
COLUMNS = ("state", "model", "step", "loss", "age")


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
        self._reading = False  # a read of the runs is under way (in a thread)

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="picker-title", markup=False)
        yield DataTable(id="picker-table", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_column("run", key="run")
        for name in COLUMNS:
            table.add_column(name, key=name)
        table.add_column("cmp", key="mark")
        self.action_reload()
        self._refresh = self.set_interval(REFRESH_S, self.refresh_runs)

    def on_screen_suspend(self) -> None:  # a run's screen (or a comparison) covers the picker: no reading
        self._refresh.pause()

    def on_screen_resume(self) -> None:
        self._refresh.resume()
        self.refresh_runs()

    def on_resize(self) -> None:
        if self._widths != name_widths(self.size.width):
            self.fill()

    def action_reload(self) -> None:
        self.show_runs(list_runs(self.root), resort=True)  # the files at once; engines asked in the refresh
        self.query_one(DataTable).focus()
        self.refresh_runs()

    def refresh_runs(self) -> None:
        """New runs, and the states, steps and ages of the others, as they change (no key needed); one
        read at a time (a slow or hung disk does not pile up threads)."""
        if not self._reading:
            self._reading = True
            self.read_runs()

    @work(thread=True, group="picker")
    def read_runs(self) -> None:
        try:
            # a live engine whose events.jsonl cannot say (gone, emptied, a folder) is asked for its state
            found = list_runs(self.root, ask=status_reply)
        except Exception:  # the folder went away mid-read, …: the next refresh reads it again
            found = None
        try:
            self.app.call_from_thread(self.runs_read, found)
        except RuntimeError:  # the app is closing
            pass

    def runs_read(self, found: list[dict] | None) -> None:
        self._reading = False
        if found is not None:
            self.show_runs(found)

    def show_runs(self, found: list[dict], resort: bool = False) -> None:
        """The runs read, in a stable order: the runs already listed keep their places (a refresh never
        moves a row under the cursor), new ones come first; ``resort`` (r, the first read): newest first.
        The same runs change only the cells that differ (no redraw of the whole table, the cursor
        untouched); otherwise the table is filled again, the cursor on its run."""
        if not resort and self.paths:
            place = {p: i for i, p in enumerate(self.paths)}
            new = [r for r in found if r["path"] not in place]
            found = new + sorted((r for r in found if r["path"] in place), key=lambda r: place[r["path"]])
        paths = [r["path"] for r in found]
        same = paths == self.paths and self._widths == name_widths(self.size.width)
        self.runs, self.paths = found, paths
        self.marked = [p for p in self.marked if p in self.paths]
        if not same:
            self.fill()
            return
        table = self.query_one(DataTable)
        for r in found:
            for name, cell in zip(COLUMNS, self._cells(r)):
                if str(table.get_cell(r["path"], name)) != str(cell):
                    table.update_cell(r["path"], name, cell, update_width=True)  # running → finished

    def _cells(self, r: dict) -> list:
        """A run's state, model, step, loss and age cells."""
        model_limit = (self._widths or name_widths(self.size.width))[1]
        loss = f"{r['loss']:.4f}" if isinstance(r["loss"], (int, float)) else "–"
        model = str(r["model"] or "")
        if len(model) > model_limit:
            model = "…" + model[-(model_limit - 1):]  # the end of a path says most
        return [data(r["state"], limit=9), data(model), data(r["step"], limit=7), loss, age_text(r["age_s"])]

    def fill(self) -> None:
        """The table from ``self.runs``, the names cut to the terminal's width; the cursor stays on its run
        (on its row when that run is gone)."""
        table = self.query_one(DataTable)
        row = table.cursor_row
        try:
            here = str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
        except Exception:  # an empty table: no row under the cursor
            here = None
        table.clear()
        self._widths = name_widths(self.size.width)
        for r in self.runs:
            table.add_row(self._name_cell(r), *self._cells(r), self._mark(r["path"]), key=r["path"])
        if self.runs:
            table.move_cursor(row=self.paths.index(here) if here in self.paths else min(row, len(self.runs) - 1))
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
        elif len(paths) == 1:
            self.notify("one run marked: showing it alone (space marks more)", timeout=4)
        self.app.push_screen(CompareScreen(paths))
