"""The run screen's Charts, Evals, Config and Logs tabs, its keys (window, log scale, follow, search,
next log, SVG export), the terminal notifications and the 80-column layout: Pilot drives the real app on
run folders built from real protocol events (tests/tabs_run.py; no engine: a finished run is read from
its events.jsonl)."""

import asyncio
import io
import json
import time

import pytest
import tabs_run

from conftest import until_still


def screen_text(app) -> str:
    """What the terminal shows now, as plain text."""
    from rich.console import Console

    console = Console(width=app.size.width, height=app.size.height, file=io.StringIO(), force_terminal=True,
                      color_system="standard", record=True, legacy_windows=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=[]))
    return console.export_text()


async def painted(app, pilot, *texts: str, timeout: float = 15.0) -> str:
    """The screen's text once it shows every one of `texts` (a loaded machine can take seconds to paint;
    a fixed pause is not enough): the last text seen otherwise, for the caller's assert to print."""
    deadline = time.monotonic() + timeout
    while True:
        text = screen_text(app)
        if all(t in text for t in texts) or time.monotonic() > deadline:
            return text
        await pilot.pause(0.05)


async def loaded(app, pilot) -> None:
    for _ in range(200):
        if app.state.state == "finished" and app.state.disk_inference:
            return
        await pilot.pause(0.05)
    raise AssertionError("the run was not loaded")


async def at_step(app, pilot, step: int, tries: int = 100) -> None:
    """Until the dashboard has folded in the events up to ``step`` (or ``tries`` pauses of 50 ms)."""
    for _ in range(tries):
        if app.state.step == step:
            return
        await pilot.pause(0.05)


@pytest.fixture
def run(tmp_path):
    return tabs_run.build(tmp_path)


def rows(table) -> list[list[str]]:
    return [[str(getattr(c, "plain", c)) for c in table.get_row_at(i)] for i in range(table.row_count)]


def test_charts_window_and_log_scale_evals_config(run):
    from textual.widgets import DataTable, TabbedContent
    from textual_plotext import PlotextPlot

    from app.app import VoxApp

    async def flow():
        app = VoxApp(str(run))
        async with app.run_test(size=(120, 40)) as pilot:
            await loaded(app, pilot)
            tabs = app.screen.query_one(TabbedContent)
            await pilot.press("7")
            await pilot.pause(0.3)
            assert tabs.active == "charts"
            head = app.screen.query_one("#ch-head").render().plain
            assert "last 200 steps" in head and "loss scale: linear" in head
            shown = {p.id for p in app.screen.query(PlotextPlot) if p.display and p.id.startswith("ch-")}
            assert shown == {"ch-loss", "ch-lr", "ch-gn", "ch-tps", "ch-mfu", "ch-mem", "ch-gpu-util", "ch-gpu-mem",
                             "ch-gpu-power"}  # a GPU run: no CPU plot
            loss = app.screen.query_one("#ch-loss", PlotextPlot)

            def drawn() -> str:
                return loss.render().plain

            def first_step() -> str:  # the x axis' first tick (whole steps), on the line above its title
                return drawn().splitlines()[-2].split()[0]

            assert first_step() == "41" and "step" in drawn() and "train" in drawn() and "val" in drawn()
            util = app.screen.query_one("#ch-gpu-util", PlotextPlot).render().plain
            assert "GPU 0" in util and "GPU 1" in util and "GPU utilisation" in util
            await pilot.press("w")  # 1000 steps: all of this run
            await pilot.pause(0.2)
            assert "last 1000 steps" in app.screen.query_one("#ch-head").render().plain
            assert first_step() == "1"
            await pilot.press("w", "w")  # all, then back to 200
            await pilot.pause(0.2)
            assert "last 200 steps" in app.screen.query_one("#ch-head").render().plain and first_step() == "41"
            await pilot.press("l")
            await pilot.pause(0.2)
            assert "loss scale: log" in app.screen.query_one("#ch-head").render().plain
            assert "log scale" in drawn()
            await pilot.press("l")
            await pilot.pause(0.2)
            assert "log scale" not in drawn()

            await pilot.press("8")
            await pilot.pause(0.3)
            evals = rows(app.screen.query_one("#evl-table", DataTable))
            assert [r[0] for r in evals] == ["40", "80", "120", "160", "200", "240"]
            assert [r[0] for r in evals if "best" in r[3]] == ["200"]
            matrix = rows(app.screen.query_one("#evl-matrix", DataTable))
            assert [r[0] for r in matrix] == ["80", "160", "240"]
            assert matrix[0][1] == "0.312 [.281–.344]" and matrix[2][2] == "13.9 [11.9–16.0]"
            plot = app.screen.query_one("#evl-plot", PlotextPlot).render().plain
            assert "ROUGE-L" in plot and "BLEU/100" in plot

            await pilot.press("9")
            await pilot.pause(0.3)
            params = rows(app.screen.query_one("#cfg-params", DataTable))
            assert params[0][:2] == ["audio_tower (frozen, removed after loading)", "removed"]
            assert ["language_model.layers (lora)", "trainable", "14.7M", "0"] in params
            config = dict(r[:2] for r in rows(app.screen.query_one("#cfg-table", DataTable)))
            assert config["lr"] == "0.0002" and config["lora_targets"] == "q_proj, k_proj, v_proj, o_proj"
            assert "config.toml" in app.screen.query_one("#cfg-head").render().plain
            # the Charts keys act in the Charts tab only
            await pilot.press("w")
            await pilot.pause(0.1)
            assert "last 200 steps" in app.screen.query_one("#ch-head").render().plain
            await pilot.press("q")

    asyncio.run(flow())


def test_config_without_config_toml_is_the_reported_one(run):
    from textual.widgets import DataTable

    from app.app import VoxApp

    (run / "config.toml").unlink()

    async def flow():
        app = VoxApp(str(run))
        async with app.run_test(size=(100, 30)) as pilot:
            await loaded(app, pilot)
            await pilot.press("9")
            await pilot.pause(0.3)
            assert "as the run reported it" in app.screen.query_one("#cfg-head").render().plain
            config = dict(r[:2] for r in rows(app.screen.query_one("#cfg-table", DataTable)))
            assert config["model_id"] == tabs_run.CONFIG["model_id"]

    asyncio.run(flow())


def test_logs_follow_search_and_files(run):
    from textual.widgets import Input, RichLog, TabbedContent

    from app.app import VoxApp

    def log_lines(app) -> list[str]:
        return [strip.text.rstrip() for strip in app.screen.query_one("#log-text", RichLog).lines]

    async def flow():
        app = VoxApp(str(run))
        async with app.run_test(size=(100, 30)) as pilot:
            await loaded(app, pilot)
            await pilot.press("0")
            await pilot.pause(0.6)
            assert app.screen.query_one(TabbedContent).active == "logs"
            shown = log_lines(app)
            assert len(shown) == len(tabs_run.WORKER_LOG)
            # data, never markup; the escape drawn as a visible symbol, not sent to the terminal
            assert "[rank0] step 40 val loss 2.3100 [/INST] ␛[31mred␛[0m" in shown
            with open(run / "worker.log", "a") as f:
                f.write("[rank0] a line written later\n[rank0] torn")
            await pilot.pause(1.2)
            assert log_lines(app)[-1] == "[rank0] a line written later"  # followed; the torn line waits
            await pilot.press("f")  # follow off: what is shown stays
            await pilot.pause(0.1)
            assert "follow: off" in app.screen.query_one("#log-status").render().plain
            with open(run / "worker.log", "a") as f:
                f.write(" line\n[rank0] after the pause\n")
            await pilot.pause(1.2)
            assert log_lines(app)[-1] == "[rank0] a line written later"
            await pilot.press("f")
            await pilot.pause(1.2)
            assert log_lines(app)[-2:] == ["[rank0] torn line", "[rank0] after the pause"]
            await pilot.press("slash")
            await pilot.pause(0.1)
            assert app.focused is app.screen.query_one("#log-search", Input)
            await pilot.press(*"RANK1")  # case-insensitive
            await pilot.pause(0.3)
            assert log_lines(app) == [line for line in tabs_run.WORKER_LOG if "rank1" in line]
            assert "2 of 13 lines match" in app.screen.query_one("#log-status").render().plain
            await pilot.press("escape")
            app.screen.query_one("#log-search", Input).value = ""
            await pilot.press("right_square_bracket")  # the next log file: engine.log
            await pilot.pause(1.0)
            assert log_lines(app) == ["engine: listening", "engine: workers started (pid 4242)", "engine: run finished"]
            # two reads from the same place before either is shown (the key's read and the timer's, on a busy
            # machine): the lines once
            from app.widgets.logs import Logs

            logs = app.screen.query_one(Logs)
            for _ in range(len(logs.files())):  # round to engine.log again: read from its start
                logs.next_file()
            assert logs.file == "engine.log" and logs.file_offset == 0
            app.screen.read_log()
            app.screen.read_log()
            await pilot.pause(0.5)
            assert log_lines(app) == ["engine: listening", "engine: workers started (pid 4242)", "engine: run finished"]
            assert "engine.log" in app.screen.query_one("#log-status").render().plain

    asyncio.run(flow())


def test_logs_say_the_run_folder_is_gone_and_keep_what_they_read(run, tmp_path):
    """The run folder moved away while its log is shown: the lines read stay, and the status says the folder
    is gone (it read "0 lines", or "not there yet" as if the file had never been written)."""
    from textual.widgets import RichLog

    from app.app import VoxApp

    async def flow():
        app = VoxApp(str(run))
        async with app.run_test(size=(120, 30)) as pilot:
            await loaded(app, pilot)
            await pilot.press("0")
            await pilot.pause(0.6)
            run.rename(tmp_path / "moved")
            await pilot.pause(1.2)
            status = app.screen.query_one("#log-status").render().plain
            return status, len(app.screen.query_one("#log-text", RichLog).lines)

    status, shown = asyncio.run(flow())
    assert status.startswith(f"worker.log · {shown} lines read · the run folder is gone "
                             "(moved or removed)"), status
    assert shown == len(tabs_run.WORKER_LOG)  # what was read before, still shown


def test_export_svg_writes_the_screen_into_the_run_folder(run):
    from app.app import VoxApp

    async def flow():
        app = VoxApp(str(run))
        async with app.run_test(size=(100, 30)) as pilot:
            await loaded(app, pilot)
            await pilot.press("8")
            await pilot.pause(0.3)
            await pilot.press("o")
            await pilot.pause(0.3)
            return [n.message for n in app._notifications]

    notices = asyncio.run(flow())
    saved = list(run.glob("voxtui-tabs_run-evals-*.svg"))
    assert len(saved) == 1
    svg = saved[0].read_text()
    assert svg.lstrip().startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert "checkpoint&#160;matrix" in svg or "checkpoint matrix" in svg
    assert any(str(saved[0]) in n for n in notices)


def fresh(*events):
    for i, ev in enumerate(events):
        ev.seq, ev.time, ev.run = 10_000 + i, time.time(), tabs_run.NAME
    return list(events)


@pytest.mark.parametrize("notify", [True, False], ids=["notify", "no-notify"])
def test_notify_on_finish_failure_and_error_alerts(run, notify):
    from app.app import VoxApp
    from app.messages import EventsReceived
    from engine.protocol import Alert, Status

    async def flow():
        app = VoxApp(str(run), notify=notify)
        async with app.run_test(size=(100, 30)) as pilot:
            await loaded(app, pilot)
            assert app.notices_sent == []  # the history of a run that finished before: no notification
            app.screen.post_message(EventsReceived(fresh(
                Alert(level="warning", kind="loss_spike", message="not notified"),
                Alert(level="error", kind="rank_died", message="rank 1 exited\x1b]0;x\x07; code 1"),
                Status(state="failed", message="workers exited with code 1"))))
            await pilot.pause(0.3)
            return list(app.notices_sent)

    sent = asyncio.run(flow())
    if not notify:
        assert sent == []
        return
    assert len(sent) == 2
    alert, failed = sent
    assert alert.startswith("\a\x1b]9;voxtui: tabs_run error: rank_died: rank 1 exited")
    assert "\x1b]777;notify;voxtui: tabs_run error: rank_died;rank 1 exited" in alert
    # the run's text cannot end the escape early or start another: no control character, no separator
    for seq in sent:
        body = seq[1:].replace("\x1b]9;", "", 1).replace("\x1b]777;notify;", "", 1)
        assert "\x1b" not in body and body.count("\x07") == 2
    assert "failed" in failed and "workers exited with code 1" in failed


def test_attach_passes_no_notify(monkeypatch, tmp_path):
    """``voxtui attach --no-notify`` turns the notifications off (the flag as the CLI's parser sets it)."""
    import argparse

    import app.main as main

    made = {}

    def run_dashboard(app, headless=False):
        made["notify"] = app.terminal_notify
        return 0

    monkeypatch.setattr(main, "run_dashboard", run_dashboard)
    run = tabs_run.build(tmp_path)
    for flag, expected in ((True, False), (False, True)):
        assert main.attach(argparse.Namespace(run=str(run), runs=str(tmp_path), no_notify=flag)) == 0
        assert made["notify"] is expected
    assert main.attach(argparse.Namespace(run=str(run), runs=str(tmp_path))) == 0  # a parser without the flag
    assert made["notify"] is True


def test_80_columns_nothing_important_cut(run):
    from textual.widgets import Input

    from app.app import VoxApp

    async def flow():
        app = VoxApp(str(run))
        async with app.run_test(size=(80, 24)) as pilot:
            await loaded(app, pilot)
            overview = await painted(app, pilot, "ETA –", "best val 1.5800 @200", "2 ranks (cuda)")
            await pilot.press("4")
            checkpoints = await painted(app, pilot, "ROUGE-L")
            await pilot.press("3")
            await painted(app, pilot, "temperature")
            box = app.screen.query_one("#pv-temperature", Input)
            box.focus()
            await pilot.press("end")
            previews = await painted(app, pilot, " 0.7 ")
            tabs = previews.splitlines()[1]
            await pilot.press("escape", "2")
            gpus = await painted(app, pilot, "straggler")
            await pilot.press("8")
            evals = await painted(app, pilot, "ckpt-240-val")
            return overview, checkpoints, previews, tabs, gpus, evals

    overview, checkpoints, previews, tabs, gpus, evals = asyncio.run(flow())
    matrix = [line.split() for line in evals.splitlines() if line.split()[:1] in (["80"], ["160"], ["240"])]
    assert [row[-1] for row in matrix[-3:]] == ["ckpt-80-val", "ckpt-160-val", "ckpt-240-val"]  # the job, whole
    assert "ETA –" in overview and "best val 1.5800 @200" in overview
    assert "2 ranks (cuda)  mistralai/Voxtral-Mini-3B-2507" in overview
    header = next(line for line in checkpoints.splitlines() if "ROUGE-L" in line)
    assert header.split()[:8] == ["state", "rows", "ROUGE-L", "Distinct-1", "Distinct-2", "BLEU", "ppl", "job"]
    assert " 0.7 " in previews
    assert tabs.split() == ["Overview", "GPUs", "Previews", "Checkpoints", "Preflight", "Events", "Charts", "Evals",
                            "Config", "Logs"]
    assert "straggler: step time > 1.2× the others' median" in gpus


def test_a_cpu_run_hides_the_gpu_table_and_equal_ranks_are_no_stragglers(tmp_path):
    import msgspec

    from app.app import VoxApp
    from engine.protocol import RunInfo, Status, Step, Telemetry

    run = tmp_path / "cpu_run"
    run.mkdir()
    evs = [Status(state="running"), RunInfo(model_id="tiny", world_size=2, device="cpu", train_rows=4, val_rows=0,
                                            total_steps=20, steps_per_epoch=10)]
    for s in range(1, 13):
        # rank 1 reported no time on two steps (0): never a straggler by the others' zero
        evs.append(Step(step=s, loss=1.0, lr=1e-3, grad_norm=1.0, tokens_per_s=100.0, step_time=0.31,
                        step_time_rank=[0.31, 0.0 if s in (5, 12) else 0.31], tokens_per_s_rank=[50.0, 50.0]))
        evs.append(Telemetry(host="vm", rank=0, cpu_percent=99.0, rss=1.2, mem_used_frac=0.4))
    for i, ev in enumerate(evs, 1):
        ev.seq, ev.time, ev.run = i, tabs_run.T0 + i, "cpu_run"
    (run / "events.jsonl").write_bytes(b"".join(msgspec.json.encode(ev) + b"\n" for ev in evs))

    async def flow():
        app = VoxApp(str(run))
        async with app.run_test(size=(80, 24)) as pilot:
            await at_step(app, pilot, 12)
            await pilot.press("2")
            text = await painted(app, pilot, "CPU run on vm", "straggler")
            assert app.screen.query_one("#hw-gpus").display is False
            await pilot.press("7")
            await pilot.pause(0.3)
            from textual_plotext import PlotextPlot

            plots = {p.id for p in app.screen.query(PlotextPlot) if p.display and p.id.startswith("ch-")}
            head = app.screen.query_one("#ch-head").render().plain
            return text, plots, head

    text, plots, head = asyncio.run(flow())
    assert "CPU run on vm" in text and "GPU  name" not in text
    assert "straggler" in text and " straggler\n" not in text.replace(" ", " ")
    assert "ch-cpu" in plots and not plots & {"ch-gpu-util", "ch-gpu-mem", "ch-gpu-power", "ch-mfu", "ch-mem"}
    assert "not recorded: MFU" in head


def test_straggler_rule_takes_the_median_of_recent_steps():
    from app.state import RunState
    from app.widgets.hardware import straggler
    from engine.protocol import Step

    assert straggler([0.31, 0.0]) is None  # a rank with no time is not the measure of the others
    assert straggler([0.31, float("nan"), 0.31]) is None
    assert straggler([0.30, 0.45, 0.0]) == 1
    s = RunState()
    for i in range(1, 21):
        slow = 0.5 if i == 20 else 0.3  # one slow step of rank 1 is noise, not a straggler
        s.apply(Step(step=i, loss=1.0, lr=1.0, grad_norm=1.0, tokens_per_s=1.0, step_time_rank=[0.3, slow], seq=i))
    assert straggler(s.rank_step_times()) is None
    for i in range(21, 27):
        s.apply(Step(step=i, loss=1.0, lr=1.0, grad_norm=1.0, tokens_per_s=1.0, step_time_rank=[0.3, 0.5], seq=i))
    assert straggler(s.rank_step_times()) == 1  # slower over most of the last 10 steps


def test_state_keeps_each_ranks_telemetry_and_the_memory_series():
    from app.state import RunState
    from engine.protocol import GpuStat, Step, Telemetry

    s = RunState()
    s.apply(Step(step=1, loss=1.0, lr=1.0, grad_norm=1.0, tokens_per_s=1.0, mem_allocated=2.0, mem_reserved=3.0,
                 mem_peak=4.0, seq=1))
    s.apply(Telemetry(host="h", rank=0, gpus=[GpuStat(index=0, util=90.0)], seq=2))
    s.apply(Telemetry(host="h", rank=1, gpus=[GpuStat(index=1, util=80.0)], seq=3))
    s.apply(Telemetry(host="h", rank=0, gpus=[GpuStat(index=0, util=70.0)], seq=4))
    assert [(h, g.index, g.util) for h, g in s.gpus()] == [("h", 0, 70.0), ("h", 1, 80.0)]
    assert s.memory == [(1, 2.0, 3.0, 4.0)]
    assert [h[1] for h in s.telemetry_history] == [1, 1, 1]
    assert json.dumps([list(h[2]) for h in s.telemetry_history])  # plain data


def test_a_progress_bar_redrawn_in_place_shows_its_last_state():
    """tqdm redraws a bar with carriage returns on one line: the Logs tab shows what a terminal would, the
    last state (a CRLF line end is no symbol either); other control characters stay visible symbols."""
    from app.widgets.logs import Logs

    logs = Logs()
    logs.search_text, logs.matches = "", 0  # (as on_mount sets them)
    assert logs.line("Loading weights:   0%|\rLoading weights:  50%|\rLoading weights: 100%|").plain == \
        "Loading weights: 100%|"
    assert logs.line("step 3 done\r").plain == "step 3 done"
    assert logs.line("red \x1b[31mx\rgone").plain == "gone" and "␛" in logs.line("red \x1b[31mx").plain


def events_run(tmp_path, name: str, device: str, mfu: float | None):
    """A running run folder of 12 steps on ``device``, each with ``mfu`` (None: no peak FLOP/s known)."""
    import msgspec

    from engine.protocol import RunInfo, Status, Step

    run = tmp_path / name
    run.mkdir()
    evs = [Status(state="running"), RunInfo(model_id="tiny", world_size=1, device=device, train_rows=4, val_rows=0,
                                            total_steps=20, steps_per_epoch=10)]
    evs += [Step(step=s, loss=2.0 - s / 20, lr=1e-3, grad_norm=1.0, tokens_per_s=100.0, mfu=mfu) for s in range(1, 13)]
    for i, ev in enumerate(evs, 1):
        ev.seq, ev.time, ev.run = i, tabs_run.T0 + i, name
    (run / "events.jsonl").write_bytes(b"".join(msgspec.json.encode(ev) + b"\n" for ev in evs))
    return run


@pytest.mark.parametrize("device,mfu,label", [("cpu", None, "MFU: n/a on CPU: set --peak_tflops"),
                                              ("cuda", None, "MFU: n/a (peak unknown): set --peak_tflops"),
                                              ("cuda", 0.41, "MFU 0.41")])
def test_overview_names_the_charts_key_and_says_when_there_is_no_mfu(tmp_path, device, mfu, label):
    """The loss chart's title says which key shows every curve; steps without MFU (no peak FLOP/s known:
    the CPU, an unknown GPU) say so in words, with no empty sparkline under them."""
    from textual.widgets import Label

    from app.app import VoxApp

    run = events_run(tmp_path, "r", device, mfu)

    async def flow():
        app = VoxApp(str(run))
        async with app.run_test(size=(100, 30)) as pilot:
            await at_step(app, pilot, 12)
            text = await painted(app, pilot, "loss (press 7 for every curve)", label.split(": set ")[0])
            shown = app.screen.query_one("#ov-mfu-label", Label).render().plain
            return text, shown, app.screen.query_one("#ov-mfu").display

    text, shown, spark = asyncio.run(flow())
    assert "loss (press 7 for every curve)" in text and "(7: every curve)" not in text
    assert shown == label and label.split(": set ")[0] in text  # the hint wraps under it in a narrow column
    assert mfu is not None or "--peak_tflops" in text
    assert spark is (mfu is not None)


def test_preflight_lines_wrap_under_their_own_column(tmp_path):
    """A long preflight message wraps under the message column (a hanging indent), a long path too, and
    so does the launch command; the report stays data (markup in it is shown as written)."""
    from app.app import VoxApp

    run = tabs_run.build(tmp_path)
    long = "p50 120, p99 900, max 3000 tokens; 45 row(s) over --max_len 1024 (--long truncate) [bold]x[/bold] " * 2
    path = "/data/" + "very-long-folder-name/" * 6 + "train.jsonl"
    report = {"verdict": "warn", "command": "torchrun --nproc_per_node 2 -m engine.train --config " + path,
              "checks": [{"level": "ok", "area": "system", "message": "2 GPUs"},
                         {"level": "warn", "area": "data", "message": long + "\nsecond line"},
                         {"level": "fail", "area": "data", "message": path}]}
    (run / "preflight.json").write_text(json.dumps(report))

    async def flow(size):
        app = VoxApp(str(run))
        async with app.run_test(size=size) as pilot:
            await loaded(app, pilot)
            await pilot.press("5")
            return await painted(app, pilot, "launch:", "second line")

    for size in ((60, 30), (80, 24), (120, 30)):
        text = asyncio.run(flow(size))
        rows = text.splitlines()
        start = next(i for i, r in enumerate(rows) if r.startswith(" warn data"))
        column = rows[start].index("p50")
        after = rows[start + 1:next(i for i, r in enumerate(rows) if r.startswith(" fail data"))]
        assert len(after) >= 2 and all(r[:column].strip() == "" and r[column] != " " for r in after), (size, text)
        assert after[-1].strip() == "second line"
        assert "[bold]x[/bold]" in "".join(r[column:].rstrip() for r in [rows[start], *after])
        fail = next(i for i, r in enumerate(rows) if r.startswith(" fail data"))
        launch = next(i for i, r in enumerate(rows) if r.startswith(" launch: "))
        folded = [r for r in rows[fail:launch] if r.strip()]  # a path with no space: broken, never cut
        assert all(r[:column].strip() == "" for r in folded[1:]), (size, text)
        assert "".join(r[column:].rstrip() for r in folded) == path, (size, text)
        indent = rows[launch].index("torchrun")
        assert all(r[:indent].strip() == "" for r in rows[launch + 1:launch + 3]), (size, text)
        # the command starts a new run (the worker refuses a folder that holds one): how to go on is said
        said = " ".join(" ".join(rows[launch:]).split())
        assert "once it has trained, continue it with voxtui run --resume RUN, RUN this run's folder" in said, said
    # the report a resume made (voxtui run --resume) launches the resume: said so
    (run / "preflight.json").write_text(json.dumps({**report, "command": f"torchrun -m engine.train --resume {run}"}))
    said = " ".join(asyncio.run(flow((80, 24))).split())
    assert "continues this run from its latest checkpoint, as voxtui run --resume did" in said and "once" not in said


def test_the_events_logs_scrollbar_is_drawn_on_a_track_of_its_own(run):
    """A part-cell glyph (▂▂, ▅▅) at a row's right edge in the Events tab is the log's scrollbar thumb:
    it is drawn on a track that shows — in a 16-colour terminal too — never on the screen's background,
    where it read as a stray mark. Nothing else in the tab draws such glyphs (the filter box's border aside).
    At the sizes where it was seen (100 × 30, 160 × 50) and a narrow one, in one session resized."""
    from rich.color import ColorSystem
    from textual.scrollbar import ScrollBar

    from app.app import VoxApp

    def standard(color):
        return color.downgrade(ColorSystem.STANDARD).number if color is not None and not color.is_default else None

    def look(app, size):
        log = app.screen.query_one("#ev-log")
        assert log.max_scroll_y > 0, size  # a scrollbar to look at
        screen_bg = standard(app.screen.styles.background.rich_color)
        found, tracks = [], set()
        for y, strip in enumerate(app.screen._compositor.render_strips()):
            x = 0
            for seg in strip:
                for ch in seg.text:
                    # only the glyphs and the right edge (where the log's scrollbar is) are looked up
                    if ch in "▁▂▃▄▅▆▇█" or x >= size[0] - 3:
                        widget, _ = app.screen.get_widget_at(x, y)
                        if isinstance(widget, ScrollBar) and widget.parent is log and not seg.style.reverse:
                            tracks.add(standard(seg.style.bgcolor))
                        if ch in "▁▂▃▄▅▆▇█" and widget.id != "ev-filter":
                            found.append((x, y, ch, type(widget).__name__, standard(seg.style.bgcolor),
                                          standard(seg.style.color)))
                    x += 1
        assert tracks and screen_bg not in tracks, (size, tracks, screen_bg)
        for x, _y, _ch, kind, bg, fg in found:
            assert kind == "ScrollBar" and x >= size[0] - 2, (size, found)
            assert bg != screen_bg and fg != bg, (size, found)

    async def flow():
        app = VoxApp(str(run))
        async with app.run_test(size=(160, 50)) as pilot:
            await loaded(app, pilot)
            await pilot.press("6")
            await painted(app, pilot, "run_info")
            for size in ((160, 50), (100, 30), (60, 20)):
                await pilot.resize_terminal(*size)
                await pilot.pause(0.3)
                look(app, size)

    asyncio.run(flow())


def test_the_events_log_keeps_to_its_end_when_the_terminal_is_resized(run):
    """Grown then shrunk, the Events tab still shows the newest event at its bottom (it showed an old one:
    a finished run's earlier status read as its state); scrolled up by the user, it stays where it was put."""
    from app.app import VoxApp

    async def flow():
        app = VoxApp(str(run))
        async with app.run_test(size=(80, 24)) as pilot:
            await loaded(app, pilot)
            await pilot.press("6")
            await painted(app, pilot, "run_info")
            log = app.screen.query_one("#ev-log")
            ends = []
            for size in ((120, 40), (80, 24), (100, 20)):
                await pilot.resize_terminal(*size)
                await until_still(pilot)
                ends.append((size, log.max_scroll_y > 0, log.scroll_y == log.max_scroll_y))
            log.scroll_home(animate=False)
            await pilot.pause(0.2)
            log.release_anchor()
            await pilot.resize_terminal(120, 40)
            await until_still(pilot)
            return ends, log.scroll_y

    ends, after_home = asyncio.run(flow())
    assert all(scrolls and at_end for _, scrolls, at_end in ends), ends
    assert after_home == 0


def test_a_long_event_wraps_whole_in_the_events_log_and_wraps_again_at_a_new_width(tmp_path):
    """An alert longer than the log is wide is shown whole on the lines under it (it was cut at the edge,
    with nothing to say it went on), and wrapped again when the terminal is resized; a line never runs past
    the log's edge."""
    import msgspec

    from app.app import VoxApp
    from engine.protocol import Alert, Status

    run = events_run(tmp_path, "wrap", "cpu", None)
    words = " ".join(f"w{i:03d}" for i in range(52))  # 259 characters: the log shows up to 300 of a message
    evs = [Alert(level="error", kind="exception", message=f"RuntimeError: {words} END"), Status(state="failed")]
    for i, ev in enumerate(evs, 15):
        ev.seq, ev.time, ev.run = i, tabs_run.T0 + i, "wrap"
    with open(run / "events.jsonl", "ab") as f:
        f.write(b"".join(msgspec.json.encode(ev) + b"\n" for ev in evs))

    async def flow():
        app = VoxApp(str(run))
        seen = []
        async with app.run_test(size=(80, 30)) as pilot:
            await at_step(app, pilot, 12)
            await pilot.press("6")
            for size in ((80, 30), (140, 30), (60, 30)):
                await pilot.resize_terminal(*size)
                await until_still(pilot)
                await pilot.pause(0.3)
                log = app.screen.query_one("#ev-log")
                texts = [line.text for line in log.lines]
                seen.append((size, log.scrollable_content_region.width, texts))
        return seen

    for size, width, texts in asyncio.run(flow()):
        joined = " ".join(t.strip() for t in texts)
        assert "RuntimeError: w000" in joined and "w051 END" in joined, (size, texts)
        assert max(len(t.rstrip()) for t in texts) <= width, (size, width, texts)
        first = next(i for i, t in enumerate(texts) if "RuntimeError" in t)
        assert "END" not in texts[first]  # it did need more than one line


def test_a_small_bleu_reads_the_same_in_the_evals_and_checkpoints_tabs():
    """A small model's BLEU (0–100) under 1 keeps two significant digits, interval too, in both tabs (the
    Evals matrix said 0.0 [.0–.0] where Checkpoints said 0.01)."""
    from app.text import BLEU_FORMAT
    from app.widgets import checkpoints
    from app.widgets.evaluations import MATRIX, cell

    fmt = dict((k, f) for k, _, f in MATRIX)["bleu"]
    row = {"metrics": {"bleu": 0.0123}, "ci": {"bleu": [0.0031, 0.031]}}
    assert cell(row, "bleu", fmt) == "0.012 [.0031–.031]"
    assert dict(checkpoints.METRICS)["bleu"].format(0.0123) == "0.012"
    assert cell({"metrics": {"bleu": 13.94}, "ci": {"bleu": [11.9, 16.04]}}, "bleu", fmt) == "13.9 [11.9–16.0]"
    assert [BLEU_FORMAT.format(v) for v in (0.0, 0.5, 1.0, 42.42)] == ["0", "0.5", "1.0", "42.4"]


def test_the_checkpoint_matrix_marks_a_job_generated_otherwise_than_most():
    """Jobs with other generation settings (max_new_tokens, temperature, the data…) are not comparable as
    they stand: the matrix says which setting differs from most jobs' (they sat side by side unmarked)."""
    from app.state import RunState
    from app.widgets.evaluations import matrix

    def job(ckpt, **changed):
        params = {"checkpoint": ckpt, "data": "v.jsonl", "data_sha256": "a" * 64, "max_new_tokens": 128,
                  "temperature": 0.0, "top_p": 1.0, "seed": 0, "batch_size": 8, **changed}
        return {"state": "finished", "checkpoint": ckpt, "rougeL": 0.3, "params": params}

    s = RunState()
    s.disk_inference = {"checkpoint-20-val": job("checkpoint-20"), "checkpoint-40-val": job("checkpoint-40"),
                        "checkpoint-60-val": job("checkpoint-60", max_new_tokens=8, batch_size=2),
                        "checkpoint-80-val": job("checkpoint-80", data_sha256="b" * 64)}
    differs = {r["name"]: r["differs"] for r in matrix(s)}
    assert differs == {"checkpoint-20-val": [], "checkpoint-40-val": [], "checkpoint-60-val": ["max_new_tokens 8"],
                       "checkpoint-80-val": ["other data"]}  # the batch size changes no score: not said


def test_a_newline_within_an_event_is_shown_on_its_one_line(tmp_path):
    """A preview whose text holds newlines (a model's answer in several lines), or an alert's message with a
    traceback's: each event is still one line in the Events log (seq, type, text), its newlines shown as ⏎."""
    import msgspec

    from app.app import VoxApp
    from engine.protocol import Alert, Preview

    run = events_run(tmp_path, "newlines", "cpu", None)
    evs = [Preview(step=12, prompt="p", text="first line\nsecond line\r\nthird", temperature=0.7, top_p=0.9),
           Alert(level="error", kind="exception", message="Traceback:\n  boom")]
    for i, ev in enumerate(evs, 15):
        ev.seq, ev.time, ev.run = i, tabs_run.T0 + i, "newlines"
    with open(run / "events.jsonl", "ab") as f:
        f.write(b"".join(msgspec.json.encode(ev) + b"\n" for ev in evs))

    async def flow():
        app = VoxApp(str(run))
        async with app.run_test(size=(120, 30)) as pilot:
            await at_step(app, pilot, 12)
            await pilot.press("6")
            await until_still(pilot)
            await pilot.pause(0.3)
            return [line.text.rstrip() for line in app.screen.query_one("#ev-log").lines]

    texts = asyncio.run(flow())
    assert texts[-2:] == ["    15 preview    step 12 #0 T=0.7: first line⏎second line⏎third",
                          "    16 alert      error exception: Traceback:⏎  boom"], texts[-4:]
