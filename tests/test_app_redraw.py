"""What the dashboard writes to the terminal is what changed: unchanged texts and tables are not
repainted, a table's changed cells are updated in place, and nothing ticks while nothing happens."""

from __future__ import annotations

import asyncio

from textual.app import App
from textual.widgets import DataTable, Static

from app.text import assemble, data, show_text
from app.widgets.tables import fill_table


class Box(App):
    def compose(self):
        yield Static(id="s", markup=False)
        yield DataTable(id="t")


def test_unchanged_text_and_rows_are_not_repainted_changed_cells_in_place():
    async def flow():
        app = Box()
        async with app.run_test(size=(60, 10)) as pilot:
            s, t = app.query_one("#s", Static), app.query_one("#t", DataTable)
            t.add_columns("a", "b")
            assert show_text(s, assemble("step 1 ", data("[b]x", "bold")))
            assert not show_text(s, assemble("step 1 ", data("[b]x", "bold")))  # the same: no repaint
            assert show_text(s, assemble("step 1 ", data("[b]x", "italic")))  # a style is a change
            assert str(s.render()).startswith("step 1 [b]x")  # data stays data
            rows = [("1", data("a")), ("2", data("b"))]
            assert fill_table(t, rows) and t.row_count == 2
            assert not fill_table(t, [("1", data("a")), ("2", data("b"))])
            t.move_cursor(row=1)
            assert fill_table(t, [("1", data("a")), ("2", data("a much longer cell"))])
            assert t.cursor_row == 1 and t.get_cell_at((1, 1)).plain == "a much longer cell"  # in place
            assert fill_table(t, [("3", "c")]) and t.row_count == 1 and t.get_cell_at((0, 0)) == "3"  # rebuilt
            await pilot.pause(0.1)

    asyncio.run(flow())


def test_the_run_screen_sets_no_timer_while_nothing_is_new(tmp_path):
    from app.app import VoxApp
    from app.screens.run import RunScreen

    async def flow():
        app = VoxApp(str(tmp_path))  # an empty run folder: no engine, no events
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause(0.5)
            screen = app.screen
            assert isinstance(screen, RunScreen)
            assert screen._wake_timer is None and not screen._dirty
            redraws = []
            original = screen.render_if_dirty
            screen.render_if_dirty = lambda: (redraws.append(1), original())
            await pilot.pause(1.5)
            assert redraws == [] and screen._wake_timer is None  # idle: no redraw, no timer pending
            screen.mark_dirty()  # news after a quiet spell: drawn at once
            assert redraws == [1] and not screen._dirty
            screen.mark_dirty()  # right after: at most every REDRAW_GAP_S, by one timer
            assert redraws == [1] and screen._wake_timer is not None
            await pilot.pause(0.2)
            assert redraws == [1, 1] and screen._wake_timer is None
            await pilot.press("q")

    asyncio.run(flow())
