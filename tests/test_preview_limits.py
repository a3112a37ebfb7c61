"""The preview limits (temperature [0, 2], top_p (0, 1], max_new_tokens [1, 4096]) have one owner,
``engine.protocol.preview_param_problems``: the command, the run's config, ``voxtui infer`` and the
dashboard's inputs refuse exactly what it refuses."""

import asyncio
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import TrainConfig
from engine.protocol import SetPreviewParams, preview_param_problems
from engine.util import UsageError

temperatures = st.one_of(st.floats(-1, 3), st.sampled_from([0.0, 2.0, -0.0, 2.0000001, math.nan, math.inf]))
top_ps = st.one_of(st.floats(-0.5, 1.5), st.sampled_from([0.0, 1.0, 5e-324, 1.0000001, math.nan]))
most = st.one_of(st.integers(-5, 5000), st.sampled_from([0, 1, 4096, 4097]))


def expected(t, p, m):
    return {"temperature": not 0 <= t <= 2, "top_p": not 0 < p <= 1, "max_new_tokens": not 1 <= m <= 4096}


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
        def compose(self):
            yield Previews()

    cases = [("pv-temperature", "temperature", v) for v in ("-0.1", "0", "2", "2.01", "nan", "inf")]
    cases += [("pv-top-p", "top_p", v) for v in ("0", "1e-9", "1", "1.01", "-1")]
    cases += [("pv-max", "max_new_tokens", v) for v in ("0", "1", "4096", "4097")]

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
                else:
                    assert got == {field: value}, (text, got)

    asyncio.run(flow())
