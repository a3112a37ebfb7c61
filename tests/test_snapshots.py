"""Snapshots of every tab at 80×24 and 160×50, from a recorded run (tests/data/recorded_run: the
events.jsonl a real worker wrote) served by a real engine (``voxtui engine replay``), so the pictures
are the same on every machine."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, until_still

RECORDED = Path(__file__).parent / "data" / "recorded_run"


def recorded_checkpoints(run: Path) -> None:
    """The checkpoint folders the recorded run had on disk (the Checkpoints tab lists what is on disk):
    each with its trainer_state.json as the worker wrote it (step, best step and loss, reason) and an
    adapter file; lora_final after the final one. The weights themselves are not needed to list them."""
    import json

    best_loss = None
    for line in (RECORDED / "events.jsonl").read_text().splitlines():
        ev = json.loads(line)
        if ev["type"] == "eval":
            best_step, best_loss = ev["best_step"], ev["best_loss"]
        if ev["type"] == "checkpoint":
            folder = run / "checkpoints" / f"checkpoint-{ev['step']}"
            folder.mkdir(parents=True)
            (folder / "trainer_state.json").write_text(json.dumps(
                {"step": ev["step"], "best_step": best_step, "best_loss": best_loss, "time": ev["time"],
                 "reason": "final" if ev["final"] else "periodic"}))
            (folder / "adapter_model.safetensors").write_bytes(b"")
            if ev["final"]:
                (run / "lora_final").mkdir()
                (run / "lora_final" / "adapter_model.safetensors").write_bytes(b"")


@pytest.fixture(scope="session")  # once a test process: the slowest-first order interleaves the modules
def replayed(tmp_path_factory):
    """A real engine replaying the recorded run (the folder keeps the recorded name), with the run's
    checkpoint folders."""
    from engine.client import engine_alive
    from engine.daemon.launch import engine_info

    run = tmp_path_factory.mktemp("replay") / "recorded_run"
    subprocess.run([sys.executable, "-m", "engine", "engine", "replay", str(RECORDED / "events.jsonl"), "--run-dir",
                    str(run)], cwd=ROOT, check=True, capture_output=True)
    deadline = time.time() + 30
    while time.time() < deadline:  # every recorded event is in the engine's history
        if (run / "events.jsonl").is_file() and '"finished"' in (run / "events.jsonl").read_text():
            break
        time.sleep(0.1)
    assert engine_alive(engine_info(run))
    recorded_checkpoints(run)
    yield run
    subprocess.run([sys.executable, "-m", "engine", "engine", "stop", str(run)], cwd=ROOT, capture_output=True)


async def folded(pilot, timeout: float = 30.0) -> None:
    """Until the stream worker has folded the whole run in and the first disk scan has read its checkpoints
    (on a loaded machine either can take seconds; the picture would then show the run before them)."""
    app = pilot.app
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (app.state.state == "finished" and app.state.disk_checkpoints):
        await pilot.pause(0.05)


@pytest.mark.parametrize("size", [(80, 24), (160, 50)], ids=["80x24", "160x50"])
@pytest.mark.parametrize("key", list("123456"), ids=["overview", "gpus", "previews", "checkpoints", "preflight", "events"])
def test_tab_snapshot(snap_compare, replayed, size, key):
    from app.app import VoxApp

    async def settle(pilot):
        app = pilot.app
        await folded(pilot)
        await pilot.press(key)
        await pilot.pause(0.3)
        app.screen.set_focus(None)  # no blinking cursor in the picture
        await until_still(pilot)

    assert snap_compare(VoxApp(str(replayed)), terminal_size=size, run_before=settle)


@pytest.fixture
def picker_runs(tmp_path):
    """Two copies of the recorded run under one runs folder, 5 minutes and 2 hours old (by mtime, which is
    what the picker's age reads), so the ages in the picture are fixed. Made for each test: stamped once for
    the module, the ages grew with the tests run before (a minute of them showed "6m", not "5m")."""
    import os
    import shutil

    root = tmp_path / "runs"
    now = time.time()
    for name, age in (("alpha", 300), ("beta", 7200)):
        shutil.copytree(RECORDED, root / name)
        for f in (root / name).iterdir():
            os.utime(f, (now - age, now - age))
    return root


@pytest.mark.parametrize("size", [(80, 24), (160, 50)], ids=["80x24", "160x50"])
def test_picker_snapshot(snap_compare, picker_runs, size, monkeypatch):
    from app.app import VoxApp

    async def settle(pilot):
        await pilot.pause(0.5)
        await until_still(pilot)

    monkeypatch.chdir(picker_runs.parent)  # the picker names the folder as given: "runs/" on every machine
    assert snap_compare(VoxApp(None, "runs"), terminal_size=size, run_before=settle)


@pytest.mark.parametrize("size", [(80, 24), (160, 50)], ids=["80x24", "160x50"])
@pytest.mark.parametrize("key", ["question_mark", "x"], ids=["help", "confirm-stop"])
def test_modal_snapshot(snap_compare, replayed, size, key):
    from app.app import VoxApp

    async def settle(pilot):
        app = pilot.app
        await folded(pilot)
        if key == "x":  # the dialog a running run's x opens (on this finished run the key is off)
            app.screen.action_stop()
        else:
            await pilot.press(key)
        await pilot.pause(0.4)
        await until_still(pilot)

    assert snap_compare(VoxApp(str(replayed)), terminal_size=size, run_before=settle)


def _unreadable_in_16_colours(app) -> list[str]:
    """Text (letters and digits; borders and bars are decoration) whose foreground and background
    become the same colour when the screen is shown in a 16-colour terminal (rich's downgrade to the
    standard palette, as a 16-colour console does). A modal is checked on its own: the screen behind
    it is faded on purpose."""
    import io

    from rich.color import ColorSystem
    from rich.console import Console
    from textual.geometry import Region
    from textual.screen import ModalScreen

    if isinstance(app.screen, ModalScreen):  # the dialog's own widgets, line by line
        segments = [seg for w in app.screen.query("*") if w.size.area
                    for strip in w.render_lines(Region(0, 0, w.size.width, w.size.height)) for seg in strip]
    else:
        console = Console(width=app.size.width, height=app.size.height, file=io.StringIO(), force_terminal=True,
                          color_system="standard", record=True, legacy_windows=False, safe_box=False)
        console.print(app.screen._compositor.render_update(full=True, screen_stack=[]))
        segments = console._record_buffer
    text = "".join(seg.text for seg in segments)
    assert any(ch.isalnum() for ch in text), "nothing rendered"
    bad = []
    for seg in segments:
        if not any(ch.isalnum() for ch in seg.text) or seg.style is None:
            continue
        fg, bg = seg.style.color, seg.style.bgcolor
        if seg.style.reverse:
            fg, bg = bg, fg
        fg = fg.downgrade(ColorSystem.STANDARD).number if fg is not None and not fg.is_default else "default-fg"
        bg = bg.downgrade(ColorSystem.STANDARD).number if bg is not None and not bg.is_default else "default-bg"
        if fg == bg:
            bad.append(f"{seg.text.strip()[:30]!r} colour {fg}")
    return bad


@pytest.mark.parametrize("size", [(80, 24)], ids=["80x24"])
def test_every_screen_is_legible_in_16_colours(replayed, picker_runs, size):
    """Every tab, the modals and the picker: no text drawn in its own background colour once the
    colours are reduced to a 16-colour terminal's palette."""
    import asyncio

    from app.app import VoxApp

    async def flow():
        found = {}
        app = VoxApp(str(replayed))
        async with app.run_test(size=size) as pilot:
            for _ in range(100):
                if app.state.state == "finished":
                    break
                await pilot.pause(0.05)
            for key in "1234567890":  # every tab
                await pilot.press(key)
                await pilot.pause(0.3)
                found[f"tab {key}"] = _unreadable_in_16_colours(app)
            await pilot.press("question_mark")
            await pilot.pause(0.3)
            found["help"] = _unreadable_in_16_colours(app)
            await pilot.press("escape")
            app.screen.action_stop()  # the dialog a running run's x opens (this finished run's x is off)
            await pilot.pause(0.3)
            found["confirm"] = _unreadable_in_16_colours(app)
            await pilot.press("n")
        picker = VoxApp(None, str(picker_runs))
        async with picker.run_test(size=size) as pilot:
            await pilot.pause(0.5)
            found["picker"] = _unreadable_in_16_colours(picker)
        return {k: v for k, v in found.items() if v}

    found = asyncio.run(flow())
    assert found == {}, "\n".join(f"{k}: {v}" for k, v in found.items())
