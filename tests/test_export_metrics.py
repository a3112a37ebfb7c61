"""`voxtui export-metrics`: every scalar of a run by step, checked against the events it was built from
(run folders made of the protocol's own event structs: tests/synthetic_runs.py; and the recorded run a real
worker wrote); a bad line stops it naming the line and field (or is read past with --skip-bad); bad calls
exit 2 with one line; the output is written atomically and the input is never touched."""

import csv
import io
import json
import os
import statistics

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synthetic_runs import RECORDED, encode, make_run, run_events

from conftest import digest, voxtui

INFER_EVENT = {4: {"rougeL": 0.25, "bleu": 1.5}}  # an engine's inference job: its event carries the metrics
INFER_FILE = {8: {"rougeL": 0.375, "bleu": 3.5, "distinct_1": 0.5, "ci95": {"rougeL": [0.25, 0.5], "bleu": [2.0, 5.0]}}}


@pytest.fixture(scope="session")  # made once a test process, however the modules interleave
def run(tmp_path_factory):
    """A finished 2-rank run of 12 steps with 2 GPUs per rank: evaluations, checkpoints, previews,
    telemetry, one inference job reported by its event and one by its metrics.json (`voxtui infer` by hand)."""
    return make_run(tmp_path_factory.mktemp("export"), "tiny", ranks=2, gpus=2, inference=INFER_EVENT,
                    infer_files=INFER_FILE)


def events_of(run):
    return [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]


def parse_csv(text: str) -> tuple[list[str], dict[int, dict[str, str]]]:
    table = list(csv.reader(io.StringIO(text)))
    header, body = table[0], table[1:]
    return header, {int(r[0]): dict(zip(header, r)) for r in body}


def test_csv_holds_every_scalar_of_the_run_by_step(run, tmp_path):
    out = tmp_path / "m.csv"
    proc = voxtui("export-metrics", run, "--csv", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # the table went to OUT; the summary line to stderr
    assert "12 steps" in proc.stderr and str(out) in proc.stderr
    assert not [p for p in tmp_path.iterdir() if p.name != "m.csv"]  # no temp file left beside it
    header, table = parse_csv(out.read_text())
    events = events_of(run)
    steps = {e["step"]: e for e in events if e["type"] == "step"}
    assert sorted(table) == sorted(steps) == list(range(1, 13))
    assert header[:3] == ["step", "time", "epoch"]
    for s, e in steps.items():
        row = table[s]
        assert float(row["train/loss"]) == e["loss"]  # exact: floats are written in full
        assert float(row["train/lr"]) == e["lr"] and float(row["train/grad_norm"]) == e["grad_norm"]
        assert float(row["perf/tokens_per_s"]) == e["tokens_per_s"] and float(row["perf/mfu"]) == e["mfu"]
        assert [float(row[f"perf/tokens_per_s/rank{r}"]) for r in (0, 1)] == e["tokens_per_s_rank"]
        assert float(row["perf/step_time/rank1"]) == e["step_time_rank"][1]
        assert float(row["mem/peak_gib"]) == e["mem_peak"] and int(row["train/tokens"]) == e["tokens"]
        assert float(row["time"]) == e["time"] and float(row["epoch"]) == e["epoch"]
    evals = {e["step"]: e for e in events if e["type"] == "eval"}
    assert sorted(evals) == [4, 8, 12]
    for s, row in table.items():
        assert row["eval/loss"] == (repr(evals[s]["loss"]) if s in evals else "")
        assert row["eval/ppl"] == (repr(evals[s]["ppl"]) if s in evals else "")
    previews = {}
    for e in events:
        if e["type"] == "preview":
            previews.setdefault(e["step"], []).append(e["rougeL"])
    assert sorted(previews) == [6, 12]
    for s, row in table.items():
        assert row["preview/rougeL"] == (repr(statistics.mean(previews[s])) if s in previews else "")
    # telemetry: per GPU (both ranks' GPUs 0-3) and per rank's process, the samples after each step
    for g in range(4):
        for k in ("util", "mem_used", "power", "temp", "sm_clock"):
            assert f"gpu/{g}/{k}" in header
    tele = {}
    current = None
    for e in events:
        if e["type"] == "step":
            current = e["step"]
        elif e["type"] == "telemetry":
            tele[(current, e["rank"])] = e
    for (s, r), e in tele.items():
        assert float(table[s][f"host/rank{r}/rss_gib"]) == e["rss"]
        for g in e["gpus"]:
            assert float(table[s][f"gpu/{g['index']}/power"]) == g["power"]
    # inference: at the checkpoint's step, from the event (no intervals) and from metrics.json (with them)
    assert float(table[4]["infer/rougeL"]) == 0.25 and table[4]["infer/rougeL_lo"] == ""
    assert float(table[8]["infer/rougeL"]) == 0.375 and float(table[8]["infer/bleu"]) == 3.5
    assert [float(table[8]["infer/rougeL_lo"]), float(table[8]["infer/rougeL_hi"])] == [0.25, 0.5]
    assert float(table[8]["infer/distinct_1"]) == 0.5 and table[12]["infer/rougeL"] == ""


def test_json_has_the_same_table_and_csv_goes_to_stdout_by_default(run, tmp_path):
    out = tmp_path / "m.json"
    proc = voxtui("export-metrics", str(run), "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["run"] == "tiny" and doc["bad_lines"] == [] and doc["lines"] == len(events_of(run))
    assert all(len(r) == len(doc["columns"]) for r in doc["rows"])
    plain = voxtui("export-metrics", str(run))  # no --csv / --json: CSV on stdout
    assert plain.returncode == 0, plain.stderr
    header, table = parse_csv(plain.stdout)
    assert header == doc["columns"]
    for r in doc["rows"]:
        row = table[r[0]]
        for c, v in zip(doc["columns"], r):
            assert (row[c] == "") if v is None else (float(row[c]) == v), c
    # a name under runs/ works too, and so does the recorded run a real worker wrote
    os.makedirs(tmp_path / "cwd" / "runs")
    os.symlink(run, tmp_path / "cwd" / "runs" / "tiny")
    named = voxtui("export-metrics", "tiny", "--json", "-", cwd=tmp_path / "cwd")
    assert named.returncode == 0 and json.loads(named.stdout)["rows"] == doc["rows"]
    recorded = voxtui("export-metrics", RECORDED)
    header, table = parse_csv(recorded.stdout)
    assert recorded.returncode == 0 and sorted(table) == [1, 2, 3, 4, 5, 6] and "eval/ppl" in header


def test_a_bad_line_stops_it_naming_the_line_and_field_or_is_read_past(run, tmp_path):
    good = (run / "events.jsonl").read_bytes().split(b"\n")[:-1]
    junk = [b"not json at all", b"\xff\xfe\x00 binary", b"[1, 2, 3]", b'{"no": "type"}',
            b'{"type": "step", "step": "seven", "loss": 1.0, "lr": 0.1, "grad_norm": null, "tokens_per_s": 1}',
            b'{"type": "eval", "loss": 3.0, "ppl": 20.0}', b'{"type": "step", "step": 2' + b"[" * 5000,
            b'{"type": "eval", "step": -4, "loss": 3.0, "ppl": 20.0}']
    future = b'{"type": "from_the_future", "step": 3, "x": 1}'  # a newer engine's event: passed over, not bad
    lines = good[:4] + junk[:3] + good[4:30] + [future] + junk[3:] + good[30:]
    last_step = next(json.loads(x) for x in reversed(good) if json.loads(x)["type"] == "step")
    again = {**last_step, "loss": 0.125}  # a resumed run logs a step again: the last values count
    lines.append(json.dumps(again).encode())
    torn = b'{"type": "step", "step": 99, "lo'  # a line being written now: left for next time, not bad
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(lines) + b"\n" + torn)
    before = digest(events)
    out = tmp_path / "m.json"
    out.write_text("the previous export\n")

    strict = voxtui("export-metrics", events, "--json", out)
    assert strict.returncode == 2 and strict.stderr.count("\n") == 1, strict.stderr
    assert strict.stderr.startswith(f"voxtui: error: {events}:5: not a usable event: not JSON (")
    assert "--skip-bad" in strict.stderr
    assert out.read_text() == "the previous export\n" and digest(events) == before  # nothing written, input untouched
    first_field = b"\n".join(good[:4] + junk[4:5]) + b"\n"
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "events.jsonl").write_bytes(first_field)
    field = voxtui("export-metrics", tmp_path / "f")
    assert field.returncode == 2 and "events.jsonl:5: not a usable event: step: expected int, got str" in field.stderr

    proc = voxtui("export-metrics", events, "--json", out, "--skip-bad")
    assert proc.returncode == 0, proc.stderr
    assert digest(events) == before
    doc = json.loads(out.read_text())
    expected = [i + 1 for i, x in enumerate(lines) if x in junk]
    assert [b["line"] for b in doc["bad_lines"]] == expected and len(expected) == 8
    reasons = {b["line"]: b["reason"] for b in doc["bad_lines"]}
    assert reasons[expected[3]] == "object missing required field type"
    assert reasons[expected[4]] == "step: expected int, got str"
    assert reasons[expected[5]] == "object missing required field step"
    assert reasons[expected[7]] == "step: -4 is negative"
    assert doc["unknown_events"] == 1 and doc["lines"] == len(lines)
    for b in doc["bad_lines"]:
        assert f"{events}:{b['line']}: skipped: {b['reason']}" in proc.stderr
    assert "(8 bad lines skipped)" in proc.stderr
    table = {r[0]: dict(zip(doc["columns"], r)) for r in doc["rows"]}
    assert sorted(table) == list(range(1, 13))  # no step 99 (torn), no step "seven"
    assert table[again["step"]]["train/loss"] == 0.125
    for e in map(json.loads, good):
        if e["type"] == "step" and e["step"] != again["step"]:
            assert table[e["step"]]["train/loss"] == e["loss"]


def test_bad_calls_exit_2_with_one_line(run, tmp_path):
    def one_line_error(proc):
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("voxtui: error:"), proc.stderr
        assert proc.stdout == ""
        return proc.stderr

    assert "no such run" in one_line_error(voxtui("export-metrics", tmp_path / "nope"))
    garbage = tmp_path / "g" / "events.jsonl"
    garbage.parent.mkdir()
    garbage.write_bytes(b"nope\n\x00\x01\n[]\n")
    assert "g/events.jsonl:1: not a usable event" in one_line_error(voxtui("export-metrics", garbage))
    assert "no scalars by step (3 of 3 lines unreadable)" in one_line_error(
        voxtui("export-metrics", garbage, "--skip-bad"))
    empty = tmp_path / "e" / "events.jsonl"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    assert "no scalars by step" in one_line_error(voxtui("export-metrics", empty.parent))
    only_status = tmp_path / "s"
    only_status.mkdir()
    (only_status / "events.jsonl").write_bytes(encode(run_events(steps=0)))
    assert "none of them a step" in one_line_error(voxtui("export-metrics", only_status))
    before = digest(run / "events.jsonl")
    assert "is the run's events file" in one_line_error(voxtui("export-metrics", run, "--csv", run / "events.jsonl"))
    assert digest(run / "events.jsonl") == before
    assert "is a folder" in one_line_error(voxtui("export-metrics", run, "--json", tmp_path))
    both = voxtui("export-metrics", run, "--csv", tmp_path / "a", "--json", tmp_path / "b")
    assert both.returncode == 2 and "not allowed with" in both.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    help_ = voxtui("export-metrics", "--help")
    assert help_.returncode == 0 and "--csv OUT" in help_.stdout and "--json OUT" in help_.stdout
    assert "--skip-bad" in help_.stdout


def test_a_long_run_exports_quickly(tmp_path):
    """20,000 steps with telemetry (about 45,000 lines): read a line at a time, well under the time a
    user waits for (measured ~1 s here; the bound is loose for a busy machine)."""
    import time

    from engine.eval.export_metrics import export

    run = make_run(tmp_path, "long", steps=20_000, gpus=1, eval_every=500, save_every=0, preview_every=0)
    t = time.perf_counter()
    doc = export(str(run))
    assert time.perf_counter() - t < 15
    assert len(doc["rows"]) == 20_000 and doc["rows"][-1][0] == 20_000


KEYS = ["type", "step", "loss", "lr", "grad_norm", "tokens_per_s", "gpus", "rank", "host", "metrics", "name", "state",
        "checkpoint", "path", "rougeL", "ppl", "final", "tokens_per_s_rank"]
VALUES = st.one_of(st.sampled_from(["step", "eval", "telemetry", "inference", "preview", "checkpoint", "finished"]),
                   st.integers(-3, 10), st.floats(), st.none(), st.booleans(), st.text(max_size=5),
                   st.lists(st.integers(0, 3), max_size=3),
                   st.lists(st.fixed_dictionaries({"index": st.integers(-1, 3)}, optional={"util": st.floats()}), max_size=2),
                   st.dictionaries(st.text(max_size=3), st.floats(), max_size=2))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(st.binary(max_size=60),
                                st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=7).map(
                                    lambda d: json.dumps(d).encode()),
                                st.sampled_from(encode(run_events(steps=3, inference={4: {"rougeL": 0.1}}))
                                                .split(b"\n")[:-1])),
                      max_size=30),
       skip_bad=st.booleans())
def test_any_events_file_gives_a_table_or_a_usage_error(tmp_path_factory, lines, skip_bad):
    from engine.eval.export_metrics import export, to_csv, to_json
    from engine.util import UsageError

    path = tmp_path_factory.mktemp("fuzz") / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    try:
        doc = export(str(path), skip_bad)
    except UsageError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return
    assert doc["rows"] and all(len(r) == len(doc["columns"]) for r in doc["rows"])
    assert [r[0] for r in doc["rows"]] == sorted({r[0] for r in doc["rows"]})
    assert all(r[0] >= 0 for r in doc["rows"])
    assert skip_bad or not doc["bad_lines"]
    json.loads(to_json(doc))  # valid JSON, no NaN / Infinity in it
    json.dumps(doc, allow_nan=False)
    assert len(list(csv.reader(io.StringIO(to_csv(doc["columns"], doc["rows"]))))) == len(doc["rows"]) + 1
