"""Snapshots of the run screen's Charts, Evals, Config and Logs tabs (and the Overview and GPUs tabs of a
two-GPU run) at 80×24 and 160×50, of a finished run folder built from real protocol events
(tests/tabs_run.py: fixed times and values, no engine), so the pictures are the same on every machine.
Refresh after a deliberate change with ``--snapshot-update`` and look at the report."""

import pytest
import tabs_run

from conftest import until_still


@pytest.fixture(scope="session")  # once a test process: the slowest-first order interleaves the modules
def tabs_folder(tmp_path_factory):
    return tabs_run.build(tmp_path_factory.mktemp("tabs"))


@pytest.mark.parametrize("size", [(80, 24), (160, 50)], ids=["80x24", "160x50"])
@pytest.mark.parametrize("keys", [("1",), ("2",), ("7",), ("7", "w", "l"), ("8",), ("9",), ("0",)],
                         ids=["overview", "gpus", "charts", "charts-all-log", "evals", "config", "logs"])
def test_new_tab_snapshot(snap_compare, tabs_folder, size, keys):
    from app.app import VoxApp

    async def settle(pilot):
        app = pilot.app
        for _ in range(200):  # the whole run folded in, and the folder read
            if app.state.state == "finished" and app.state.disk_inference:
                break
            await pilot.pause(0.05)
        await pilot.press(*keys)
        await pilot.pause(0.5)
        app.screen.set_focus(None)  # no blinking cursor in the picture
        await until_still(pilot)

    assert snap_compare(VoxApp(str(tabs_folder)), terminal_size=size, run_before=settle)
