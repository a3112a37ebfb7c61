"""Snapshots of every tab at 80×24 and 160×50, from a recorded run (tests/data/recorded_run: the
events.jsonl a real worker wrote), so the pictures are the same on every machine."""

from pathlib import Path

import pytest

RECORDED = Path(__file__).parent / "data" / "recorded_run"


@pytest.mark.parametrize("size", [(80, 24), (160, 50)], ids=["80x24", "160x50"])
@pytest.mark.parametrize("key", list("123456"), ids=["overview", "gpus", "previews", "checkpoints", "preflight", "events"])
def test_tab_snapshot(snap_compare, size, key):
    from app.app import VoxApp

    async def settle(pilot):
        app = pilot.app
        for _ in range(100):  # wait for the stream worker to fold the whole run in
            if app.state.state == "finished":
                break
            await pilot.pause(0.05)
        await pilot.press(key)
        await pilot.pause(0.3)
        app.screen.set_focus(None)  # no blinking cursor in the picture
        await pilot.pause(0.1)

    assert snap_compare(VoxApp(str(RECORDED)), terminal_size=size, run_before=settle)
