"""One run: tabs for the overview, hardware, previews, checkpoints, preflight, events, charts,
evaluations, config & model, and logs."""

from __future__ import annotations

import os
import secrets
import shlex
import subprocess
import sys
import time
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Static, TabbedContent, TabPane, Tabs

from app.messages import (
    CommandReplied,
    ConfigRead,
    DiskScanned,
    EngineLost,
    EngineSeen,
    EngineStatusRead,
    EventsReceived,
    LogRead,
)
from app.screens.dialogs import Confirm, Help
from app.state import FINAL, NOT_ENDED
from app.text import assemble, data, lines, plain, show_text
from app.widgets.charts import Charts
from app.widgets.checkpoints import Checkpoints, inference_running
from app.widgets.config import ConfigView
from app.widgets.evaluations import Evaluations
from app.widgets.events_log import EventsLog
from app.widgets.hardware import Hardware
from app.widgets.logs import Logs, read_new
from app.widgets.overview import Overview
from app.widgets.preflight import PreflightReport
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
from engine.util import shell_join, shell_quote, short_path

# tab id, its key, its title
TABS = (("overview", "1", "Overview"), ("gpus", "2", "GPUs"), ("previews", "3", "Previews"),
        ("checkpoints", "4", "Checkpoints"), ("preflight", "5", "Preflight"), ("events", "6", "Events"),
        ("charts", "7", "Charts"), ("evals", "8", "Evals"), ("config", "9", "Config"), ("logs", "0", "Logs"))
PLOTS_EVERY_S = 1.0  # plots (Overview, Charts, Evals) are redrawn at most this often: light over a slow link
REDRAW_GAP_S = 0.02  # news is drawn at once after a quiet spell, and a burst at most this often
# tabs whose widgets are redrawn less often than the news comes (what they show changes slowly, or a
# redraw repaints much of the screen): tab → seconds between redraws
PANE_EVERY_S = {"gpus": 1.0, "events": 0.5}
LOG_EVERY_S = 0.5  # the followed log is read this often while the Logs tab shows
# keys that act in one tab only: action → tab
TAB_ACTIONS = {"window": "charts", "log_scale": "charts", "follow": "logs", "search": ("logs", "events"),
               "next_log": "logs", "infer_selected": "checkpoints", "infer_all": "checkpoints"}
# keys that command the engine: hidden once the run has ended, greyed while the engine is not seen
ENGINE_ACTIONS = {"preview_now", "save", "eval_now", "pause", "stop"}
NOTIFY_SLACK_S = 5.0  # events up to this much older than the dashboard's start still notify (clock skew)
COMMAND_WAIT_S = 30.0  # a command unanswered this long (retried with its id meanwhile) is reported as failed
REQUEST_TIMEOUT_S = 5.0  # one try
DISK_EVERY_S = 3.0  # the run folder (checkpoints, inference results) is read this often
# commands in flight until the workers apply them, not only until the engine's reply: the engine forwards a
# pause at once, the workers take it (their ack) at the next step boundary and pause once what falls due there
# is done (an evaluation, previews, a checkpoint) — a second p meanwhile sent another. In flight until the run's
# state shows it (paused; running again for a resume)
UNTIL_ACK = {"pause/resume"}
ACK_WAIT_S = 120.0  # no ack this long after the engine's ok (a slow step, a lost ack): the key works again
SHOWN_BY = {"pause": ("paused", "stopping", "finished", "failed"), "resume": ("running", "stopping", "finished", "failed")}


def inference_processes(run_dir: Path, checkpoints: list[dict], final) -> frozenset:
    """The checkpoints that ``voxtui infer`` processes of this run on this machine work on now, whoever
    started them (this dashboard, another one, the engine, a shell): "checkpoint-N"; "all" for
    --all-checkpoints; without --checkpoint, lora_final (else the latest checkpoint, as infer picks)."""
    import psutil

    want = run_dir.resolve()
    default = "lora_final" if final else checkpoints[-1]["name"] if checkpoints else ""
    out = set()
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info.get("cmdline") or []
        if "infer" not in argv:
            continue
        head, args = argv[:argv.index("infer")], argv[argv.index("infer") + 1:]
        if not head or (head[-1] != "engine" and Path(head[-1]).name != "voxtui"):  # python -m engine, voxtui
            continue
        opts, which = {}, default
        for i, arg in enumerate(args):
            key, eq, value = arg.partition("=")
            if key in ("--run", "--checkpoint"):
                opts[key] = value if eq else args[i + 1] if i + 1 < len(args) else ""
            elif arg == "--all-checkpoints":
                which = "all"
        if "--run" not in opts:
            continue
        try:
            cwd = Path(proc.cwd())
        except psutil.Error:
            continue
        named = cwd / opts["--run"]  # a run folder, or a name under runs/
        if not named.is_dir():
            named = cwd / "runs" / opts["--run"]
        try:
            if named.resolve() != want:
                continue
        except OSError:
            continue
        if which != "all" and "--checkpoint" in opts:
            which = "checkpoint-" + opts["--checkpoint"].removeprefix("checkpoint-")
        if which:
            out.add(which)
    return frozenset(out)


class RunScreen(Screen):
    # nothing takes focus by itself: Textual gives it to the first focusable widget when the screen comes back
    # with none (a dialog closed), which was the GPUs tab's table — and the tabs then switched to GPUs
    AUTO_FOCUS = ""
    BINDINGS = [
        *[Binding(key, f"tab('{t}')", title, show=False) for t, key, title in TABS],
        Binding("w", "window", "Window", show=False),
        Binding("l", "log_scale", "Log scale", show=False),
        Binding("f", "follow", "Follow", show=False),
        Binding("slash", "search", "Search", show=False),
        Binding("right_square_bracket", "next_log", "Next log", show=False),
        Binding("o", "export_svg", "SVG", show=False),
        Binding("i", "infer_selected", "Infer selected", show=False),
        Binding("a", "infer_all", "Infer all", show=False),
        Binding("escape", "leave_input", "Leave field", show=False),
        Binding("n", "preview_now", "Preview"),
        Binding("s", "save", "Save"),
        Binding("e", "eval_now", "Eval"),
        Binding("p", "pause", "Pause/Resume"),
        Binding("x", "stop", "Stop"),
        Binding("question_mark", "help", "Keys"),
        Binding("b", "back", "Runs"),
        Binding("q", "app.quit", "Quit"),
    ]

    def __init__(self, run_dir: str) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self._dirty = False
        self._pane_at = 0.0  # when the tab showing was last redrawn
        self._redraw_at = 0.0  # when the last redraw ran
        self._wake_at: float | None = None  # when the pending redraw timer fires (None: none pending)
        self._wake_timer = None
        self._scan_soon = False
        self._last_scan = 0.0
        self._lost_reason = ""  # the stream's last "engine lost" reason, until an engine is seen again
        self._lost_at = 0.0  # when it was lost (monotonic): the banner says for how long
        self._lost_refused = False  # that reason is the engine's own: it answers, but cannot serve the events
        self._folder_gone = False  # the run folder no longer exists (deleted or moved while attached)
        self._engine_keys: tuple[bool, bool] | None = None  # (ended, engine lost) as the footer last showed
        self.in_flight: dict[str, str] = {}  # key → command type: sent, no reply yet (UNTIL_ACK: not applied yet)
        self._awaiting: dict[str, tuple[str, float]] = {}  # command id → (its key, when the engine said ok)
        # a pause or resume the workers acknowledged, until the run's state shows it: id → (key, type, ack's step)
        self._taken: dict[str, tuple[str, str, int]] = {}
        self.offline: dict[str, subprocess.Popen] = {}  # checkpoint name ("all": every one) → inference job started here
        # checkpoint name → when the engine said it started inference on it (until a disk scan begun later sees
        # the job's process, or its end)
        self.requested: dict[str, float] = {}
        self._inferring_disk: frozenset = frozenset()  # what the last disk scan saw inference processes work on
        self._samples: dict = {}  # (job, metrics time) → sample rows read from disk
        self._config_stat: tuple | None = None  # config.toml as last read: (inode, size, mtime), None: not there
        self._config_read = False
        self._plots_dirty = True  # news the plots of the tab showing have not drawn yet
        self._plots_at = 0.0
        self._since = time.time()  # only events from now on notify (not the history of what happened before)
        self._notified: set = set()

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="banner", markup=False)
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
                yield PreflightReport(id="preflight-report")
            with TabPane("Events", id="events"):
                yield EventsLog()
            with TabPane("Charts", id="charts"):
                yield Charts()
            with TabPane("Evals", id="evals"):
                yield Evaluations()
            with TabPane("Config", id="config"):
                yield ConfigView()
            with TabPane("Logs", id="logs"):
                yield Logs()
        yield Footer()

    def on_mount(self) -> None:
        self.title = "voxtui — " + plain(self.run_dir.name, limit=60)
        self.query_one("#banner", Static).display = False
        # the tab strip takes no focus: digits switch tabs (and a click still does), so Tab goes from nothing
        # into the tab's own widgets (the Previews' first field) instead of the strip, where digits typed
        # next would switch tabs rather than go into the field
        self.query_one(TabbedContent).query_one(Tabs).can_focus = False
        self.show_preflight()
        self.query_one(Logs).run_dir = self.run_dir
        self.follow()
        self.scan_disk()
        self.read_config()
        # no timer runs while nothing happens: news asks for a redraw (wake), the 1 s tick looks at the folder,
        # the log is polled only while the Logs tab shows
        self.set_interval(1.0, self.tick)
        self._log_timer = self.set_interval(LOG_EVERY_S, self.poll_log, pause=True)

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
            if ev.type == "ack" and ev.id in self._awaiting:  # the workers applied it: the key works again
                key = self._awaiting.pop(ev.id)[0]
                if ev.command in SHOWN_BY:  # but a pause's only once they are paused (a resume's: running)
                    self._taken[ev.id] = (key, ev.command, ev.step)
                else:
                    self.in_flight.pop(key, None)
                self.sync_buttons()
            if ev.type in ("checkpoint", "inference"):
                self._scan_soon = True
            if ev.time >= self._since - NOTIFY_SLACK_S:
                self.maybe_notify(ev)
        if (self._awaiting or self._taken) and (state.state in FINAL or state.crashed):  # no worker is left
            self.release_awaiting()
        self.settle_taken()
        if state.state in FINAL and state.engine_live is False and self._lost_reason:
            # the run ended with no engine (its orphaned workers stopped and were stored): nothing is lost now
            self._lost_reason = ""
            self.show_banner()
        self.mark_dirty()

    def mark_dirty(self) -> None:
        """There is news to show: redraw now if the screen has been quiet, else soon (a burst coalesces)."""
        self._dirty = True
        self.wake()

    def wake(self, delay: float = 0.0) -> None:
        """Run render_if_dirty in ``delay`` seconds (not sooner than REDRAW_GAP_S after the last redraw);
        an earlier pending wake-up stands. Nothing ticks while nothing is new."""
        now = time.monotonic()
        at = max(now + delay, self._redraw_at + REDRAW_GAP_S)
        if self._wake_at is not None and self._wake_at <= at + 0.001:
            return
        if self._wake_timer is not None:
            self._wake_timer.stop()
            self._wake_timer = None
        if not self.is_attached:  # closing (or not mounted yet): nothing to draw on
            return
        if at <= now:
            self._wake_at = None
            self.render_if_dirty()
            return
        self._wake_at = at
        self._wake_timer = self.set_timer(max(at - now, 0.001), self._woken)

    def _woken(self) -> None:
        self._wake_at, self._wake_timer = None, None
        self.render_if_dirty()

    def render_if_dirty(self) -> None:
        now = time.monotonic()
        self._redraw_at = now
        if self._scan_soon:
            if now - self._last_scan > 0.5:
                self._scan_soon = False
                self.scan_disk()
            else:
                self.wake(0.5 - (now - self._last_scan))
        active = self.query_one(TabbedContent).active
        s = self.app.state
        if self._dirty:
            self._plots_dirty = True
            wait = PANE_EVERY_S.get(active, 0.0) - (now - self._pane_at)
            if wait > 0:  # this tab is redrawn at a slower pace: later, with whatever came meanwhile
                self.wake(wait)
            else:
                self._dirty = False
                self._pane_at = now
                if active == "checkpoints":
                    self.query_one(Checkpoints).show(s, {**dict.fromkeys(self._inferring_disk), **self.running_offline()})
                else:
                    panes = {"overview": Overview, "gpus": Hardware, "previews": Previews, "events": EventsLog,
                             "evals": Evaluations, "config": ConfigView}
                    if active in panes:
                        self.query_one(panes[active]).show(s)
            # the state only: a sub-title repaints the whole screen, so it changes only when the state does
            # (the step is in the Overview's head)
            sub_title = plain(s.shown_state, limit=60)
            if sub_title != self.sub_title:
                self.sub_title = sub_title
            self.show_banner()
        if self._plots_dirty and s.events:
            panes = {"overview": Overview, "charts": Charts, "evals": Evaluations}
            wait = PLOTS_EVERY_S - (now - self._plots_at)  # (the first, the history: at once)
            if active not in panes:  # another tab's plots are drawn when it is opened
                pass
            elif wait > 0:
                self.wake(wait)
            else:
                self._plots_dirty = False
                self._plots_at = now
                self.query_one(panes[active]).show_plots(s)

    def poll_log(self) -> None:
        """Every LOG_EVERY_S while the Logs tab shows: what the followed log has gained."""
        if self.query_one(TabbedContent).active == "logs":
            self.read_log()

    def tick(self) -> None:
        """Once a second: the folder now and then, jobs started here, the banner's ages."""
        if time.monotonic() - self._last_scan >= DISK_EVERY_S:
            self.scan_disk()
            self.read_config()
        ended: dict[int, tuple[int, list[str]]] = {}  # pid → exit code, the checkpoints it ran (one job each)
        for name, proc in list(self.offline.items()):
            code = proc.poll()
            if code is not None:
                del self.offline[name]
                ended.setdefault(proc.pid, (code, []))[1].append(name)
        for code, names in ended.values():
            log = self.run_dir / "infer.log"
            if code == 0:
                self.say(f"inference on {', '.join(names)} finished")
            else:
                self.say(f"inference on {', '.join(names)} failed (exit code {code}); see {log}", "error", timeout=15)
        if ended:
            self.sync_buttons()
            self._scan_soon = True
            self.mark_dirty()
        if self.app.state.crashed or self._lost_reason:  # the banner's ages go on
            self.show_banner()
        late = {cid: key for cid, (key, ok_at) in self._awaiting.items() if time.monotonic() - ok_at > ACK_WAIT_S}
        if late:
            names = [self.in_flight.get(key, key) for key in late.values()]
            for cid, key in late.items():
                del self._awaiting[cid]
                self.in_flight.pop(key, None)
            self.sync_buttons()
            self.say(f"{', '.join(names)}: the workers have not acknowledged it in {ACK_WAIT_S:.0f} s; the key "
                     "sends again", "warning")

    def release_awaiting(self) -> None:
        """Commands waiting for the workers (their ack, or the state a pause or resume leads to) are no longer
        in flight (the run ended, or no engine is left)."""
        for key, *_ in [*self._awaiting.values(), *self._taken.values()]:
            self.in_flight.pop(key, None)
        self._awaiting.clear()
        self._taken.clear()
        self.sync_buttons()

    def settle_taken(self) -> None:
        """A pause or resume the workers acknowledged is in flight until the run's state shows it: they
        pause (or run again) only once what falls due at that step boundary is done."""
        state = self.app.state.state
        done = [cid for cid, (_, kind, _) in self._taken.items() if state in SHOWN_BY.get(kind, (state,))]
        for cid in done:
            self.in_flight.pop(self._taken.pop(cid)[0], None)
        if done:
            self.sync_buttons()

    @on(TabbedContent.TabActivated)
    def tab_changed(self) -> None:
        self._dirty = True
        self._pane_at = self._plots_at = 0.0  # the tab opened shows its widgets and its plots at once
        logs = self.query_one(TabbedContent).active == "logs"
        if logs:
            self._log_timer.resume()
            self.poll_log()  # and its log
        else:
            self._log_timer.pause()
        self.refresh_bindings()
        self.render_if_dirty()

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        """The Charts and Logs keys act only in their tab (elsewhere the key does nothing); the engine's
        commands only while there is an engine to take them (the footer hides them on an ended run and
        greys them while the engine is lost)."""
        tab = TAB_ACTIONS.get(action)
        if tab is not None:
            return self.query_one(TabbedContent).active in ((tab,) if isinstance(tab, str) else tab)
        if action == "back":  # only when the run was opened from the picker
            return self.from_picker()
        if action in ENGINE_ACTIONS:
            ended, lost = self.engine_keys_state()
            return False if ended else None if lost else True
        return True

    def on_key(self, event) -> None:
        """An engine key pressed while there is no engine to take it (greyed in the footer): said, not
        dropped in silence, with why (the banner's reason; an unreadable engine.json)."""
        action = next((b.action for b in self.BINDINGS if isinstance(b, Binding) and b.key == event.key
                       and b.action in ENGINE_ACTIONS), None)
        if action is None or isinstance(self.focused, Input):
            return
        ended, lost = self.engine_keys_state()
        if lost and not ended:
            from engine.client import engine_json_problem, not_live

            why = not_live(self.run_dir) if engine_json_problem(self.run_dir) else \
                self._lost_reason or not_live(None)
            self.say(f"{action.replace('_', ' ')}: not sent — {why}", "warning")

    def engine_keys_state(self) -> tuple[bool, bool]:
        s = self.app.state
        return s.state in FINAL or s.crashed, s.engine_live is False or bool(self._lost_reason)

    # ---- the engine's presence
    def on_engine_lost(self, message: EngineLost) -> None:
        if not self._lost_reason:
            self._lost_at = time.monotonic()  # the banner counts from here while nothing is heard
        self._lost_reason = message.reason or "no heartbeat"
        self._lost_refused = message.refused
        self.mark_dirty()
        self.show_banner()

    def on_engine_status_read(self, message: EngineStatusRead) -> None:
        """The engine's status, where it cannot serve the run's events: the state and step shown are its."""
        self.app.state.apply_engine_status(message.state, message.step, message.loss, message.total_steps,
                                           message.outcome, message.last)
        self.mark_dirty()
        self.show_banner()

    def on_engine_seen(self, message: EngineSeen) -> None:
        s = self.app.state
        was = s.engine_live
        s.engine_live, s.engine_pid, s.orphans = message.live, message.pid, message.workers
        if was and not message.live and s.state in NOT_ENDED and s.engine_pid is not None:
            self.notify_terminal("crashed", "the engine is gone", ("crashed", s.engine_pid))
        if message.live:
            if self._lost_reason or was is False:
                self.say("engine reconnected" if self._lost_reason else "the engine is running again")
            self._lost_reason = ""
        elif s.state in FINAL:
            self._lost_reason = ""  # the engine is done with a finished run: nothing is lost
        if (self._awaiting or self._taken) and s.crashed:  # no engine to take the ack
            self.release_awaiting()
        self.mark_dirty()
        self.show_banner()

    def banner_text(self):
        """The red line under the header: the run folder is gone, the engine is gone (crashed run) or silent
        (reconnecting)."""
        s = self.app.state
        if self._folder_gone:
            return assemble("RUN FOLDER GONE — ", data(self.run_dir, limit=80), " no longer exists (deleted or moved): "
                            "what is shown is what was read; attach to the folder where it is now")
        if s.crashed:
            # the command whole (a cut path is no command), the path as typed here: the banner has 3 lines
            run = data(shell_quote(short_path(self.run_dir)), limit=200)
            last = ""
            if s.events:
                from engine.client import age_text

                last = f"; last event {age_text(max(s.age(), 0))} ago (step {s.step})"
            if s.orphans:
                doing = "are paused" if s.state == "paused" else "are still training"
                return assemble(f"ENGINE LOST — the engine (pid {s.engine_pid}) is gone; its workers (pid "
                                f"{', '.join(map(str, s.orphans))}) {doing}, unseen by any engine (they save and "
                                "stop within ~30 s) — `voxtui engine stop ", run,
                                "` stops them now; `voxtui run --resume` then continues")
            return assemble(f"ENGINE LOST — the engine is not running (pid {s.engine_pid} gone){last} — `voxtui run --resume ",
                            run, "` continues from the latest checkpoint")
        if s.shown_state == "failed" and not self._lost_reason:
            return assemble("RUN FAILED — ", data(s.status_message or "see worker.log", limit=160), " — ",
                            *self.after_failure(), " (the Logs tab: worker.log)")
        if self._lost_reason and self._lost_refused:  # it answers: the run's event log is what is lost
            shown = ("the state, step and loss shown are the engine's status; the rest is what was read"
                     if s.from_engine_status else "what is shown is what was read")
            return assemble("EVENT LOG UNREADABLE — the engine answers, but cannot serve the run's events: ",
                            data(self._lost_reason, limit=120), f" ({shown}); retrying…")
        if self._lost_reason:  # silent (hung, stopped, or gone and not yet known to be): until it is seen again
            from engine.client import age_text

            silent = time.monotonic() - self._lost_at
            return assemble("ENGINE LOST — ", data(self._lost_reason, limit=240),
                            f"; nothing heard for {age_text(max(silent, 0))}; reconnecting…")
        return None

    def after_failure(self) -> tuple:
        """What to do about a failed run: resume from its latest complete checkpoint, or, with none saved,
        resume to start it over from step 0 (what a resume of such a run does); pieces for ``assemble``."""
        done = [c for c in self.app.state.disk_checkpoints or [] if isinstance(c.get("step"), int)]
        if done:
            latest = max(done, key=lambda c: c["step"])
            return ("`voxtui run --resume ", data(shell_quote(short_path(self.run_dir)), limit=200),
                    "` continues from ", data(str(latest.get("name", "")), limit=40))
        if self.app.state.disk_checkpoints is None:  # the folder not read yet
            return ("its checkpoints are being read",)
        return ("no checkpoint was saved before it failed: `voxtui run --resume ",
                data(shell_quote(short_path(self.run_dir)), limit=200), "` starts it over from step 0")

    def show_banner(self) -> None:
        banner = self.query_one("#banner", Static)
        text = self.banner_text()
        if text is not None:
            show_text(banner, text)
        banner.display = text is not None
        keys = self.engine_keys_state()
        if keys != self._engine_keys:  # the footer's engine keys follow the run's state
            self._engine_keys = keys
            self.refresh_bindings()
            self.sync_buttons()

    # ---- the run folder (a thread: a slow disk never stalls the screen)
    @work(thread=True, exclusive=True, group="disk")
    def scan_disk(self) -> None:
        from engine.client import checkpoint_states, final_adapter, inference_results, inference_samples

        self._last_scan = started = time.monotonic()
        if not self.run_dir.is_dir():
            self.post_message(DiskScanned(None, None, None, gone=True))
            return
        try:
            ckpts = checkpoint_states(self.run_dir / "checkpoints")
            final = final_adapter(self.run_dir)
            jobs = inference_results(self.run_dir)
            for name, d in jobs.items():
                if d["state"] == "finished":
                    key = (name, repr(d.get("time")))
                    if key not in self._samples:
                        self._samples[key] = inference_samples(Path(d["path"]))
                    d["samples"] = self._samples[key]
        except Exception as e:  # an odd run folder must never end the dashboard: say so, keep the last view
            self.post_message(DiskScanned(None, None, None, error=f"{type(e).__name__}: {e}"))
            return
        try:
            inferring = inference_processes(self.run_dir, ckpts, final)
        except Exception:  # processes that cannot be read: none seen (the jobs started here are known anyway)
            inferring = frozenset()
        self.post_message(DiskScanned(ckpts, str(final) if final else None, jobs, inferring=inferring,
                                      started=started))

    def on_disk_scanned(self, message: DiskScanned) -> None:
        s = self.app.state
        if message.gone != self._folder_gone:
            self._folder_gone = s.folder_gone = message.gone
            self.mark_dirty()  # a run of which nothing was read is no longer shown as NEW
            if message.gone:
                self.say("the run folder is gone (deleted or moved); what is shown is what was read", "error",
                         timeout=15)
            self.show_banner()
        if message.gone:
            return
        if message.error:
            self.query_one(Checkpoints).note(f"could not read {self.run_dir}: {message.error}", "unreadable")
            return
        self.query_one(Checkpoints).clear_note("unreadable")
        s.disk_checkpoints, s.disk_final, s.disk_inference = message.checkpoints, message.final, message.inference
        if s.shown_state == "failed":  # its banner names the checkpoint a resume continues from
            self.show_banner()
        # a job the engine started before this scan began is among its processes (or has ended)
        requested = {name: at for name, at in self.requested.items() if at >= message.started}
        if message.inferring != self._inferring_disk or requested != self.requested:
            self.requested, self._inferring_disk = requested, message.inferring
            self.sync_buttons()
        if self.query_one(TabbedContent).active in ("checkpoints", "evals"):
            self.mark_dirty()

    @work(thread=True, exclusive=True, group="config")
    def read_config(self) -> None:
        """config.toml (the resolved config the run was started with), for the Config tab: read again when
        the file changes (overwritten, replaced, deleted), else left alone."""
        from engine.client import run_config

        path = self.run_dir / "config.toml"
        try:
            st = path.stat()
            seen = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            seen = None
        if self._config_read and seen == self._config_stat:
            return
        self._config_read, self._config_stat = True, seen
        try:
            config = run_config(self.run_dir)
        except Exception as e:  # never the end of the dashboard
            self.post_message(ConfigRead({}, f"{path}: {type(e).__name__}: {e}"))
            return
        error = "" if config else (f"{path.name} is not readable TOML" if path.is_file() else "")
        self.post_message(ConfigRead(config, error))

    def on_config_read(self, message: ConfigRead) -> None:
        """The Config tab keeps the last good copy when the file turns unreadable or goes (and says so)."""
        view = self.query_one(ConfigView)
        if message.config:
            view.file_config, view.file_error = message.config, ""
        else:
            view.file_error = message.error or ("config.toml is no longer in the run folder" if view.file_config else "")
        if self.query_one(TabbedContent).active == "config":
            self.mark_dirty()

    @work(thread=True, exclusive=True, group="log")
    def read_log(self) -> None:
        logs = self.query_one(Logs)
        if not logs.follow and logs.file_offset:
            return  # not following: what is shown stays as it is
        file, path, start, pending = logs.file, logs.path, logs.file_offset, logs.pending
        new, offset, pending = read_new(path, start, pending)
        where = "" if path.is_file() else "folder" if not path.parent.is_dir() else "file"
        if new or offset != start or where != logs.missing:
            self.post_message(LogRead(file, new, offset, pending, start, where))

    def on_log_read(self, message: LogRead) -> None:
        self.query_one(Logs).added(message.file, message.lines, message.offset, message.pending, message.start,
                                   message.where)

    def running_offline(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.offline.items() if p.poll() is None}

    def show_preflight(self) -> None:
        self.query_one(PreflightReport).show(self.run_dir / "preflight.json")

    def say(self, text: str, severity: str = "information", timeout: float | None = None) -> None:
        """A notice: its text holds run data (names, paths, the engine's reasons), so never markup."""
        self.notify(plain(text, limit=800), severity=severity, markup=False,  # a toast wraps: commands said whole
                    **({"timeout": timeout} if timeout is not None else {}))

    # ---- commands (sent from a thread, retried with the same id; the reply comes back as a message)
    def command(self, command, key: str = "") -> bool:
        """Send ``command`` unless the same one (``key``) is still waiting for its reply."""
        key = key or command.type
        if key in self.in_flight:
            taken = next(((kind, step) for k, kind, step in self._taken.values() if k == key), None)
            if taken is not None:
                kind, step = taken
                self.say(f"{kind}: the workers took it at step {step}; waiting for them to "
                         f"{'pause' if kind == 'pause' else 'run again'} (once what falls due at that step boundary "
                         "is done: an evaluation, previews, a checkpoint)", "warning")
                return False
            applying = any(k == key for k, _ in self._awaiting.values())
            waiting = "the workers to apply it (at the next step)" if applying else "the engine's reply"
            self.say(f"{self.in_flight[key]}: already sent; waiting for {waiting}", "warning")
            return False
        command.id = command.id or secrets.token_hex(8)
        self.in_flight[key] = command.type
        self.sync_buttons()
        self.send(command, key)
        return True

    @work(thread=True, group="commands")
    def send(self, command, key: str) -> None:
        from engine.client import EngineClient, EngineLost

        deadline, tries = time.monotonic() + COMMAND_WAIT_S, 0
        while True:
            tries += 1
            try:
                with EngineClient(self.run_dir, request_timeout=REQUEST_TIMEOUT_S) as client:
                    reply = client.send(command)  # the same id on every try: the engine applies it once
                status, reason = reply.status, reply.reason
                break
            except EngineLost:
                if time.monotonic() >= deadline:
                    status, reason = "error", (f"no reply from the engine in {COMMAND_WAIT_S:.0f} s ({tries} tries, "
                                               f"id {command.id}); it may still apply it")
                    break
                time.sleep(0.2)
            except Exception as e:  # engine gone mid-send, an unreadable engine.json, …
                status, reason = "error", f"{type(e).__name__}: {e}"
                break
        self.post_message(CommandReplied(command.type, status, reason, key, command.id))

    def on_command_replied(self, message: CommandReplied) -> None:
        s = self.app.state
        if message.key in UNTIL_ACK and message.status == "ok" and message.id and s.state not in FINAL \
                and not s.crashed:
            ack = next((ev for ev in s.events if ev.type == "ack" and ev.id == message.id), None)
            if ack is None:
                self._awaiting[message.id] = (message.key, time.monotonic())  # in flight until the workers' ack
            else:  # acknowledged already: until the state shows it
                self._taken[message.id] = (message.key, message.command, ack.step)
                self.settle_taken()
        else:
            self.in_flight.pop(message.key, None)
        if message.key.startswith("infer:") and message.status == "ok":  # the engine started the job
            self.requested[message.key.removeprefix("infer:")] = time.monotonic()
            self._scan_soon = True
        self.sync_buttons()
        text = f"{message.command}: {message.status}" + (f" — {message.reason}" if message.reason else "")
        self.say(text, "information" if message.status == "ok" else "error")
        if message.command == "set_preview_params":
            self.query_one(Previews).show_reply(message.status, message.reason or "applied at the next step")

    def sync_buttons(self) -> None:
        busy = set(self.in_flight) | {f"infer:{name}" for name in self.inferring()}
        self.query_one(Checkpoints).sync_buttons(busy)
        ended = self.engine_keys_state()[0]  # no worker is left to preview
        s = self.app.state
        self.query_one(Previews).ended("" if not ended else "the engine is gone: no previews until the run is resumed"
                                       if s.crashed else f"the run has {s.shown_state}: these are its last previews")
        self.query_one("#pv-apply").disabled = ended or "set_preview_params" in busy
        self.query_one("#pv-now").disabled = ended or "preview_now" in busy

    @on(Previews.ParamsRequested)
    def params(self, m: Previews.ParamsRequested) -> None:
        self.command(SetPreviewParams(**m.changed))

    @on(Previews.PreviewRequested)
    def action_preview_now(self) -> None:
        self.command(PreviewNow())

    def inferring(self) -> set[str]:
        """The checkpoints whose inference runs now ("all": every checkpoint-N): asked of the engine and not
        answered yet, started by the engine at this dashboard's request, started here without an engine, or
        any process of the run's on this machine (another dashboard's, the engine's, a shell's)."""
        return ({key.removeprefix("infer:") for key in self.in_flight if key.startswith("infer:")}
                | set(self.requested) | set(self.running_offline()) | set(self._inferring_disk))

    @on(Checkpoints.InferenceRequested)
    def infer(self, m: Checkpoints.InferenceRequested) -> None:
        """Inference on the checkpoints asked for but those already being inferred (two jobs on one checkpoint
        would write the same infer/ folder): Infer all skips them, Infer selected is refused."""
        s = self.app.state
        engine = s.engine_live and s.state not in FINAL
        busy = {f"infer:{name}" for name in self.inferring()}
        wanted = m.every or [(m.step, m.name)]
        if m.every and not engine:  # as --all-checkpoints: every checkpoint-N (lora_final is no part of it)
            wanted = [(step, name) for step, name in wanted if step is not None]
        todo = [(step, name) for step, name in wanted if not inference_running(name, busy)]
        skipped = [name for _, name in wanted if inference_running(name, busy)]
        ck = self.query_one(Checkpoints)
        if not todo:
            text = (f"inference on {m.name} is running already; not started again" if not m.every
                    else "inference is running on every checkpoint already; nothing started")
            ck.note(text, f"running:{'all' if m.every else m.name}")  # goes when that inference ends
            self.say(text, "warning")
            return
        if skipped:
            self.say(f"inference is running on {', '.join(skipped)} already: skipped", "warning")
        if engine:
            for step, name in todo:
                self.command(RunInference(checkpoint=step), key=f"infer:{name}")
        elif m.every and not skipped:  # every checkpoint: one job after the other (--all-checkpoints)
            self.infer_without_engine([(None, "all")])
        else:  # those not running: one after the other too
            self.infer_without_engine(todo)

    def infer_args(self, step: int | None, data_file: str, run: str, every: bool = False) -> list[str]:
        which = ["--all-checkpoints"] if every else ["--checkpoint", str(step)] if step is not None else []
        return ["--run", run, *which, "--data", data_file]

    def infer_without_engine(self, jobs: list[tuple[int | None, str]]) -> None:
        """No engine serves the run (it finished, or crashed): ``voxtui infer`` as a process of its own
        (it outlives the dashboard), on each of ``jobs`` (step, checkpoint name; ``(None, "all")``: every
        checkpoint, --all-checkpoints) one after the other; its results are read from infer/*/metrics.json."""
        ck = self.query_one(Checkpoints)
        data_file = str(self.app.state.config.get("val_jsonl") or "")
        every = jobs == [(None, "all")]
        how = "; ".join(shell_join(["voxtui", "infer", *self.infer_args(step, data_file or "VAL_FILE",
                                                                          short_path(self.run_dir), every)])
                          for step, _ in jobs)
        if not data_file or not Path(data_file).is_file():
            why = "this run has no val_jsonl" if not data_file else f"{data_file} is not a file here"
            text = f"the engine is not running and {why}; run inference with: {how}"
            ck.note(text)
            self.say(text, "warning", timeout=20)
            return
        argvs = [[sys.executable, "-m", "engine", "infer",
                  *self.infer_args(step, data_file, str(self.run_dir.resolve()), every)] for step, _ in jobs]
        # several: one after the other, by a shell of their own (so they outlive the dashboard too)
        argv = argvs[0] if len(argvs) == 1 else ["/bin/sh", "-c", "; ".join(shlex.join(a) for a in argvs)]
        try:
            log = open(self.run_dir / "infer.log", "ab")
        except OSError as e:
            text = f"cannot write {self.run_dir / 'infer.log'} ({e.strerror}); run inference with: {how}"
            ck.note(text)
            self.say(text, "error", timeout=20)
            return
        with log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=os.getcwd())
        for _, name in jobs:
            self.offline[name] = proc
        what = "every checkpoint" if every else ", ".join(name for _, name in jobs)
        text = f"inference on {what} started without the engine (pid {proc.pid}; log {self.run_dir / 'infer.log'})"
        ck.note(text)
        self.say(text)
        self.sync_buttons()
        self.mark_dirty()

    # ---- notifications: a bell and a desktop-notification escape when the run ends or raises an error
    def maybe_notify(self, ev) -> None:
        if ev.type == "status" and ev.state in FINAL:
            outcome = getattr(ev, "outcome", "") if ev.state == "finished" else ""
            if outcome == "engine_lost":  # the workers stopped without their engine: said once, as a crash
                self.notify_terminal("crashed", "the engine is gone; the workers saved and stopped",
                                     ("crashed", self.app.state.engine_pid))
                return
            self.notify_terminal(ev.state, outcome or ev.message or ev.state, ("status", ev.seq))
        elif ev.type == "alert" and ev.level == "error":
            self.notify_terminal(f"error: {ev.kind}", ev.message, ("alert", ev.seq))

    def notify_terminal(self, what: str, detail: str, key) -> None:
        if key in self._notified:
            return
        self._notified.add(key)
        name = self.run_dir.name  # the folder this dashboard reads (its events may carry an older name)
        self.app.notify_terminal(f"voxtui: {plain(name, limit=40)} {plain(what, limit=40)}", plain(detail, limit=200))

    # ---- tabs and their keys
    def action_window(self) -> None:
        self.query_one(Charts).cycle_window()
        self._plots_dirty, self._plots_at = True, 0.0
        self.wake()

    def action_log_scale(self) -> None:
        self.query_one(Charts).toggle_log()
        self._plots_dirty, self._plots_at = True, 0.0
        self.wake()

    def action_follow(self) -> None:
        self.query_one(Logs).toggle_follow()
        self.poll_log()

    def action_search(self) -> None:
        """``/``: into the Logs tab's search, or the Events tab's filter (then the letters typed filter,
        never command the run)."""
        events = self.query_one(TabbedContent).active == "events"
        self.query_one("#ev-filter" if events else "#log-search", Input).focus()

    def action_next_log(self) -> None:
        self.query_one(Logs).next_file()
        self.poll_log()

    def action_export_svg(self) -> None:
        """The screen as it is now, as SVG: into the run folder (else the current folder)."""
        tab = self.query_one(TabbedContent).active or "screen"
        name = f"voxtui-{plain(self.run_dir.name, limit=40)}-{tab}-{time.strftime('%Y%m%d-%H%M%S')}.svg"
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        errors = []
        for folder in (self.run_dir, Path.cwd()):
            try:
                path = self.app.save_screenshot(filename=name, path=str(folder))
            except OSError as e:
                errors.append(f"{folder}: {e.strerror or e}")
                continue
            self.say(f"saved the screen as {path}")
            return
        self.say("could not save the screen: " + "; ".join(errors), "error", timeout=15)

    def action_tab(self, tab: str) -> None:
        # a widget focused in the pane being left would pull its pane back (TabPane.Focused): let go first
        self.set_focus(None)
        self.query_one(TabbedContent).active = tab
        if tab == "checkpoints":  # the arrows choose a checkpoint at once (i / a infer it / all)
            self.call_after_refresh(self.query_one("#ck-table").focus)

    def action_infer_selected(self) -> None:
        self.query_one(Checkpoints).infer_selected()

    def action_infer_all(self) -> None:
        self.query_one(Checkpoints).infer_all()

    def action_leave_input(self) -> None:
        if isinstance(self.focused, Input):
            self.set_focus(None)

    def action_save(self) -> None:
        self.command(SaveCheckpoint())

    def action_eval_now(self) -> None:
        self.command(EvalNow())

    def action_pause(self) -> None:
        self.command(Resume() if self.app.state.state == "paused" else Pause(), key="pause/resume")

    def action_stop(self) -> None:
        def done(yes: bool | None) -> None:
            if yes:
                self.command(Stop())

        name = self.run_dir.name  # the folder this dashboard reads (its events may carry an older name)
        self.app.push_screen(Confirm(lines(assemble("Stop the run ", data(name, "bold", limit=40), "?"),
                                           "The workers save a checkpoint, then exit.")), done)

    def action_help(self) -> None:
        self.app.push_screen(Help())

    def from_picker(self) -> bool:
        from app.screens.picker import RunPicker

        stack = self.app.screen_stack
        return self in stack and stack.index(self) > 0 and isinstance(stack[stack.index(self) - 1], RunPicker)

    def action_back(self) -> None:
        """Back to the run list (the run goes on; its stream here stops)."""
        if self.from_picker():
            self.app.pop_screen()

    def on_unmount(self) -> None:
        self.workers.cancel_group(self, "engine")
