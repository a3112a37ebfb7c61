"""engine.util.Progress (rich.progress): a bar on stderr only when stderr is a terminal, never on stdout,
nothing at all otherwise; the data tools that use it keep their stdout clean either way."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import textwrap

from conftest import ROOT, write_jsonl

SCRIPT = textwrap.dedent("""
    import sys, time
    from engine.util import Progress
    p = Progress(1000, sys.argv[1], unit=" rows")
    for i in range(10):
        p.update(100)
        print("line", i, flush=True)
        time.sleep(0.03)
    if sys.argv[2] == "raise":
        raise SystemExit("stopped half-way")  # close() skipped: the cursor must still come back
    p.close()
    print("done", flush=True)
""")


def run_with_stderr(cmd: list[str], tty: bool, timeout: float = 120) -> tuple[int, bytes, bytes]:
    """Run ``cmd`` with stdout on a pipe and stderr on a pseudo-terminal (``tty``) or a pipe:
    (exit code, stdout, what reached stderr)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    if not tty:
        proc = subprocess.run(cmd, capture_output=True, cwd=ROOT, env=env, timeout=timeout)
        return proc.returncode, proc.stdout, proc.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, cwd=ROOT, env=env)
    os.close(slave)
    err = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every holder of the slave side is gone
            break
        if not chunk:
            break
        err += chunk
    os.close(master)
    out = proc.stdout.read()
    proc.stdout.close()
    return proc.wait(timeout=timeout), out, err


def test_bar_on_a_terminal_stdout_untouched():
    code, out, err = run_with_stderr([sys.executable, "-c", SCRIPT, "scan [bold]data[/]", "close"], tty=True)
    assert code == 0, err
    assert out.decode().splitlines() == [f"line {i}" for i in range(10)] + ["done"]
    text = err.decode()
    assert "scan [bold]data[/]" in text  # the label is text, not markup
    assert "100%" in text and " rows/s" in text and "━" in text  # rich's bar, finished
    assert "\x1b[?25l" in text and text.rstrip().endswith("\x1b[?25h")  # cursor hidden, then given back
    assert "line" not in text  # nothing of stdout was redirected into the bar


def test_nothing_when_not_a_terminal():
    code, out, err = run_with_stderr([sys.executable, "-c", SCRIPT, "scan", "close"], tty=False)
    assert code == 0
    assert err == b""
    assert out.decode().splitlines() == [f"line {i}" for i in range(10)] + ["done"]


def test_cursor_back_when_close_is_skipped():
    code, out, err = run_with_stderr([sys.executable, "-c", SCRIPT, "scan", "raise"], tty=True)
    assert code == 1 and b"stopped half-way" in err
    assert err.count(b"\x1b[?25l") == 1 and b"\x1b[?25h" in err.split(b"\x1b[?25l", 1)[1]
    assert b"done" not in out


def test_data_tool_bar_on_stderr_json_on_stdout(tmp_path):
    """``voxtui data split`` (a real call site): with stderr on a terminal the bar is drawn there and its
    JSON report on stdout still parses; with stderr on a pipe, stderr stays empty."""
    rows = [{"instruction": f"question {i}?", "output": f"answer {i}."} for i in range(200)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    for tty in (True, False):
        out_dir = tmp_path / f"tty{tty}"
        cmd = [sys.executable, "-m", "engine", "data", "split", str(data), "--train", str(out_dir / "train.jsonl"),
               "--val", str(out_dir / "val.jsonl"), "--report", "-"]
        code, out, err = run_with_stderr(cmd, tty=tty)
        assert code == 0, err
        report = json.loads(out)
        assert report["train"] + report["val"] == 200
        if tty:
            assert b"split" in err and b"100%" in err
        else:
            assert err == b""


def test_atomic_write_gives_new_files_the_umask_mode_and_keeps_an_old_files_mode(tmp_path):
    """Outputs are written through a temp file (mkstemp makes it 0600): a new file gets the mode open()
    would give it, a replaced one keeps its own."""
    import os

    from engine import util
    from engine.util import atomic_write

    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "new.json") as f:
            f.write("{}")
        assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o666 & ~util._UMASK
        (tmp_path / "kept.json").write_text("x")
        os.chmod(tmp_path / "kept.json", 0o600)
        with atomic_write(tmp_path / "kept.json") as f:
            f.write("y")
        assert (tmp_path / "kept.json").stat().st_mode & 0o777 == 0o600 and (tmp_path / "kept.json").read_text() == "y"
    finally:
        os.umask(old)
