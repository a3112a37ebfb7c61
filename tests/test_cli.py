"""The command line: every command answers --help; the top level starts without heavy imports."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import ROOT, voxtui

COMMANDS = [[], ["data"], ["data", "analyze"], ["data", "audit"], ["data", "find-long"], ["data", "split"],
            ["model"], ["model", "tiny"], ["demo"], ["preflight"], ["run"], ["engine"], ["engine", "list"],
            ["engine", "status"], ["engine", "stop"], ["engine", "pause"], ["engine", "resume"], ["engine", "save"],
            ["engine", "eval"], ["engine", "preview"], ["infer"], ["score"], ["export"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "voxtui")
def test_help(cmd):
    proc = voxtui(*cmd, "--help")
    assert proc.returncode == 0 and "usage: voxtui" in proc.stdout


def test_the_data_line_names_only_its_subcommands():
    """`voxtui --help` said data would "split and clean" with no clean subcommand: each action the line
    names is a data subcommand (cleaning is part of split, and said so)."""
    line = re.search(r"^ +data +(.*?)\n +model ", voxtui("--help").stdout, re.S | re.M).group(1)
    line = " ".join(line.split())
    subcommands = set(re.findall(r"^    (\S+)(?: |$)", voxtui("data", "--help").stdout, re.M))
    assert subcommands == {"analyze", "audit", "find-long", "split"}
    assert all(word in line for word in ("analyze", "audit", "over-long rows", "split"))
    assert not re.search(r"\bclean\b", line) and "split it (cleaned and deduplicated)" in line


def test_every_command_and_flag_says_what_it_is_for():
    """Every subcommand has a line in its parent's --help, every flag and argument a help text (or is hidden)."""
    import argparse

    from engine.cli import build_parser

    missing = []

    def walk(parser, path):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                said = {c.dest: c.help for c in a._choices_actions}
                for name, sub in a.choices.items():
                    if not said.get(name):
                        missing.append(f"{path} {name}")
                    walk(sub, f"{path} {name}")
            elif a.help is None and a.dest != "help":
                missing.append(f"{path} {'/'.join(a.option_strings) or a.dest}")

    walk(build_parser(), "voxtui")
    assert not missing


def test_either_spelling_of_a_long_flag():
    """The training flags are the seed's (--max_len), the data tools' hyphenated (--max-len): each takes the
    other spelling too, with or without =; --help shows one; an unknown flag is still refused."""
    from engine.cli import build_parser

    parse = build_parser().parse_known_args
    a, extra = parse(["run", "--train-jsonl", "t.jsonl", "--max-len", "64", "--per-device-bsz=3"])
    assert (a.train_jsonl, a.max_len, a.per_device_bsz, extra) == ("t.jsonl", 64, 3, [])
    a, extra = parse(["data", "split", "f", "--train", "a", "--val", "b", "--val_frac=0.3", "--max_len", "9"])
    assert (a.val_frac, a.max_len, extra) == (0.3, 9, [])
    import re

    assert not re.search(r"^\s+--max_len [A-Z]", voxtui("data", "find-long", "--help").stdout, re.M)
    assert not re.search(r"^\s+--max-len [A-Z]", voxtui("run", "--help").stdout, re.M)
    proc = voxtui("data", "analyze", "f", "--max_lenx", "3")
    assert proc.returncode == 2 and "--max_lenx" in proc.stderr


def test_help_imports_nothing_heavy():
    code = ("import sys\nfrom engine.cli import build_parser\nbuild_parser()\n"
            "heavy = [m for m in ('torch', 'transformers', 'textual', 'numpy', 'mistral_common') if m in sys.modules]\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_bad_arguments_exit_2():
    assert voxtui("data", "nope").returncode == 2
    assert voxtui().returncode == 2
    # answered by the command they were given to, which names its own --help
    for cmd, name, extra in ((["run", "--max_stpes", "2"], "voxtui run", "--max_stpes 2"),
                             (["data", "analyze", "x.jsonl", "--bogus"], "voxtui data analyze", "--bogus"),
                             (["engine", "list", "-x"], "voxtui engine list", "-x")):
        proc = voxtui(*cmd)
        assert proc.returncode == 2 and proc.stderr.strip() == (
            f"{name}: error: unrecognized arguments: {extra} (see {name} --help)"), proc.stderr
    # the worker started by hand (preflight prints its command): one line too, said once however many ranks
    torchrun = Path(sys.executable).with_name("torchrun")
    name = "torchrun --nproc_per_node N -m engine.train"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args, said in ((["--max_stpes", "2"], f"{name}: error: unrecognized arguments: --max_stpes 2 (see {name} --help)"),
                       (["--resume", "no-such-run"], "voxtui: error: no-such-run: no such run (looked in . and runs/)")):
        proc = subprocess.run([sys.executable, "-m", "engine.train", *args], capture_output=True, text=True, cwd=ROOT,
                              env=env, timeout=120)
        assert proc.returncode == 2 and proc.stderr.strip() == said, proc.stderr
        proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "engine.train", *args], capture_output=True,
                              text=True, cwd=ROOT, env=env, timeout=120)
        assert proc.returncode != 0 and proc.stderr.count(said) == 1 and proc.stderr.count(": error: ") == 1, proc.stderr
    # a choice field: its values in --help and in the error
    proc = voxtui("run", "--quant", "nf5")
    assert proc.returncode == 2 and "(choose from 'nf4', 'none', 'fp8')" in proc.stderr
    assert "--quant {nf4,none,fp8}" in voxtui("run", "--help").stdout


def test_engine_is_headless():
    """Nothing under engine/ imports Textual (harlequin's import-hygiene test)."""
    modules = [p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
               for p in (ROOT / "engine").rglob("*.py") if p.name != "__main__.py"]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print('textual' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_engine_status_reads_as_text(tmp_path):
    """`voxtui engine status RUN` without --json: no Python values (None), the loss to 4 decimals."""
    import synthetic_runs

    run = synthetic_runs.make_run(tmp_path / "runs", "r", steps=8)
    out = voxtui("engine", "status", run, check=True).stdout
    lines = dict(line.strip().split(": ", 1) for line in out.splitlines() if ": " in line)
    assert lines["state"] == "finished" and lines["engine_pid"] == "-" and lines["worker_pids"] == "-" and "None" not in out
    assert lines["total_steps"] != "-" and "[]" not in out and lines["answers"] == "-"  # no engine to ask
    assert len(lines["loss"].split(".")[1]) == 4
    stop = voxtui("engine", "stop", run)  # nothing to stop: says why
    assert stop.returncode == 1 and stop.stderr.strip() == f"{run}: no engine is running: the run has ended (finished)"


def test_the_foreground_line_and_the_listing_name_one_state(tmp_path):
    """How a run ended reads the same in `voxtui run`'s last line and in `voxtui engine list` (and the
    dashboard): stopped on request is "stopped"; completed and early stopping are "finished"."""
    import synthetic_runs

    from engine.daemon.console import one_line
    from engine.protocol import Status

    for outcome, message, state, line in (
            ("stopped", "stopped on request", "stopped", "[stopped] saved at step 8 (stopped on request)"),
            ("completed", "done", "finished", "[finished] done"),
            ("early_stopped", "early stopping", "finished", "[finished] early stopping")):
        status = Status(state="finished", step=8, message=message, outcome=outcome)
        events = [*synthetic_runs.run_events(steps=8, state="running"), status]
        synthetic_runs.make_run(tmp_path / "runs", outcome, events=events)
        assert one_line(status) == line
        listed = voxtui("engine", "list", "--runs", tmp_path / "runs", check=True).stdout
        assert next(row.split() for row in listed.splitlines() if row.startswith(outcome))[1] == state


def test_run_and_preflight_help_leave_out_the_engine_flag_they_set_themselves():
    """`--engine` names the engine a worker reports to: voxtui run sets it (and ignored one given); the
    worker's own --help keeps it."""
    from engine.cli import build_parser
    from engine.train import build_parser as worker_parser

    for cmd in (["run"], ["preflight"]):
        assert "--engine ENGINE" not in voxtui(*cmd, "--help").stdout and "--engine_timeout" in voxtui(*cmd, "--help").stdout
    assert build_parser().parse_args(["run", "--engine", "x.json"]).engine == "x.json"  # still taken
    assert "--engine ENGINE" in worker_parser().format_help()


def test_the_commands_a_user_is_told_to_copy_quote_a_path_with_spaces(tmp_path):
    """`voxtui run --resume <run>` in a refusal, for a run folder whose path has a space and non-ASCII
    letters: pasted into a shell it gives the folder back whole (it was printed unquoted)."""
    import shlex

    from engine.config import TrainConfig
    from engine.runs import refuse_nothing_to_resume
    from engine.util import UsageError

    run = tmp_path / "sp ace ü" / "rün 1"
    run.mkdir(parents=True)
    with pytest.raises(UsageError) as e:
        refuse_nothing_to_resume(run, TrainConfig(train_jsonl="x", epochs=1.0), 8, 4)
    said = str(e.value)
    command = said[said.index("voxtui run --resume"):]
    assert shlex.split(command)[:4] == ["voxtui", "run", "--resume", str(run)], said


# what must not reach a terminal from a run's text: C0 controls but the newline, DEL, C1 controls, bidi overrides
# and isolates, and lone surrogates (a file name's undecodable bytes: printing one raises)
UNSAFE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
EVIL = "evil\x1b[31mred\x07\x1b]0;pwned\x07\x9b2J\u202e"


def _run_folder(root: Path, name: str, message: str, state: str, model: str) -> Path:
    """A run whose folder's name, status message, state and model id are ``name``, ``message``, ``state``, ``model``."""
    import synthetic_runs

    from engine.protocol import Alert, Status, event_encoder, stamp

    run = root / name
    run.mkdir(parents=True)
    events = [*synthetic_runs.run_events(steps=3, state="running", telemetry=False),
              Alert(level="error", kind="exception", message=message), Status(state=state, message=message)]
    (run / "events.jsonl").write_bytes(b"".join(event_encoder.encode(stamp(ev, i, "r")) + b"\n"
                                                for i, ev in enumerate(events, 1)) + b'{"type": "step", "step": "\x1b"}\n')
    # every character TOML would not take raw (DEL and C1 among them) as a \u escape: the model id still is
    # ``model`` (written raw, a DEL made the file unreadable TOML, and the row showed no model: CI's failure)
    quoted = "".join(c if " " <= c <= "~" and c not in '"\\' else f"\\u{ord(c):04x}" if ord(c) < 0x10000
                     else f"\\U{ord(c):08x}" for c in model)
    (run / "config.toml").write_text(f'model_id = "{quoted}"\n')
    return run


def _cli(capsys, *args) -> str:
    from engine.cli import main

    main([str(a) for a in args])
    out = capsys.readouterr()
    return out.out + out.err


names = st.one_of(
    st.binary(min_size=1, max_size=40),  # any bytes a folder's name can hold (undecodable ones included)
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30).map(str.encode),
).filter(lambda b: b"/" not in b and b"\0" not in b and not b.startswith((b".", b"_")) and len(b) <= 200)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(names.map(os.fsdecode), st.text(max_size=80), st.text(max_size=20),
       st.text(st.characters(blacklist_categories=("Cs",)), max_size=40))  # (TOML takes no lone surrogate)
@example("\x01", "", "", "\x7f")  # CI's: a DEL in the model id
@example("\x01", "", "", "\U00010000")  # past the basic plane (JSON's escapes make it a surrogate pair)
def test_the_command_line_prints_a_runs_text_safe(tmp_path_factory, capsys, name, message, state, model):
    """`engine list` / `status` / `stop`, `export-metrics` and `attach`'s errors print a run's folder name, its
    events' messages and states and its model id with every control character shown as its escape: nothing
    a terminal would obey (an OSC retitles it, a CSI clears it), no column pushed out of line."""
    root = tmp_path_factory.mktemp("runs")
    run = _run_folder(root, name, message + EVIL, state, model + EVIL)
    said = {"list": _cli(capsys, "engine", "list", "--runs", root),
            "status": _cli(capsys, "engine", "status", run),
            "status --json": _cli(capsys, "engine", "status", run, "--json", "-"),
            "stop": _cli(capsys, "engine", "stop", run),
            "export-metrics": _cli(capsys, "export-metrics", run, "--skip-bad", "--csv", root / "m.csv"),
            "attach": _cli(capsys, "attach", root / (name + "-nothing"))}
    for what, text in said.items():
        assert not UNSAFE.search(text), (what, text)
    assert "\\x1b]0;pwned\\x07" in said["status"] and "\\x1b[31m" in said["list"]  # shown, not obeyed
    from engine.runs import summary
    from engine.util import cell_fit, printable

    header, row = said["list"].splitlines()[:2]
    shown = printable(summary(run)["state"])
    name_cells, rest = _cells_split(row, header.index("state"))  # (a name longer than its column is cut to it)
    assert name_cells.endswith(" ") and rest.startswith(cell_fit(shown, 9)), (header, row)  # in line with the header


def _cells_split(row: str, cells: int) -> tuple[str, str]:
    """``row`` split after its first ``cells`` terminal cells (a wide character straddling the cut fails)."""
    from rich.cells import cell_len

    for i in range(len(row) + 1):
        if cell_len(row[:i]) >= cells:
            assert cell_len(row[:i]) == cells, (row, cells)
            return row[:i], row[i:]
    return row, ""


def test_engine_list_cuts_long_and_wide_names_to_their_column(tmp_path):
    """`voxtui engine list` ran a long or wide run name into the state column with no space
    (`…[INST][link=x]starting`): each name is cut to its column in terminal cells (a Korean letter or an emoji
    is two), ending in …, with a space before the state; the state and step columns stay in line."""
    from rich.cells import cell_len

    cut = {"short": "short", "x" * 27: "x" * 27, "y" * 28: "y" * 26 + "…", "가" * 14: "가" * 13 + "…",
           "가" * 13 + "a": "가" * 13 + "a", "🚀" * 20: "🚀" * 13 + "…",
           "e2[b]한국🚀[INST][link=x]한국어의이름이길다": "e2[b]한국🚀[INST][link=x]…"}  # (한 would make 27 cells)
    root = tmp_path / "runs"
    for name in cut:
        _run_folder(root, name, "hi", "running", "m")
    listed = voxtui("engine", "list", "--runs", root, check=True).stdout.splitlines()
    header, rows = listed[0], listed[1:]
    shown = []
    for row in rows:
        name, rest = _cells_split(row, header.index("state"))
        assert name.endswith(" ") and cell_len(name.rstrip()) < header.index("state"), row
        assert rest.startswith("crashed ") and _cells_split(row, header.index("step") + 4)[0].endswith(" 3/3"), row
        shown.append(name.rstrip())
    assert sorted(shown) == sorted(cut.values())


def test_a_run_folder_named_with_escapes_and_undecodable_bytes_in_the_real_command_line(tmp_path):
    """Through a real stdout: a name with an undecodable byte is printed (it raised UnicodeEncodeError), and the
    columns of `engine list` stay in line."""
    name = os.fsdecode(b"evil\x1b[31mred\x07\xff")
    run = _run_folder(tmp_path / "runs", name, "hi", "running", "m")
    listed = voxtui("engine", "list", "--runs", tmp_path / "runs", check=True)
    header, row = listed.stdout.splitlines()
    assert row.startswith("evil\\x1b[31mred\\x07\\udcff ") and row[header.index("state"):].startswith("crashed ")
    for args in (("engine", "status", run), ("engine", "status", run, "--json", "-"), ("engine", "stop", run),
                 ("export-metrics", run, "--skip-bad")):
        proc = voxtui(*args)
        assert "Traceback" not in proc.stderr and not UNSAFE.search(proc.stdout + proc.stderr), (args, proc.stderr)
        assert proc.returncode in (0, 1), (args, proc.stderr)


def test_outputs_never_replace_a_device_a_fifo_or_a_link(tmp_path):
    """--json / --csv go through a temporary file and a rename; given a path that names no regular file the
    rename put a file in its place (as root, `--json /dev/null` replaced /dev/null; a FIFO, a link the same).
    Now a device or FIFO is written as it is, a link's file is written and the link stays; a folder that takes
    no new file is one line, not a traceback."""
    import stat

    from engine.util import atomic_write

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so that the writer's open does not wait
    try:
        with atomic_write(fifo) as f:
            f.write("through the pipe\n")
        assert stat.S_ISFIFO(os.stat(fifo).st_mode) and os.read(reader, 100) == b"through the pipe\n"
    finally:
        os.close(reader)
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    with atomic_write(link) as f:
        f.write("new")
    assert link.is_symlink() and target.read_text() == "new"
    sample = Path(__file__).resolve().parent.parent / "engine" / "samples" / "medqa_val.jsonl"
    proc = voxtui("data", "audit", sample, "--json", link)
    assert proc.returncode == 0 and link.is_symlink() and json.loads(target.read_text())
    proc = voxtui("data", "audit", sample, "--json", "/proc/version")
    assert proc.returncode == 1 and proc.stderr.strip().startswith("voxtui: error: cannot write /proc/version"), proc.stderr
    assert "Traceback" not in proc.stderr and stat.S_ISREG(os.stat("/proc/version").st_mode)
    # a folder that cannot be made (/proc takes none), or a file where a folder would be: the file asked for
    # and why, one line (it said "/proc/x: No such file or directory", naming neither)
    run = _run_folder(tmp_path / "runs", "r", "hi", "running", "m")
    before = target.read_text()
    for out, why in (("/proc/x/y.json", "its folder /proc/x cannot be made: No such file or directory"),
                     (f"{target}/x/y.json", f"{target} is a file, not a folder")):
        proc = voxtui("engine", "status", run, "--json", out)
        assert proc.returncode == 1 and proc.stdout == "" and proc.stderr == f"voxtui: error: cannot write {out} ({why})\n"
    assert target.read_text() == before


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(names.map(os.fsdecode), st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                                                 min_size=1, max_size=40)))
@example("runs/e2[b]\x1b]0;PWN\x07한국🚀[INST]")  # the trial's: pasted, its single-quoted form was `no such run`
@example("it's a \\x1b \u200b\u202e run")
def test_a_suggested_commands_path_is_one_bash_runs_as_printed(name):
    """Every suggested command quotes its paths with shell_quote: bash, given the quoted word, reads back the
    exact name (its undecodable bytes too), and the word holds no character a terminal would obey."""
    from engine.util import shell_join, shell_quote

    quoted = shell_quote(name)
    assert quoted.isprintable() and not UNSAFE.search(quoted), quoted
    said = subprocess.run(["bash", "-c", f"printf '%s\\0' {shell_join(['voxtui', 'attach'])} {quoted}"],
                          capture_output=True, timeout=30)
    assert said.returncode == 0 and said.stdout.split(b"\0")[:-1] == [b"voxtui", b"attach", os.fsencode(name)], quoted
    if name.isprintable():
        assert quoted == shlex.quote(name)  # as before



def test_a_refusals_suggested_command_names_a_run_with_escapes_as_printed(tmp_path):
    """The trial's run name (an OSC escape, a bell, Korean, an emoji) in `voxtui run --resume`'s refusal as the
    command line prints it (through printable): the command pasted into bash names the run (in single quotes
    its printed \\x1b was a backslash and three letters: `no such run`)."""
    from engine.config import TrainConfig
    from engine.runs import refuse_nothing_to_resume
    from engine.util import UsageError, printable

    run = tmp_path / "runs" / "e2[b]\x1b]0;PWN\x07한국🚀[INST]"
    run.mkdir(parents=True)
    with pytest.raises(UsageError) as e:
        refuse_nothing_to_resume(run, TrainConfig(train_jsonl="x", epochs=1.0), 8, 4)
    said = printable(e.value)
    assert not UNSAFE.search(said) and "$'" in said, said
    command = said[said.index("voxtui run --resume"):].split(" --")[:2]  # voxtui run --resume RUN
    typed = subprocess.run(["bash", "-c", "printf '%s\\0' " + " --".join(command)], capture_output=True, timeout=30)
    assert typed.stdout.split(b"\0")[:-1] == [b"voxtui", b"run", b"--resume", os.fsencode(run)], (said, typed)


def test_engine_commands_without_an_engine_say_why(tmp_path):
    """`voxtui engine pause | save | …` on a run whose engine is gone (crashed) or whose engine.json cannot be read:
    one line that says why, exit 1; nothing is sent."""
    run = _run_folder(tmp_path / "runs", "gone\x1b]0;x\x07", "hi", "running", "m")
    proc = voxtui("engine", "save", run)
    assert proc.returncode == 1 and proc.stdout == "" and not UNSAFE.search(proc.stderr), proc.stderr
    assert proc.stderr.strip() == (f"voxtui: error: {tmp_path}/runs/gone\\x1b]0;x\\x07: save: the engine is not running "
                                   f"(crashed: voxtui run --resume $'{tmp_path}/runs/gone\\x1b]0;x\\x07' continues it)")
    (run / "engine.json").write_text('{"pid": "oops", [\n')
    proc = voxtui("engine", "pause", run)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        f"voxtui: error: {tmp_path}/runs/gone\\x1b]0;x\\x07: pause: engine.json unreadable (line 1 column 17): the "
        "engine cannot be reached (it may still be running)"), proc.stderr
