"""Commands reach the worker over real ZeroMQ sockets (as the engine will send them) and act at a
step boundary; SIGTERM means save, then exit 0; the config comes from TOML + flags."""

import os
import signal
import time

import msgspec
import pytest

from conftest import engine_sockets, read_events, train_args, worker, write_jsonl
from engine.protocol import (
    EvalNow,
    Pause,
    PreviewNow,
    Resume,
    SaveCheckpoint,
    SetPreviewParams,
    Stop,
    event_decoder,
)


def rows(n):
    return [{"instruction": f"Name fruit number {i}.", "output": f"Fruit {i} is a {'apple pear plum fig'.split()[i % 4]}."}
            for i in range(n)]


def test_engine_commands_over_zmq(tmp_path, tiny_model):
    train = write_jsonl(tmp_path / "t.jsonl", rows(40))
    val = write_jsonl(tmp_path / "v.jsonl", rows(3))
    pull, pub = engine_sockets(tmp_path)  # this test plays the engine
    out = tmp_path / "run"
    proc = worker(train_args(tiny_model, out, train, val, max_steps=100000, preview_count=2,
                             engine=tmp_path / "engine.json"), wait=False)
    seen = []

    def until(pred, send=(), timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for cmd in send:
                pub.send(msgspec.json.encode(cmd))
            if pull.poll(300):
                while pull.poll(0):
                    ev = event_decoder.decode(pull.recv())
                    seen.append(ev)
                    if pred(ev):
                        return ev
            assert proc.poll() is None or pred is None, proc.stdout.read()
        pytest.fail(f"timed out; last events: {seen[-5:]}")

    try:
        until(lambda e: e.type == "step")
        preview = until(lambda e: e.type == "preview" and e.temperature == 0.0,
                        send=[SetPreviewParams(id="a", temperature=0.0, max_new_tokens=3), PreviewNow(id="b")])
        assert preview.max_new_tokens == 3 and preview.prompt.startswith("Name fruit")
        until(lambda e: e.type == "status" and e.state == "paused", send=[Pause(id="c")])
        step_at_pause = max(e.step for e in seen if e.type == "step")
        time.sleep(1.5)
        while pull.poll(0):
            seen.append(event_decoder.decode(pull.recv()))
        assert max(e.step for e in seen if e.type == "step") == step_at_pause  # paused means no steps
        # a save, an evaluation and previews asked for while paused are done then, at the paused step (they
        # are acknowledged "ok": they must not wait for a resume, nor be dropped by it)
        until(lambda e: e.type == "checkpoint" and e.step == step_at_pause, send=[SaveCheckpoint(id="s")])
        until(lambda e: e.type == "eval" and e.step == step_at_pause, send=[EvalNow(id="v")])
        until(lambda e: e.type == "preview" and e.step == step_at_pause, send=[PreviewNow(id="p")])
        assert {e.id for e in seen if e.type == "ack"} >= {"s", "v", "p"}
        assert max(e.step for e in seen if e.type == "step") == step_at_pause  # and still paused
        until(lambda e: e.type == "status" and e.state == "running", send=[Resume(id="d")])
        until(lambda e: e.type == "status" and e.state == "finished", send=[Stop(id="e")])
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        pull.close()
        pub.close()
    ckpt = [e for e in seen if e.type == "checkpoint"]
    assert ckpt and (out / "checkpoints" / f"checkpoint-{ckpt[-1].step}" / "adapter_model.safetensors").is_file()
    assert not (out / "events.jsonl").exists()  # under the engine, the engine writes events.jsonl
    # the checkpoint asked for (the dashboard's s) is said as one, not as a periodic one
    asked = next(e for e in ckpt if e.step == step_at_pause)
    assert f"checkpoint {asked.path} (requested)" in proc.stdout.read()


def test_sigterm_saves_and_exits_zero(tmp_path, tiny_model):
    train = write_jsonl(tmp_path / "t.jsonl", rows(40))
    out = tmp_path / "run"
    proc = worker(train_args(tiny_model, out, train, max_steps=100000), wait=False)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "events.jsonl").exists() and any(e["type"] == "step" for e in read_events(out)):
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.stdout.read()
    events = read_events(out)
    assert events[-1]["state"] == "finished" and events[-1]["message"] == "stopped on request"
    last = [e for e in events if e["type"] == "checkpoint"][-1]
    assert (out / "checkpoints" / f"checkpoint-{last['step']}" / "trainer_state.json").is_file()


def test_config_toml_flags_and_validation(tmp_path):
    from engine.config import TrainConfig, read_toml, resolve, to_toml
    from engine.train import build_parser
    from engine.util import UsageError

    train = write_jsonl(tmp_path / "t.jsonl", rows(4))
    toml = tmp_path / "run.toml"
    toml.write_text(f'train_jsonl = "{train}"\nlr = 0.001\nquant = "none"\nlora_targets = ["q_proj", "v_proj"]\n')
    cfg = resolve(build_parser().parse_args(["--config", str(toml), "--lr", "0.002", "--no-grad_ckpt"]))
    assert cfg.lr == 0.002 and cfg.quant == "none" and cfg.grad_ckpt is False and cfg.lora_targets == ["q_proj", "v_proj"]
    assert msgspec.convert(read_toml_text(tmp_path, to_toml(cfg)), TrainConfig) == cfg  # the saved config round-trips
    with pytest.raises(UsageError) as err:
        resolve(build_parser().parse_args(["--train_jsonl", str(tmp_path / "missing.jsonl"), "--lr", "-1",
                                           "--top_p", "0", "--per_device_bsz", "0"]))
    msg = str(err.value)
    assert all(s in msg for s in ("missing.jsonl", "--lr", "--top_p", "--per_device_bsz"))  # every problem at once
    bad = tmp_path / "bad.toml"
    bad.write_text("nope = 1\n")
    with pytest.raises(UsageError, match="unknown field"):
        read_toml(bad)


def read_toml_text(tmp_path, text):
    from engine.config import read_toml

    p = tmp_path / "round.toml"
    p.write_text(text)
    return read_toml(p)
