"""Preflight: the run folder's last preflight report (preflight.json), one check a row. A long message
wraps under itself (a hanging indent), so the level and area columns stay readable however narrow the
terminal; everything the report says is a run's data, never markup."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from app.text import assemble, data, plain

LEVEL_STYLE = {"ok": "green", "info": "blue", "warn": "yellow", "fail": "red"}


def report_renderable(report: dict, in_run: bool = False) -> Group:
    """The verdict, the checks (level, area, message) and the launch command; in a run's folder (``in_run``),
    how to continue the run once it has trained (the command starts a new run: the worker refuses a folder
    that holds one)."""
    checks = Table.grid(padding=(0, 1))
    checks.add_column(no_wrap=True)
    checks.add_column(no_wrap=True)
    checks.add_column(overflow="fold")  # a long word (a path) is broken rather than cut
    for c in report.get("checks", []):
        level = str(c.get("level", ""))
        checks.add_row(Text(f"{plain(level, limit=4):>4}", style=LEVEL_STYLE.get(level, "")),
                       data(f"{plain(c.get('area', ''), limit=7):<7}"),
                       data(c.get("message", ""), limit=2000, one_line=False))
    launch = Table.grid(padding=(0, 1))
    launch.add_column(no_wrap=True)
    launch.add_column(overflow="fold")
    launch.add_row(Text("launch:"), data(report.get("command", ""), limit=2000, one_line=False))
    if in_run and " --resume " in str(report.get("command", "")):  # made by a resume (voxtui run --resume)
        launch.add_row(Text(""), Text("(continues this run from its latest checkpoint, as voxtui run --resume did)"))
    elif in_run:
        launch.add_row(Text(""), Text("(starts the run this report was made for; once it has trained, continue it "
                                      "with voxtui run --resume RUN, RUN this run's folder)"))
    verdict = assemble(("verdict: ", "bold"), data(str(report.get("verdict", "?")).upper(), "bold", limit=20))
    verdict.end = "\n"
    return Group(verdict, Text(""), checks, Text(""), launch)


class PreflightReport(Static):
    """The report of ``runs/<run>/preflight.json`` (or why there is none to show)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(markup=False, **kwargs)

    def show(self, path: Path) -> None:
        if not path.exists():
            self.update(assemble("no preflight report in this run folder"))
            return
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
            self.update(report_renderable(report, in_run=True))
        except (OSError, ValueError, AttributeError, TypeError) as e:
            self.update(assemble(f"{path}: not a readable preflight report (",
                                 data(f"{type(e).__name__}: {e}", limit=200), ")"))
