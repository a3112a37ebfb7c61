"""A path that exists but is the wrong thing is named for what it is, never "no such …": a folder that is no
run, a checkpoint or other folder inside a run (with the run folder to give instead), a missing --runs
folder, a broken line that find-long could not measure. One line on stderr, exit 2, nothing written."""

from __future__ import annotations

import json

import synthetic_runs

from conftest import ROOT, digest, voxtui, write_jsonl

VAL = ROOT / "engine" / "samples" / "medqa_val.jsonl"


def one_line_error(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.strip()


def test_a_folder_that_is_no_run_is_named_so(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for args in (["infer", "--run", plain, "--data", VAL], ["export", "--run", plain, "--merge", tmp_path / "m"],
                 ["engine", "status", plain], ["engine", "stop", plain], ["run", "--resume", plain],
                 ["export-metrics", plain]):
        err = one_line_error(voxtui(*args))
        assert err == f"voxtui: error: {plain}: a folder, but not a run (no config.toml or events.jsonl)", args
    assert not (tmp_path / "m").exists() and sorted(plain.iterdir()) == []
    err = one_line_error(voxtui("engine", "status", VAL))
    assert err.endswith(f"{VAL}: a file, not a run folder")
    err = one_line_error(voxtui("engine", "status", tmp_path / "nope"))
    assert err.endswith("no such run (looked in . and runs/)")  # only a path that is not there says "no such"


def test_a_checkpoint_folder_names_its_run_and_the_checkpoint_flag(tmp_path):
    run = synthetic_runs.make_run(tmp_path / "runs", "r1", steps=8)
    ckpt = run / "checkpoints" / "checkpoint-40"
    ckpt.mkdir(parents=True)
    (run / "lora_final").mkdir()
    before = digest(run / "events.jsonl")
    # infer and export take --checkpoint: the message gives the exact flags
    for args in (["infer", "--run", ckpt, "--data", VAL], ["export", "--run", ckpt, "--merge", tmp_path / "m"]):
        err = one_line_error(voxtui(*args))
        assert err == f"voxtui: error: {ckpt}: a checkpoint of the run {run}, not a run: give --run {run} --checkpoint 40"
    # engine status / stop take none: the run folder alone
    for args in (["engine", "status", ckpt], ["engine", "stop", ckpt]):
        err = one_line_error(voxtui(*args))
        assert err == f"voxtui: error: {ckpt}: a checkpoint of the run {run}, not a run: give the run folder, {run}"
    err = one_line_error(voxtui("engine", "status", run / "lora_final"))
    assert err.endswith(f"{run / 'lora_final'}: a folder inside the run {run}, not a run: give the run folder, {run}")
    # a relative path is answered with a relative run folder
    err = one_line_error(voxtui("infer", "--run", "checkpoints/checkpoint-40", "--data", VAL, cwd=run))
    assert err.endswith("give --run . --checkpoint 40")
    err = one_line_error(voxtui("engine", "status", "runs/r1/checkpoints/checkpoint-40", cwd=tmp_path))
    assert err.endswith("a checkpoint of the run runs/r1, not a run: give the run folder, runs/r1")
    assert digest(run / "events.jsonl") == before and not (tmp_path / "m").exists()
    # the run folder itself still works
    assert json.loads(voxtui("engine", "status", run, "--json", "-", check=True).stdout)["step"] == 8


def test_engine_list_refuses_a_runs_folder_that_is_not_there(tmp_path):
    err = one_line_error(voxtui("engine", "list", "--runs", tmp_path / "nope"))
    assert f"--runs: {tmp_path / 'nope'}: no such folder" in err
    assert not (tmp_path / "nope").exists()
    afile = write_jsonl(tmp_path / "f.jsonl", [{"a": 1}])
    assert "a file, not a folder of runs" in one_line_error(voxtui("engine", "list", "--runs", afile))
    # an existing folder without runs, and the default runs/ where there is none (a fresh clone): no runs, exit 0
    (tmp_path / "empty").mkdir()
    assert voxtui("engine", "list", "--runs", tmp_path / "empty", check=True).stdout == f"no runs under {tmp_path / 'empty'}/\n"
    assert voxtui("engine", "list", cwd=tmp_path, check=True).stdout == "no runs under runs/\n"
    # the dashboard's picker takes --runs the same way (it opened on "no runs under DIR/")
    err = one_line_error(voxtui("attach", "--runs", tmp_path / "nope"))
    assert f"--runs: {tmp_path / 'nope'}: no such folder" in err


def test_find_long_names_the_broken_lines_it_could_not_measure(tmp_path):
    rows = [{"instruction": f"Q {i}?", "output": f"A {i}."} for i in range(10)]
    rows[6] = b'{"instruction": "broken'
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    proc = voxtui("data", "find-long", data, "--max-len", "200", "--json", tmp_path / "r.json", check=True)
    assert proc.stdout.splitlines()[0] == (f"{data}: 0 of 9 rows exceed 200 tokens, 1 broken (line 7) not measured "
                                           "(see `voxtui data audit`)")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["invalid"] == 1 and report["invalid_lines"] == [7] and report["usable"] == 9
    clean = write_jsonl(tmp_path / "c.jsonl", rows[:6])
    assert "broken" not in voxtui("data", "find-long", clean, "--max-len", "200", check=True).stdout
    many = write_jsonl(tmp_path / "m.jsonl", [b"{", *rows[:2], b"[1]", b"x", b"{", b"2", b"{"])
    first = voxtui("data", "find-long", many, "--max-len", "200", check=True).stdout.splitlines()[0]
    assert "0 of 2 rows exceed 200 tokens, 6 broken (lines 1, 4, 5, 6, 7, …) not measured" in first


def test_engine_stop_wait_takes_0_or_more_seconds(tmp_path):
    """--wait -5 was taken; 0 means: deliver the stop and return (it said "still stopping after 0 s", exit 1)."""
    from engine.cli import build_parser

    for bad in ("-5", "inf", "soon"):
        err = one_line_error(voxtui("engine", "stop", tmp_path, "--wait", bad))
        assert f"argument --wait: {bad}: " in err
    assert build_parser().parse_args(["engine", "stop", "r", "--wait", "0"]).wait == 0
