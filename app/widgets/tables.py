"""DataTables repainted only when what they show changes (a table's redraw repaints all of it: bytes
sent to the terminal)."""

from __future__ import annotations

from rich.text import Text
from textual.coordinate import Coordinate
from textual.widgets import DataTable


def _key(cell) -> object:
    return (cell.plain, tuple(cell.spans), str(cell.style)) if isinstance(cell, Text) else cell


def fill_table(table: DataTable, rows: list) -> bool:
    """Show ``rows`` (sequences of cells) in ``table``: nothing when they are what it shows; the changed
    cells only when the shape is the same (cursor and scroll kept); else the rows rebuilt. Use it for every
    change of that table (it remembers what it last showed). True when the table changed."""
    key = [tuple(_key(c) for c in r) for r in rows]
    old = getattr(table, "_voxtui_rows", None)
    if old == key:
        return False
    if old is not None and len(old) == len(key) and all(len(a) == len(b) for a, b in zip(old, key)):
        for i, (a, b) in enumerate(zip(old, key)):
            for j, (x, y) in enumerate(zip(a, b)):
                if x != y:
                    table.update_cell_at(Coordinate(i, j), rows[i][j], update_width=True)
    else:
        table.clear()
        for r in rows:
            table.add_row(*r)
    table._voxtui_rows = key
    return True
