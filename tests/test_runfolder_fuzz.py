"""Files in a run folder are written by other processes (and by people): whatever they hold, the
readers answer — `engine list` / `status`, the client reading a run without an engine, the dashboard's
run-folder views — and never crash (hypothesis-generated contents)."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import voxtui

junk = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(str.encode),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                 lambda k: st.lists(k, max_size=3) | st.dictionaries(st.text(max_size=8), k, max_size=3),
                 max_leaves=8).map(lambda v: json.dumps(v).encode()),
    st.just(b"[" * 5000 + b"]" * 5000),  # deeper than any parser's recursion limit
    st.just(b'{"type":"status","state":"running","seq":"x"}\n{"type":"step"'),
    st.just(b'{"type":"status","state":"\xff\xfe"}\n'),
)
lines = st.lists(junk, max_size=6).map(lambda parts: b"\n".join(parts) + b"\n")
FILES = ("events.jsonl", "engine.json", "config.toml", "preflight.json", "checkpoints/checkpoint-3/trainer_state.json",
         "checkpoints/checkpoint-3/adapter_model.safetensors", "infer/job/metrics.json",
         "infer/job/generations.jsonl", "infer/job/per_row.jsonl", "spool/host-1-abc.000000000001.jsonl")


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(FILES), st.one_of(junk, lines), min_size=1))
def test_readers_of_a_run_folder_never_crash(tmp_path_factory, files):
    from engine import client, runs
    from engine.daemon.launch import list_runs, summary

    run = tmp_path_factory.mktemp("runs") / "r"
    for name, data in files.items():
        path = run / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    s = summary(run)
    assert s["state"] in ("new", "starting", "running", "pausing", "paused", "stopping", "finished", "stopped", "failed",
                          "crashed") or isinstance(s["state"], str)
    listed = "config.toml" in files or "events.jsonl" in files
    assert [r["run"] for r in list_runs(run.parent)] == (["r"] if listed else [])
    c = client.EngineClient(run)
    c.history()
    list(c.events(timeout=0.1))
    runs.checkpoint_states(run / "checkpoints")
    runs.inference_results(run)
    runs.final_adapter(run)
    runs.inference_samples(run / "infer" / "job")


def test_engine_status_on_garbage_is_one_line(tmp_path):
    run = tmp_path / "runs" / "g"
    run.mkdir(parents=True)
    (run / "events.jsonl").write_bytes(b"\xff\xfe{not json\n" + b"[" * 100000 + b"\n")
    (run / "engine.json").write_bytes(b"\x00\x01")
    (run / "config.toml").write_bytes(b"\xff = 3")
    proc = voxtui("engine", "status", run, "--json", "-")
    assert proc.returncode == 0 and json.loads(proc.stdout)["state"] == "new", proc.stderr
    proc = voxtui("engine", "list", "--runs", tmp_path / "runs")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr


def test_a_garbled_engine_json_is_judged_by_the_event_log_lock(tmp_path):
    """engine.json garbled: while a process holds the run's event log (its engine does, for its whole life) the
    run is not called crashed; once nobody holds it, the engine is gone and the run is."""
    import synthetic_runs

    from engine.runs import lock_events, summary

    run = synthetic_runs.make_run(tmp_path / "runs", "r", events=synthetic_runs.run_events(steps=4, state="running"))
    (run / "engine.json").write_text('{"pid": "oops", [\n')
    fd = lock_events(run)
    try:
        s = summary(run)
        assert (s["state"], s["message"]) == ("running", "engine.json unreadable (line 1 column 17) — the engine may "
                                                          "still be running")
    finally:
        import os

        os.close(fd)
    s = summary(run)
    assert (s["state"], s["problem"]) == ("crashed", "")
