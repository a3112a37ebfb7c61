"""Snapshots of the comparison of runs (curves by step and by tokens seen, the differing config) and of the
picker with marked runs, at 80×24 and 160×50: three run folders built from the protocol's own event
structs (tests/synthetic_runs.py, fixed times), marked and compared through the keys, as a user would."""

import os
import time

import pytest
from synthetic_runs import make_run

from conftest import until_still


@pytest.fixture
def compare_runs(tmp_path):
    """A finished baseline, a finished run with a long name and other hyperparameters, and a crashed one;
    their mtimes fixed (the picker sorts and ages by them) so the pictures are the same on every run (made for
    each test: ages stamped once for the module grow with the tests before)."""
    root = tmp_path / "runs"
    make_run(root, "baseline", inference={4: {"rougeL": 0.3, "bleu": 2.0}}, infer_files={8: {"rougeL": 0.4, "bleu": 3.0}})
    make_run(root, "lower-lr-rank-32-with-a-really-quite-long-descriptive-name", loss0=5.0, decay=0.1, tokens=600,
             config_changes={"lr": 0.001, "lora_r": 32, "lora_alpha": 64}, inference={4: {"rougeL": 0.2, "bleu": 1.0}})
    make_run(root, "crashed", config_changes={"lr": 0.002, "packing": True}, steps=7, state="running",
             tokens_per_s=500.0)
    now = time.time()
    for name, age in (("baseline", 60), ("lower-lr-rank-32-with-a-really-quite-long-descriptive-name", 600),
                      ("crashed", 7200)):
        for f in (root / name).rglob("*"):
            os.utime(f, (now - age, now - age))
    return root


@pytest.mark.parametrize("size", [(80, 24), (160, 50)], ids=["80x24", "160x50"])
@pytest.mark.parametrize("keys", [(), ("c",), ("c", "a"), ("c", "2")], ids=["picker", "curves", "by-tokens", "config"])
def test_compare_snapshot(snap_compare, compare_runs, size, keys, monkeypatch):
    from app.app import VoxApp

    async def settle(pilot):
        await pilot.pause(0.3)
        for _ in range(3):  # mark all three (space marks and moves down)
            await pilot.press("space")
        for key in keys:
            await pilot.press(key)
            for _ in range(100):
                if getattr(pilot.app.screen, "loaded", True):
                    break
                await pilot.pause(0.05)
        await pilot.pause(0.3)
        pilot.app.screen.set_focus(None)  # no cursor in the picture
        await until_still(pilot)

    monkeypatch.chdir(compare_runs.parent)  # the picker names the folder as given: "runs/" on every machine
    assert snap_compare(VoxApp(None, "runs"), terminal_size=size, run_before=settle)
