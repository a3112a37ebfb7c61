"""The preview limits (temperature [0, 2], top_p (0, 1], max_new_tokens [1, 512]) have one owner,
``engine.protocol.preview_param_problems``: the command, the run's config, ``voxtui infer`` and the
dashboard's inputs refuse exactly what it refuses. The worker also holds max_new_tokens within the model's
positions less the longest preview prompt, and says when previews are being generated."""

import asyncio
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT
from engine.config import TrainConfig
from engine.protocol import MAX_NEW_TOKENS_MAX, SetPreviewParams, preview_param_problems
from engine.util import UsageError

temperatures = st.one_of(st.floats(-1, 3), st.sampled_from([0.0, 2.0, -0.0, 2.0000001, math.nan, math.inf]))
top_ps = st.one_of(st.floats(-0.5, 1.5), st.sampled_from([0.0, 1.0, 5e-324, 1.0000001, math.nan]))
most = st.one_of(st.integers(-5, 5000), st.sampled_from([0, 1, 512, 513, 4096]))


def expected(t, p, m):
    return {"temperature": not 0 <= t <= 2, "top_p": not 0 < p <= 1, "max_new_tokens": not 1 <= m <= 512}


def named(problems: list[str]) -> set[str]:
    return {f for f in ("temperature", "top_p", "max_new_tokens") for line in problems if f in line}


@settings(max_examples=200, deadline=None)
@given(t=temperatures, p=top_ps, m=most)
def test_command_config_and_infer_ask_the_one_rule(tmp_path_factory, t, p, m):
    from engine.cli import build_parser
    from engine.eval.infer import check_infer_args

    bad = {k for k, v in expected(t, p, m).items() if v}
    assert named(preview_param_problems(t, p, m)) == bad
    assert SetPreviewParams(temperature=t, top_p=p, max_new_tokens=m).problems() == preview_param_problems(t, p, m)

    data = tmp_path_factory.getbasetemp() / "rows.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n')
    try:
        TrainConfig(train_jsonl=str(data), temperature=t, top_p=p, max_new_tokens=m).validate()
        said = set()
    except UsageError as e:
        said = named(str(e).split("; "))
    assert said == bad

    args = build_parser().parse_args(["infer", "--run", str(tmp_path_factory.getbasetemp() / "no-such-run"),
                                      "--data", str(data), f"--temperature={t!r}", f"--top_p={p!r}"])
    with pytest.raises(UsageError) as e:
        check_infer_args(args)  # the run does not exist: refused for that when the parameters are right
    assert named(str(e.value).split("; ")) == bad - {"max_new_tokens"}  # infer's --max_new_tokens: any length


def test_the_dashboard_inputs_ask_the_one_rule():
    from textual.app import App
    from textual.widgets import Input

    from app.widgets.previews import Previews

    class Host(App):
        CSS_PATH = ROOT / "app" / "app.tcss"  # the dashboard's layout: what fits on its lines

        def compose(self):
            yield Previews()

    cases = [("pv-temperature", "temperature", v) for v in ("-0.1", "0", "2", "2.01", "nan", "inf")]
    cases += [("pv-top-p", "top_p", v) for v in ("0", "1e-9", "1", "1.01", "-1")]
    cases += [("pv-max", "max_new_tokens", v) for v in ("0", "1", "512", "513", "4096")]

    async def flow():
        app = Host()
        async with app.run_test() as pilot:
            pv = app.query_one(Previews)
            for input_id, field, text in cases:
                for other in ("pv-temperature", "pv-top-p", "pv-max"):
                    pv.query_one(f"#{other}", Input).value = ""
                pv.query_one(f"#{input_id}", Input).value = text
                await pilot.pause()
                value = (int if field == "max_new_tokens" else float)(text)
                problems = preview_param_problems(**{field: value})
                got = pv.changed()
                if problems:
                    label = {"temperature": "temperature", "top_p": "top-p", "max_new_tokens": "max new tokens"}[field]
                    assert got == problems[0].replace(field, label), (text, got)
                    if field == "max_new_tokens":
                        assert got == "max new tokens must be in [1, 512]"  # the refusal says the limit
                else:
                    assert got == {field: value}, (text, got)

    asyncio.run(flow())


def test_the_limit_is_the_documented_one():
    from conftest import ROOT

    assert MAX_NEW_TOKENS_MAX == 512
    for doc in ("docs/protocol.md", "docs/engine.md", "docs/tui.md"):
        assert "1 ≤ max_new_tokens ≤ 512" in (ROOT / doc).read_text(), doc


class Events:
    def __init__(self):
        self.events = []

    def emit(self, ev):
        self.events.append(ev)

    def close(self):
        pass


def previews_of(prompt_lengths, max_new_tokens, fmt):
    from engine.config import TrainConfig
    from engine.worker.dist import Dist
    from engine.worker.evaluation import PreviewParams, Previews
    from engine.worker.report import Report

    out = Report(True)
    out.sink = Events()
    rows = [([5] * n, f"prompt {i}", "ref") for i, n in enumerate(prompt_lengths)]
    cfg = TrainConfig(model_id="tiny", train_jsonl="-", max_new_tokens=max_new_tokens)
    return Previews(rows, PreviewParams.of(cfg), cfg, Dist(), fmt, out), out.sink.events


def test_the_worker_holds_previews_within_the_models_positions(fmt):
    """Prompt + max new tokens never pass the model's positions: the value in force is cut to what they
    leave after the longest preview prompt, a warning says so once, and the ack of set_preview_params
    carries the cut value (what the dashboard then shows)."""
    from types import SimpleNamespace

    from engine.worker.control import Control

    previews, events = previews_of([30, 90], 64, fmt)
    model = SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(max_position_embeddings=128)))
    previews.limit_to(model)
    assert previews.params.max_new_tokens == 38 and previews.most_new_tokens() == 38  # 128 - 90
    warned = [e for e in events if e.type == "log" and e.level == "warning"]
    assert len(warned) == 1 and "max_new_tokens 64 cut to 38" in warned[0].message
    assert "128 positions" in warned[0].message and "(90 tokens)" in warned[0].message

    control = Control.__new__(Control)  # its apply only: no inbox, no signal handlers
    control.d, control.out, control.previews = previews.d, previews.out, previews
    control.apply([SetPreviewParams(id="a", max_new_tokens=20)], step=3)
    assert previews.params.max_new_tokens == 20
    control.apply([SetPreviewParams(id="b", max_new_tokens=500)], step=4)
    ack = [e for e in events if e.type == "ack"][-1]
    assert ack.id == "b" and ack.params["max_new_tokens"] == 38 and previews.params.max_new_tokens == 38
    # a resumed run's saved value above the protocol's limit (saved before it was lowered) is cut too
    short, events = previews_of([4], 8, fmt)
    short.params = short.params.updated({"max_new_tokens": 4096})
    assert short.params.max_new_tokens == MAX_NEW_TOKENS_MAX
    assert "the most a preview may generate (512)" in events[-1].message


def test_previews_say_when_they_start(fmt, monkeypatch):
    """Training waits while previews are generated: a preview_start event comes before them (the dashboard
    says "previewing…" until their preview events), with what they will be."""
    import engine.worker.decode as decode

    monkeypatch.setattr(decode, "supported", lambda model: False)
    monkeypatch.setattr(decode, "generate", lambda model, prompts, n, *a, **k: [[7, 8]] * len(prompts))
    previews, events = previews_of([3, 4], 12, fmt)
    previews.run(object(), step=9)
    assert [e.type for e in events] == ["preview_start", "preview", "preview"]
    start = events[0]
    assert (start.step, start.count, start.max_new_tokens) == (9, 2, 12)


def test_the_dashboard_says_previewing_between_start_and_result():
    from app.state import RunState
    from app.widgets.overview import state_line
    from engine.eventlog import decode_event
    from engine.protocol import Preview, PreviewStart, Status, Step, event_encoder

    s = RunState(folder="r")
    s.apply(Status(seq=1, state="running"))
    s.apply(PreviewStart(seq=2, step=40, count=4, max_new_tokens=512))
    line = state_line(s).plain
    assert "RUNNING" in line and "previewing…" in line and "4 prompt(s), up to 512 new tokens" in line
    s.apply(Preview(seq=3, step=40, prompt="p", text="t", temperature=0.7, top_p=0.9))
    assert "previewing" not in state_line(s).plain
    s.apply(PreviewStart(seq=4, step=60, count=1, max_new_tokens=8))
    # a pause asked for meanwhile: the screen says it waits for the previews (it read "pause requested … at
    # the next step boundary" for as long as a 512-token preview took)
    s.apply(Status(seq=5, state="running", pending="pause", message="pause requested (x): the workers pause at "
                   "their next step boundary"))
    line = state_line(s).plain
    assert "PAUSING" in line and "previewing… (step 60" in line and "the pause follows" in line, line
    s.apply(Status(seq=6, state="paused", message="paused at step 60"))
    assert s.previewing is None and "previewing" not in state_line(s).plain
    s.apply(PreviewStart(seq=7, step=60, count=1, max_new_tokens=8))
    s.apply(Step(seq=8, step=61, loss=1.0, lr=1e-4, grad_norm=1.0, tokens_per_s=1.0))
    assert s.previewing is None
    # an event's round trip; a reader that does not know a type skips its line (decode_event: None)
    raw = event_encoder.encode(PreviewStart(seq=9, step=1, count=2, max_new_tokens=3))
    assert decode_event(raw).type == "preview_start"
    assert decode_event(raw.replace(b"preview_start", b"preview_later")) is None


def previews_host(sent: list):
    """An app holding the Previews widget alone; the parameters it asks for are appended to ``sent``."""
    from textual.app import App

    from app.widgets.previews import Previews

    class Host(App):
        CSS_PATH = ROOT / "app" / "app.tcss"  # the dashboard's layout: what fits on its lines

        def compose(self):
            yield Previews()

        def on_previews_params_requested(self, m):
            sent.append(m.changed)

    return Host


def test_an_emptied_field_is_unchanged_and_shows_its_value_in_force_again():
    """Emptying a preview input and pressing Enter sends nothing and the field shows the value in force
    again (never "these are the values in force" beside a field showing only its placeholder); beside a
    real change, the emptied one is unchanged too."""
    from textual.widgets import Input, Static

    from app.widgets.previews import Previews

    sent = []
    Host = previews_host(sent)

    async def flow():
        app = Host()
        async with app.run_test() as pilot:
            pv = app.query_one(Previews)
            app.set_focus(None)  # (this host focused the first input)
            pv.fill({"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 64})
            box = pv.query_one("#pv-max", Input)
            box.focus()
            await pilot.press("ctrl+u")  # the whole text gone (Input: delete to the start)
            await pilot.press(*["backspace"] * 3, "enter")
            await pilot.pause()
            reply = str(pv.query_one("#pv-reply", Static).render())
            assert box.value == "64" and sent == []
            assert reply == "unchanged nothing to send: an empty field keeps its value in force (shown again)"
            pv.query_one("#pv-top-p", Input).value = ""
            pv.query_one("#pv-temperature", Input).value = "0.2"
            pv.apply()
            await pilot.pause()
            assert sent == [{"temperature": 0.2}] and pv.query_one("#pv-top-p", Input).value == "0.9"
        fresh = Host()
        async with fresh.run_test() as pilot:  # no values known yet (no run_info): said so, the field stays empty
            pv = fresh.query_one(Previews)
            pv.apply()
            await pilot.pause()
            assert "keeps its value in force (not known yet)" in str(pv.query_one("#pv-reply", Static).render())

    asyncio.run(flow())


def test_a_change_from_another_client_while_a_field_is_edited_is_what_apply_compares_with():
    """Another client sets max_new_tokens 450 while this dashboard's "max" field is being edited: the field
    keeps the user's text, but the value in force follows the ack — emptied, the field shows 450, and 300
    typed then is sent (it said "these are the values in force" and sent nothing, the engine staying at 450)."""
    from textual.widgets import Input

    from app.widgets.previews import Previews

    sent = []
    Host = previews_host(sent)

    async def flow():
        app = Host()
        async with app.run_test() as pilot:
            pv = app.query_one(Previews)
            app.set_focus(None)
            pv.fill({"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 300})
            box = pv.query_one("#pv-max", Input)
            box.focus()
            await pilot.press("ctrl+u", "7")  # being edited: "7"
            pv.fill({"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 450})  # another client's ack
            await pilot.pause()
            assert box.value == "7" and pv.in_force["max_new_tokens"] == 450
            await pilot.press("ctrl+u", "backspace", "enter")  # emptied: unchanged, shows the value in force
            await pilot.pause()
            assert box.value == "450" and sent == []
            await pilot.press("end", "ctrl+u", *"300", "enter")
            await pilot.pause()
            assert sent == [{"max_new_tokens": 300}]

    asyncio.run(flow())


def test_engine_status_says_a_pause_waits_for_the_previews(tmp_path):
    """`voxtui engine status` / `engine list` of a run whose workers generate previews (a preview_start, nothing
    after it but a pause's pending status): the message says so, and that the pause follows; once a preview
    (or a step, or another status) comes, it no longer does. Values from the file are shown only as numbers."""
    import json
    import os
    import time

    from engine.protocol import PreviewStart, Status, Step, event_encoder
    from engine.runs import summary

    run = tmp_path / "r"
    run.mkdir()
    (run / "engine.json").write_text(json.dumps({"pid": os.getpid(), "started": time.time()}))
    events = [Status(seq=1, state="running"), Step(seq=2, step=40, loss=1.0, lr=1e-4, grad_norm=1.0, tokens_per_s=1.0),
              PreviewStart(seq=3, step=40, count=4, max_new_tokens=512)]

    def write(evs):
        (run / "events.jsonl").write_bytes(b"".join(event_encoder.encode(e) + b"\n" for e in evs))
        return summary(run)

    s = write(events)
    assert s["state"] == "running" and s["message"].startswith("previewing… (step 40: 4 prompt(s), up to 512 new")
    events.append(Status(seq=4, state="running", pending="pause", message="pause requested (x)"))
    s = write(events)
    assert s["state"] == "pausing" and "previewing… (step 40" in s["message"] and "the pause follows" in s["message"]
    events.append(Status(seq=5, state="paused", message="paused at step 40"))
    s = write(events)
    assert s["state"] == "paused" and s["message"] == "paused at step 40"
    odd = [Status(seq=1, state="running"), {"seq": 2, "type": "preview_start", "step": "\x1b]0;x\x07", "count": 1,
                                            "max_new_tokens": 8}]
    (run / "events.jsonl").write_bytes(b"".join((json.dumps(e).encode() if isinstance(e, dict)
                                                 else event_encoder.encode(e)) + b"\n" for e in odd))
    assert "\x1b" not in summary(run)["message"]


def test_every_wrong_field_is_said_and_typing_after_a_refill_goes_after_the_value():
    """temperature 3.5 and top-p 5 said only the temperature's problem (fixed, the next Apply said the
    other); and a field emptied and refilled by Enter held its cursor at 0, so a "1" typed then made 0.7 into
    10.7. Now every wrong field is said at once, and the cursor is at the value's end."""
    from textual.widgets import Input, Static

    from app.widgets.previews import Previews

    sent = []
    Host = previews_host(sent)

    async def flow():
        app = Host()
        async with app.run_test() as pilot:
            pv = app.query_one(Previews)
            app.set_focus(None)
            pv.fill({"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 64})
            pv.query_one("#pv-temperature", Input).value = "3.5"
            pv.query_one("#pv-top-p", Input).value = "5"
            pv.query_one("#pv-max", Input).value = "many"
            pv.apply()
            await pilot.pause()
            reply = str(pv.query_one("#pv-reply", Static).render())
            assert reply.startswith("error ") and "temperature" in reply and "top-p" in reply, reply
            assert "max" in reply.split("top-p", 1)[1] and sent == [], reply
            from test_app_tabs import screen_text

            drawn = " ".join(screen_text(app).split())  # 80 columns: the reply wrapped, every word of it on screen
            assert app.size.width == 80 and len(reply) > 80 and " ".join(reply.split()) in drawn, (reply, drawn)
            box = pv.query_one("#pv-temperature", Input)
            pv.query_one("#pv-top-p", Input).value = "0.9"
            pv.query_one("#pv-max", Input).value = "64"
            box.focus()
            box.value = ""
            await pilot.press("enter")  # emptied: the value in force again
            await pilot.pause()
            assert box.value == "0.7"
            await pilot.press("5")
            assert box.value == "0.75", box.value
            pv.ended("the run has finished: these are its last previews")
            await pilot.pause()
            assert str(pv.query_one("#pv-reply", Static).render()) == ("no workers the run has finished: these are its "
                                                                       "last previews")
            pv.ended("")  # running again (a resumed run): the line goes
            await pilot.pause()
            assert str(pv.query_one("#pv-reply", Static).render()) == ""

    asyncio.run(flow())
