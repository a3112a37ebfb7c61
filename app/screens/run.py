"""One run: tabs for the overview, hardware, previews, checkpoints, preflight and events."""

from __future__ import annotations

import json
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, Static, TabbedContent, TabPane

from app.messages import CommandReplied, EngineBack, EngineLost, EventsReceived
from app.screens.dialogs import Confirm, Help
from app.widgets.checkpoints import Checkpoints
from app.widgets.events_log import EventsLog
from app.widgets.hardware import Hardware
from app.widgets.overview import Overview
from app.widgets.previews import Previews
from engine.protocol import (
    EvalNow,
    Pause,
    PreviewNow,
    Resume,
    RunInference,
    SaveCheckpoint,
    SetPreviewParams,
    Stop,
)

TABS = ("overview", "gpus", "previews", "checkpoints", "preflight", "events")


class RunScreen(Screen):
    BINDINGS = [
        *[Binding(str(i + 1), f"tab('{t}')", t.title(), show=False) for i, t in enumerate(TABS)],
        Binding("n", "preview_now", "Preview"),
        Binding("s", "save", "Save"),
        Binding("e", "eval_now", "Eval"),
        Binding("p", "pause", "Pause/Resume"),
        Binding("x", "stop", "Stop"),
        Binding("question_mark", "help", "Keys"),
        Binding("q", "app.quit", "Quit"),
    ]

    def __init__(self, run_dir: str) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self._dirty = False
        self._last_render = 0.0

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="banner")
        with TabbedContent(id="tabs"):
            with TabPane("Overview", id="overview"):
                yield Overview()
            with TabPane("GPUs", id="gpus"):
                yield Hardware()
            with TabPane("Previews", id="previews"):
                yield Previews()
            with TabPane("Checkpoints", id="checkpoints"):
                yield Checkpoints()
            with TabPane("Preflight", id="preflight"):
                yield Static(id="preflight-report")
            with TabPane("Events", id="events"):
                yield EventsLog()
        yield Footer()

    def on_mount(self) -> None:
        self.title = f"voxtui — {self.run_dir.name}"
        self.query_one("#banner", Static).display = False
        self.show_preflight()
        self.follow()
        self.set_interval(0.03, self.render_if_dirty)  # at most ~30 redraws a second, only when there is news

    @work(thread=True, exclusive=True, group="engine")
    def follow(self) -> None:
        from textual.worker import get_current_worker

        from app.connection import follow

        worker = get_current_worker()
        follow(self.run_dir, self.post_message, lambda: worker.is_cancelled)

    # ---- events in, widgets out (attributes down)
    def on_events_received(self, message: EventsReceived) -> None:
        state = self.app.state
        for ev in message.events:
            state.apply(ev)
        self._dirty = True

    def render_if_dirty(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        self.rendered_seq = self.app.state.last_seq
        s = self.app.state
        active = self.query_one(TabbedContent).active
        panes = {"overview": Overview, "gpus": Hardware, "previews": Previews, "checkpoints": Checkpoints,
                 "events": EventsLog}
        if active in panes:
            self.query_one(panes[active]).show(s)
        self.sub_title = f"{s.state} · step {s.step}"

    @on(TabbedContent.TabActivated)
    def tab_changed(self) -> None:
        self._dirty = True
        self.render_if_dirty()

    def on_engine_lost(self, message: EngineLost) -> None:
        banner = self.query_one("#banner", Static)
        banner.update(f"ENGINE LOST — {message.reason}; reconnecting…")
        banner.display = True

    def on_engine_back(self, message: EngineBack) -> None:
        self.query_one("#banner", Static).display = False
        self.notify("engine reconnected")

    def show_preflight(self) -> None:
        widget = self.query_one("#preflight-report", Static)
        path = self.run_dir / "preflight.json"
        if not path.exists():
            widget.update("no preflight report in this run folder")
            return
        report = json.loads(path.read_text())
        colors = {"ok": "green", "info": "blue", "warn": "yellow", "fail": "red"}
        lines = [f"[b]verdict: {report['verdict'].upper()}[/b]", ""]
        lines += [f"[{colors[c['level']]}]{c['level']:>4}[/] {c['area']:<7} {c['message']}" for c in report["checks"]]
        lines += ["", f"launch: {report['command']}"]
        widget.update("\n".join(lines))

    # ---- commands (sent from a thread; the reply comes back as a message)
    @work(thread=True, group="commands")
    def send(self, command) -> None:
        from engine.client import EngineClient

        try:
            with EngineClient(self.run_dir) as client:
                reply = client.send(command)
            self.post_message(CommandReplied(command.type, reply.status, reply.reason))
        except Exception as e:  # engine gone mid-send
            self.post_message(CommandReplied(command.type, "error", str(e)))

    def on_command_replied(self, message: CommandReplied) -> None:
        text = f"{message.command}: {message.status}" + (f" — {message.reason}" if message.reason else "")
        self.notify(text, severity="information" if message.status == "ok" else "error")
        if message.command == "set_preview_params":
            self.query_one(Previews).show_reply(message.status, message.reason or "applied at the next step")

    @on(Previews.ParamsRequested)
    def params(self, m: Previews.ParamsRequested) -> None:
        self.send(SetPreviewParams(temperature=m.temperature, top_p=m.top_p, max_new_tokens=m.max_new_tokens))

    @on(Previews.PreviewRequested)
    def action_preview_now(self) -> None:
        self.send(PreviewNow())

    @on(Checkpoints.InferenceRequested)
    def infer(self, m: Checkpoints.InferenceRequested) -> None:
        self.send(RunInference(checkpoint=m.step))

    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab

    def action_save(self) -> None:
        self.send(SaveCheckpoint())

    def action_eval_now(self) -> None:
        self.send(EvalNow())

    def action_pause(self) -> None:
        self.send(Resume() if self.app.state.state == "paused" else Pause())

    def action_stop(self) -> None:
        def done(yes: bool | None) -> None:
            if yes:
                self.send(Stop())

        self.app.push_screen(Confirm("Stop the run? The workers save a checkpoint, then exit."), done)

    def action_help(self) -> None:
        self.app.push_screen(Help())

    def on_unmount(self) -> None:
        self.workers.cancel_group(self, "engine")
