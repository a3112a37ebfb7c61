"""bench/compare_losses.py: two runs' loss curves, smoothed, compared step by step; bad input is one line
and exit 2, never a traceback."""

import json
import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "bench" / "compare_losses.py"


def write_run(folder: Path, losses: dict[int, float], extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"type": "run_info", "world_size": 1})]
    lines += [json.dumps({"type": "step", "step": s, "loss": v}) for s, v in losses.items()]
    (folder / "events.jsonl").write_text("\n".join(lines) + "\n" + extra)
    return folder


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_curves_within_and_outside_the_bound(tmp_path):
    ref = {s: 10.0 - 0.02 * s for s in range(1, 201)}
    close = {s: v * (1.004 if s % 2 else 0.998) for s, v in ref.items()}  # noisy, 0.4% at most
    far = {s: v * (1.0 + 0.0005 * s) for s, v in ref.items()}  # drifts to 10% by step 200
    a, b, c = write_run(tmp_path / "a", ref), write_run(tmp_path / "b", close), write_run(tmp_path / "c", far)
    ok = run(a, b, "--json", tmp_path / "ok.json")
    assert ok.returncode == 0, ok.stderr
    assert "200 common steps (1–200)" in ok.stdout and "within 1%" in ok.stdout
    report = json.loads((tmp_path / "ok.json").read_text())
    assert report["within"] and report["max_rel_gap"] <= 0.004 + 1e-9
    bad = run(a, c)
    assert bad.returncode == 1 and "outside 1%" in bad.stdout and "at step 200" in bad.stdout


def test_a_partial_last_line_is_waited_for_and_a_broken_one_is_named(tmp_path):
    ref = {s: 5.0 for s in range(1, 11)}
    a = write_run(tmp_path / "a", ref)
    b = write_run(tmp_path / "b", ref, extra='{"type": "step", "step": 11, "lo')  # still being written
    assert run(a, b).returncode == 0
    lines = (a / "events.jsonl").read_text().splitlines()
    lines.insert(3, "{broken")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "events.jsonl").write_text("\n".join(lines) + "\n")
    out = run(tmp_path / "x", a)
    assert out.returncode == 2 and out.stderr.strip().endswith("events.jsonl:4: not JSON") and "Traceback" not in out.stderr
    out = run(tmp_path / "missing", a)
    assert out.returncode == 2 and "no events.jsonl" in out.stderr


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=-3, max_value=30))
def test_any_bytes_are_a_result_or_one_line(tmp_path_factory, data, window):
    sys.path.insert(0, str(ROOT))
    from bench.compare_losses import main

    d = tmp_path_factory.mktemp("fuzz")
    (d / "events.jsonl").write_bytes(data)
    ref = write_run(d / "ref", {s: 3.0 for s in range(1, 5)})
    try:
        code = main([str(ref), str(d), "--window", str(window)])
    except SystemExit as e:  # argparse
        code = e.code
    assert code in (0, 1, 2)
