"""Keys 1–9 and 0 switch tabs wherever focus is, except in a text field (digits go into it); Escape leaves a
text field. Pilot presses real keys in the dashboard attached to a real engine replaying the recorded run."""

import asyncio
import subprocess
import sys
import time

import pytest
from test_snapshots import RECORDED, recorded_checkpoints

from conftest import ROOT, pilot_wait

TABS = ("overview", "gpus", "previews", "checkpoints", "preflight", "events", "charts", "evals", "config", "logs")
KEYS = "1234567890"


@pytest.fixture(scope="session")  # once a test process: the slowest-first order interleaves the modules
def replayed(tmp_path_factory):
    from engine.client import engine_alive, engine_info

    run = tmp_path_factory.mktemp("keys") / "recorded_run"
    subprocess.run([sys.executable, "-m", "engine", "engine", "replay", str(RECORDED / "events.jsonl"), "--run-dir",
                    str(run)], cwd=ROOT, check=True, capture_output=True)
    deadline = time.time() + 30
    while time.time() < deadline and '"finished"' not in (run / "events.jsonl").read_text():
        time.sleep(0.1)
    assert engine_alive(engine_info(run))
    recorded_checkpoints(run)
    yield run
    subprocess.run([sys.executable, "-m", "engine", "engine", "stop", str(run)], cwd=ROOT, capture_output=True)


@pytest.mark.slow
def test_digits_switch_tabs_wherever_focus_is_but_in_a_text_field(replayed):
    from textual.widgets import Button, DataTable, Input, OptionList, TabbedContent

    from app.app import VoxApp

    async def flow():
        app = VoxApp(str(replayed))
        app.animation_level = "none"  # the tab underline's glide: Pilot would wait for it at every key
        async with app.run_test(size=(100, 30)) as pilot:
            for _ in range(100):
                if app.state.state == "finished" and app.state.disk_checkpoints:
                    break
                await pilot.pause(0.05)
            tabs = app.screen.query_one(TabbedContent)
            checked = []
            for i, tab in enumerate(TABS):
                await pilot.press(KEYS[i])
                await pilot.pause(0.1)
                assert tabs.active == tab, f"key {KEYS[i]} with nothing focused"
                pane = app.screen.query_one(f"#{tab}")
                focusable = [w for w in pane.query("*") if isinstance(w, (DataTable, OptionList, Button, Input))
                             and w.display and not w.disabled]  # (a CPU run's GPU table is hidden; an ended
                # run's preview buttons are greyed out)
                for w in focusable:
                    await pilot.press(KEYS[i])
                    await pilot.pause(0.1)
                    if isinstance(w, (DataTable, OptionList)) and w.region.area:
                        await pilot.click(w)  # as a user does
                    else:
                        w.focus()  # a click on a button would press it
                    await pilot.pause(0.1)
                    assert app.focused is w and tabs.active == tab
                    if isinstance(w, Input):
                        before = w.value
                        await pilot.press("end", "4")  # a digit typed into a field is text, not a tab key
                        await pilot.pause(0.1)
                        assert tabs.active == tab and w.value == before + "4" and app.focused is w
                        w.value = before
                        await pilot.press("escape")  # leaves the field …
                        await pilot.pause(0.1)
                        assert app.focused is None and tabs.active == tab
                    other = (i + 1) % len(TABS)
                    await pilot.press(KEYS[other])  # … so that a digit switches tabs again
                    await pilot.pause(0.1)
                    assert tabs.active == TABS[other], f"{w!r} in {tab}: key {KEYS[other]} left it on {tabs.active}"
                    checked.append((tab, type(w).__name__))
            await pilot.press("q")
        return checked

    checked = asyncio.run(flow())
    kinds = {k for _, k in checked}
    assert {"DataTable", "OptionList", "Button", "Input"} <= kinds, checked
    assert {t for t, _ in checked} >= {"gpus", "previews", "checkpoints", "events", "evals", "config", "logs"}


@pytest.mark.slow
def test_the_checkpoints_tab_takes_the_arrows_and_i_infers_the_chosen_checkpoint(replayed):
    """Key 4 puts the checkpoint table in focus (the arrows choose at once); i asks for inference on the chosen
    one, a on all — in the Checkpoints tab only. Here the recorded run's val file is not on this machine, so
    the dashboard answers with the command to run instead of starting a job."""
    from textual.widgets import DataTable, Static, TabbedContent

    from app.app import VoxApp

    async def flow():
        app = VoxApp(str(replayed))
        app.animation_level = "none"
        async with app.run_test(size=(120, 40)) as pilot:
            for _ in range(100):
                if app.state.state == "finished" and app.state.disk_checkpoints:
                    break
                await pilot.pause(0.05)
            note = app.screen.query_one("#ck-note", Static)
            await pilot.press("1", "i")  # not in the Checkpoints tab: nothing
            await pilot.pause(0.1)
            assert app.screen.query_one(TabbedContent).active == "overview" and "voxtui infer" not in str(note.render())
            await pilot.press("4")
            await pilot.pause(0.2)
            table = app.screen.query_one("#ck-table", DataTable)
            assert app.focused is table and table.row_count >= 2
            before = table.cursor_row
            await pilot.press("up" if before > 0 else "down", "i")
            await pilot.pause(0.2)
            chosen = app.screen.query_one("Checkpoints").selected()
            assert table.cursor_row == (before - 1 if before > 0 else 1) and chosen[0] is not None
            assert f"voxtui infer --run {replayed} --checkpoint {chosen[0]} --data" in str(note.render())
            await pilot.press("a")
            await pilot.pause(0.2)
            assert "--all-checkpoints" in str(note.render())
            await pilot.press("q")

    asyncio.run(flow())


def test_slash_goes_into_the_events_filter_and_the_logs_search(replayed):
    """`/` in the Events tab puts the cursor in its filter, so that the letters typed filter and never
    command the run (a user typed "/pre" there: p paused the run, e evaluated); in Logs, its search; in
    another tab it does nothing."""
    from textual.widgets import Input

    from app.app import VoxApp

    async def flow():
        app = VoxApp(str(replayed))
        app.animation_level = "none"
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause(0.5)
            seen = {}
            for key, field in (("6", "#ev-filter"), ("0", "#log-search"), ("1", None)):
                await pilot.press(key)
                await pilot.pause(0.1)
                await pilot.press("slash", "p", "e")
                await pilot.pause(0.2)
                focused = app.focused
                seen[key] = (focused.id if isinstance(focused, Input) else None,
                             focused.value if isinstance(focused, Input) else None)
                if field:
                    focused.value = ""
                    await pilot.press("escape")
                    await pilot.pause(0.1)
            return seen

    seen = asyncio.run(flow())
    assert seen == {"6": ("ev-filter", "pe"), "0": ("log-search", "pe"), "1": (None, None)}, seen


def test_the_command_palette_lists_the_engines_commands_only_while_an_engine_can_take_them(tmp_path):
    """On an ended run (no engine) Ctrl+P offers no Save checkpoint, Preview now, Evaluate now, Pause /
    resume or Stop run (choosing one could only fail: "the engine is not running"), as the footer hides
    their keys; with an engine serving a running run they are there."""
    from synthetic_runs import make_run
    from textual.command import CommandPalette
    from textual.widgets import OptionList

    from app.app import VoxApp

    engine_commands = {"Preview now", "Save checkpoint", "Evaluate now", "Pause / resume", "Stop run"}
    run = make_run(tmp_path, "ended", steps=6)

    async def flow():
        app = VoxApp(str(run))
        app.animation_level = "none"
        async with app.run_test(size=(100, 30)) as pilot:
            for _ in range(100):
                if app.state.state == "finished" and app.state.engine_live is False:
                    break
                await pilot.pause(0.05)
            assert app.state.state == "finished"
            listed = {c.title for c in app.get_system_commands(app.screen)}
            assert not listed & engine_commands and "Save screen as SVG" in listed
            # one Keys (the dashboard's), no Textual Screenshot (~/Downloads: "Failed to save screenshot"),
            # Quit says the run goes on
            titles = [c.title for c in app.get_system_commands(app.screen)]
            assert titles.count("Keys") == 1 and "Screenshot" not in titles, titles
            quit_help = next(c.help for c in app.get_system_commands(app.screen) if c.title == "Quit")
            assert "a run goes on" in quit_help
            await pilot.press("ctrl+p")
            await pilot.pause(0.3)
            assert isinstance(app.screen, CommandPalette)
            await pilot.press(*"save")
            await pilot.pause(0.5)
            shown = [str(o.prompt).split("\n")[0] for o in app.screen.query_one(OptionList).options]
            assert shown == ["Save screen as SVG"], shown
            await pilot.press("escape")
            await pilot.pause(0.2)
            # a running run that an engine serves (as if): the commands are offered
            run_screen = app.screen
            app.state.state, app.state.engine_live = "running", True
            listed = {c.title for c in app.get_system_commands(run_screen)}
            assert engine_commands <= listed
            await pilot.press("q")

    asyncio.run(flow())


def test_tab_from_nothing_goes_into_the_previews_first_field_not_the_tab_strip(tmp_path):
    """On the Previews tab, Tab goes into the temperature field (the tab strip takes no focus: digits switch
    tabs and a click still does), so the digits typed next are the field's text; Escape leaves it and a
    digit switches tabs again."""
    from synthetic_runs import make_run
    from textual.widgets import Input, TabbedContent, Tabs

    from app.app import VoxApp

    run = make_run(tmp_path, "ended", steps=6)

    async def flow():
        app = VoxApp(str(run))
        app.animation_level = "none"
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot_wait(pilot, lambda: app.state.state == "finished", timeout=10, every=0.05)
            tabs = app.screen.query_one(TabbedContent)
            await pilot.press("3")
            await pilot.pause(0.2)
            assert tabs.active == "previews" and app.focused is None
            await pilot.press("tab")
            await pilot.pause(0.2)
            field = app.screen.query_one("#pv-temperature", Input)
            assert app.focused is field
            field.value = ""
            await pilot.press("1", "full_stop", "5")
            await pilot.pause(0.2)
            assert field.value == "1.5" and tabs.active == "previews"
            await pilot.press("escape", "5")
            await pilot.pause(0.2)
            assert tabs.active == "preflight"
            await pilot.click(Tabs, offset=(2, 0))  # a click on the strip still switches (to the first tab)
            await pilot.pause(0.2)
            assert tabs.active == "overview" and not isinstance(app.focused, Tabs)
            await pilot.press("q")

    asyncio.run(flow())


def test_at_40x12_the_tab_strip_has_no_scrollbar_and_the_previews_thumb_is_the_details(tmp_path):
    """A new user saw "▃▃" at 40×12 on the Previews tab: it is the thumb of the preview detail's own
    vertical scrollbar (its text is taller than the 4 rows it gets), not the tab strip's. Every tab at
    40×12: nothing on the strip's rows (1 and 2) shows a scrollbar."""
    from synthetic_runs import make_run
    from textual.scrollbar import ScrollBar

    from app.app import VoxApp

    run = make_run(tmp_path, "ended", steps=6)

    async def flow():
        app = VoxApp(str(run))
        app.animation_level = "none"
        async with app.run_test(size=(40, 12)) as pilot:
            await pilot_wait(pilot, lambda: app.state.state == "finished", timeout=10, every=0.05)
            for key in KEYS:
                await pilot.press(key)
                await pilot.pause(0.2)
                for w in app.screen.query("*"):
                    r = w.region
                    if r.area and r.y <= 2 and r.bottom > 1:
                        assert not (w.show_vertical_scrollbar or w.show_horizontal_scrollbar), (key, w)
            await pilot.press("3")
            await pilot.pause(0.2)
            # the controls take two rows here: max, Apply and Preview now were cut off past column 40
            controls = list(app.screen.query("#pv-controls > *"))
            assert len(controls) == 8 and all(0 <= w.region.x and w.region.right <= 40 and w.region.area
                                              for w in controls), [(w, w.region) for w in controls]
            assert len({w.region.y for w in app.screen.query("#pv-controls Button")}) == 1
            detail = app.screen.query_one("#pv-detail")
            assert detail.show_vertical_scrollbar and detail.virtual_size.height > detail.size.height
            bar, _ = app.screen.get_widget_at(detail.region.right - 1, detail.region.y)
            assert isinstance(bar, ScrollBar) and bar.parent is detail
            await pilot.press("q")

    asyncio.run(flow())


def test_closing_the_stop_dialog_keeps_the_tab(tmp_path):
    """`x` opens the stop dialog; closing it (n, Esc) leaves the tab that was open — Textual gave the focus,
    with none to restore, to the first focusable widget, the GPUs tab's table, and the tabs switched to GPUs."""
    from synthetic_runs import make_run
    from textual.widgets import TabbedContent

    from app.app import VoxApp
    from app.messages import EngineSeen

    run = make_run(tmp_path, "running", steps=6, state="running")

    async def flow():
        app = VoxApp(str(run))
        app.animation_level = "none"
        async with app.run_test(size=(120, 30)) as pilot:
            await pilot_wait(pilot, lambda: app.state.state == "running")
            screen = app.screen
            screen.post_message(EngineSeen(True, 4242))  # an engine: x is on
            await pilot_wait(pilot, lambda: app.state.engine_live)
            tabs = screen.query_one(TabbedContent)
            for tab, key, close in (("overview", "1", "n"), ("previews", "3", "escape"), ("evals", "8", "n")):
                await pilot.press(key)
                await pilot.pause(0.2)
                assert tabs.active == tab
                await pilot.press("x")
                await pilot_wait(pilot, lambda: app.screen is not screen)
                await pilot.press(close)
                await pilot_wait(pilot, lambda: app.screen is screen)
                await pilot.pause(0.3)
                assert tabs.active == tab, (tab, tabs.active, app.focused)
            await pilot.press("q")

    asyncio.run(flow())


def test_a_small_terminal_shows_the_checkpoints_the_help_and_the_stop_dialog_whole(replayed):
    """At 40 × 12 (a new-user trial): the Checkpoints tab showed its table's header only (the buttons and the
    jobs table took the rows), the stop dialog ran off the right edge, and the help was cut off with no way to
    scroll. Now the table keeps three rows, the dialog fits the screen, and ↓ scrolls the help to its end."""
    from textual.widgets import DataTable

    from app.app import VoxApp
    from app.screens.dialogs import Confirm, Help

    async def flow():
        app = VoxApp(str(replayed))
        app.animation_level = "none"
        async with app.run_test(size=(40, 12)) as pilot:
            await pilot_wait(pilot, lambda: app.state.state == "finished" and app.state.disk_checkpoints, timeout=20)
            await pilot.press("4")
            table = app.screen.query_one("#ck-table", DataTable)
            await pilot_wait(pilot, lambda: table.row_count >= 3, timeout=10)
            await pilot.pause(0.2)
            assert table.region.height >= 4, table.region  # its header and three rows
            app.push_screen(Confirm("Stop the run? The workers save a checkpoint at the next step boundary, then exit."))
            await pilot.pause(0.3)
            box = app.screen.query_one("#confirm").region
            assert box.right <= 40 and box.bottom <= 12, box
            await pilot.press("n")
            await pilot.pause(0.2)
            await pilot.press("question_mark")
            await pilot_wait(pilot, lambda: isinstance(app.screen, Help), timeout=5)
            scroll = app.screen.query_one("#help-scroll")
            assert scroll.region.right <= 40 and scroll.max_scroll_y > 0, (scroll.region, scroll.max_scroll_y)
            for _ in range(60):
                await pilot.press("down")
            await pilot.pause(0.2)
            assert scroll.scroll_y == scroll.max_scroll_y > 0
            await pilot.press("escape")

    asyncio.run(flow())


def test_the_pickers_screenshot_command_saves_into_the_current_folder(tmp_path, monkeypatch):
    """Textual's Screenshot command saved into ~/Downloads (a server may have none: "Failed to save
    screenshot"); on the run picker it saves into the current folder and says where."""
    from synthetic_runs import make_run

    from app.app import VoxApp

    make_run(tmp_path / "runs", "one", steps=4)
    monkeypatch.chdir(tmp_path)

    async def flow():
        app = VoxApp(None, str(tmp_path / "runs"))
        app.animation_level = "none"
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause(0.5)
            shot = next(c for c in app.get_system_commands(app.screen) if c.title == "Screenshot")
            shot.callback()
            await pilot.pause(0.3)
            saved = list(tmp_path.glob("voxtui-*.svg"))
            assert len(saved) == 1 and saved[0].read_text().startswith("<svg")
            assert any(f"saved the screen as {saved[0]}" in str(n.message) for n in app._notifications)
            await pilot.press("q")

    asyncio.run(flow())
