"""Everything the dashboard shows, folded from the run's events and what its folder holds now (no
Textual here: plain data)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.protocol import shown_state, with_pending

FINAL = ("finished", "failed")
UNFINISHED = ("starting", "running", "pausing", "paused", "stopping")
NOT_ENDED = (*UNFINISHED, "new")  # "new": no status read yet (none written, or events.jsonl unreadable)
OUTCOMES = {"completed": "completed", "stopped": "stopped on request", "early_stopped": "early stopping",
            "engine_lost": "engine lost (the workers saved and stopped)"}
EVENTS_KEPT = 5000  # the Events tab shows these (the newest ones)
RECENT_KEPT = 2000  # per-step and telemetry rows kept at full resolution (the newest); older ones are thinned
OLDER_KEPT = 2000  # at most this many older rows, evenly spread over the run's start (the "all" window)
RANK_TIMES_KEPT = 10  # the last steps' per-rank step times (the straggler rule takes their median)


class History:
    """A run's rows over time (steps, torch memory, telemetry), bounded however long the run: the newest
    ``recent`` at full resolution, the older ones thinned to every 2nd, 4th, 8th, … row (the stride doubles
    whenever more than ``older`` are held), so the whole run is still covered by at most
    ``recent + older + recent // 4`` rows. Reads like a list (len, iteration, indexing, slices)."""

    def __init__(self, recent: int = RECENT_KEPT, older: int = OLDER_KEPT) -> None:
        self.recent, self.older = recent, older
        self._new: list = []  # the newest rows, every one
        self._old: list = []  # older rows: those whose index (in the order appended) is a multiple of _stride
        self._stride = 1
        self._moved = 0  # rows that have left _new (kept in _old or dropped)
        self.appended = 0  # rows ever appended

    def append(self, row) -> None:
        self._new.append(row)
        self.appended += 1
        if len(self._new) > self.recent + max(1, self.recent // 4):  # move the oldest quarter out, thinned
            chunk = len(self._new) - self.recent
            for i, r in enumerate(self._new[:chunk], start=self._moved):
                if i % self._stride == 0:
                    self._old.append(r)
            del self._new[:chunk]
            self._moved += chunk
            while len(self._old) > self.older:  # indexes 0, s, 2s, …: every other one is 0, 2s, 4s, …
                self._old = self._old[::2]
                self._stride *= 2

    def rewind(self, step) -> None:
        """Drop the rows at ``step`` and after: the run went back there (a resume retrains from its checkpoint,
        or starts over from step 0), and the rows it trains again replace them."""
        while self._new and self._new[-1][0] >= step:
            self._new.pop()
        if not self._new:
            while self._old and self._old[-1][0] >= step:
                self._old.pop()

    def __len__(self) -> int:
        return len(self._old) + len(self._new)

    def __iter__(self):
        yield from self._old
        yield from self._new

    def __reversed__(self):
        yield from reversed(self._new)
        yield from reversed(self._old)

    def __bool__(self) -> bool:
        return bool(self._new or self._old)

    def __getitem__(self, key):
        if isinstance(key, slice) and key.step in (None, 1) and key.stop is None and isinstance(key.start, int) \
                and -len(self._new) <= key.start < 0:
            return self._new[key.start:]  # the newest rows (the common case: cheap)
        if isinstance(key, int) and -len(self._new) <= key < 0:
            return self._new[key]
        return list(self)[key]

    def __eq__(self, other) -> bool:
        return list(self) == list(other) if isinstance(other, (list, tuple, History)) else NotImplemented

    def __repr__(self) -> str:
        return f"History({len(self)} rows of {self.appended}, older every {self._stride})"


RECENT = 65536  # events whose seqs are kept to know them again (about 5 MB)


@dataclass
class RunState:
    run: str = ""  # the run's name, as its events say (the folder's name when it was created)
    folder: str = ""  # the name of the folder the dashboard reads (copied or renamed: not the events' name)
    last_seq: int = 0  # the seq of the last event applied (in the order read: the file's, the engine's)
    # the seqs of the last RECENT events applied: an event seen again (the history and the live stream
    # overlap) is applied once. Not "every seq up to the highest": one line with a high seq written into
    # events.jsonl by hand would then hide every real event after it
    recent: deque = field(default_factory=lambda: deque(maxlen=RECENT))
    recent_set: set = field(default_factory=set)
    # the last status event's state, message and outcome (Status.outcome of a finished run); ``state``,
    # ``status_message`` and ``outcome`` are these, but where the engine's status says more (engine_status)
    event_state: str = "new"
    event_message: str = ""
    event_outcome: str = ""
    # the engine's answer to a status request ({"state", "step", "loss", "total_steps", "outcome", "last"}), asked
    # when it refuses the run's history (events.jsonl unreadable, removed): until events up to its "last" seq are
    # read, the state, step, loss and total steps shown are its (not NEW and step 0)
    engine_status: dict | None = None
    info: dict = field(default_factory=dict)  # run_info
    config: dict = field(default_factory=dict)  # run_info.config
    params: dict = field(default_factory=dict)  # param_table
    preview_params: dict = field(default_factory=dict)  # temperature / top_p / max_new_tokens in force
    # (step, loss, lr, grad_norm, tokens_per_s, mfu, mfu_attn, time): the newest steps all, older ones thinned
    # (History)
    steps: History = field(default_factory=History)
    last_step: object = None
    evals: list = field(default_factory=list)  # (step, loss, ppl)
    best: tuple | None = None  # (best_step, best_loss) of the latest eval
    previews: dict = field(default_factory=dict)  # index → list of preview events (history)
    # the preview_start event of previews being generated now (training waits for them): from it until
    # their first preview event, or the next step or status
    previewing: object = None
    checkpoints: dict = field(default_factory=dict)  # step → checkpoint event
    alerts: deque = field(default_factory=lambda: deque(maxlen=200))
    telemetry: object = None  # the latest telemetry event (any rank)
    telemetry_by_rank: dict = field(default_factory=dict)  # (host, rank) → its latest telemetry event
    # the Charts tab's series besides ``steps``: torch memory by step (step, allocated, reserved, peak GiB), and
    # telemetry over time (time, step, ((rank, gpu index, util %, memory GiB, power W), …), cpu %, rss GiB,
    # host memory fraction); both bounded the same way as ``steps``
    memory: History = field(default_factory=History)
    telemetry_history: History = field(default_factory=History)
    rank_times: deque = field(default_factory=lambda: deque(maxlen=RANK_TIMES_KEPT))  # step_time_rank lists
    inference: dict = field(default_factory=dict)  # name → latest inference event
    events: deque = field(default_factory=lambda: deque(maxlen=EVENTS_KEPT))
    started: float | None = None
    running_since: float = 0.0  # when the run last (re)entered "running": the ETA's pace is measured since
    gaps: int = 0
    # the truth outside the events: is an engine process serving this run (None: not known yet)?
    engine_live: bool | None = None
    engine_pid: int | None = None
    orphans: tuple = ()  # pids of workers that outlive their gone engine (they save and stop by themselves)
    # the run folder now (read by the screen every few seconds): complete checkpoints, lora_final, inference
    disk_checkpoints: list | None = None  # [{"step", "name", "path", "best_step", "best_loss", "reason", …}]
    disk_final: str | None = None  # lora_final's path
    disk_inference: dict = field(default_factory=dict)  # name → metrics.json (+ state) or progress
    folder_gone: bool = False  # the run folder no longer exists (deleted or moved while attached)

    def apply(self, ev) -> None:
        if ev.seq in self.recent_set:
            return
        if len(self.recent) == RECENT:
            self.recent_set.discard(self.recent[0])
        self.recent.append(ev.seq)
        self.recent_set.add(ev.seq)
        if self.last_seq and ev.seq != self.last_seq + 1:
            self.gaps += 1
        self.last_seq = ev.seq
        self.run = ev.run or self.run
        self.events.append(ev)
        # a status ends them, but a pause's pending one ("pause requested" while the previews go on: the
        # workers take it once they are done, and the screen says so)
        if ev.type in ("preview", "step") or (ev.type == "status" and not getattr(ev, "pending", "")):
            self.previewing = None
        match ev.type:
            case "preview_start":
                self.previewing = ev
            case "status":
                # a pause requested, the workers not paused yet: shown pausing (Status.pending)
                self.event_state, self.event_message = with_pending(ev.state, getattr(ev, "pending", "")), ev.message
                self.event_outcome = getattr(ev, "outcome", "") if ev.state == "finished" else ""
                if ev.state == "running" and self.started is None:
                    self.started = ev.time
                if self.event_state == "running":  # (re)entered running: not a pause's pending status
                    self.running_since = ev.time
            case "run_info":
                self.info = {"model_id": ev.model_id, "world_size": ev.world_size, "device": ev.device,
                             "total_steps": ev.total_steps, "steps_per_epoch": ev.steps_per_epoch,
                             "train_rows": ev.train_rows, "val_rows": ev.val_rows}
                self.config = ev.config if isinstance(ev.config, dict) else {}
                in_force = ev.preview if isinstance(ev.preview, dict) and ev.preview else self.config
                for k in ("temperature", "top_p", "max_new_tokens"):
                    if k in in_force:
                        self.preview_params[k] = in_force[k]
            case "param_table":
                self.params = {"rows": ev.rows, "trainable": ev.trainable, "total": ev.total}
            case "step":
                last = next(reversed(self.steps), None)
                if last is not None and isinstance(ev.step, int) and ev.step <= last[0]:
                    # the run went back (resumed from an earlier checkpoint, or started over): the curves show
                    # its steps once, as trained last — not the first attempt beside the second (a zig-zag)
                    self.steps.rewind(ev.step)
                    self.memory.rewind(ev.step)
                    self.evals = [e for e in self.evals if e[0] < ev.step]
                self.last_step = ev
                self.steps.append((ev.step, ev.loss, ev.lr, ev.grad_norm, ev.tokens_per_s, ev.mfu, ev.mfu_attn,
                                   ev.time))
                if ev.mem_allocated or ev.mem_reserved or ev.mem_peak:
                    self.memory.append((ev.step, ev.mem_allocated, ev.mem_reserved, ev.mem_peak))
                if ev.step_time_rank:
                    self.rank_times.append(list(ev.step_time_rank))
            case "eval":
                self.evals.append((ev.step, ev.loss, ev.ppl))
                self.best = (ev.best_step, ev.best_loss)
            case "preview":
                self.previews.setdefault(ev.index, []).append(ev)
            case "checkpoint":
                self.checkpoints[ev.step] = ev
            case "alert":
                self.alerts.append(ev)
            case "telemetry":
                self.telemetry = ev
                self.telemetry_by_rank[(ev.host, ev.rank)] = ev
                self.telemetry_history.append((ev.time, self.step, tuple(
                    (ev.rank, g.index, g.util, g.mem_used, g.power) for g in ev.gpus), ev.cpu_percent, ev.rss,
                    ev.mem_used_frac))
            case "inference":
                self.inference[ev.name] = ev
            case "ack":
                params = getattr(ev, "params", None)
                if ev.command == "set_preview_params" and isinstance(params, dict):
                    self.preview_params.update({k: v for k, v in params.items()
                                                if k in ("temperature", "top_p", "max_new_tokens")})
        if self.engine_status is not None and self.last_seq >= self.engine_status["last"]:
            self.engine_status = None  # the events read say as much as the engine did

    def apply_engine_status(self, state: str, step: int | None, loss: float | None, total_steps: int | None,
                    outcome: str, last: int) -> None:
        """The engine's status reply (asked where it cannot serve the run's events): shown until the events
        read reach its ``last`` seq. Its values are checked here (a reply is data from another process)."""
        if not isinstance(last, int) or isinstance(last, bool) or (self.events and last <= self.last_seq):
            return  # the events read say as much already
        self.engine_status = {
            "state": state if isinstance(state, str) and state else "starting",
            "step": step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None,
            "loss": float(loss) if isinstance(loss, (int, float)) and not isinstance(loss, bool) else None,
            "total_steps": total_steps if isinstance(total_steps, int) and not isinstance(total_steps, bool)
            and total_steps > 0 else None,
            "outcome": outcome if isinstance(outcome, str) else "", "last": last}

    @property
    def from_engine_status(self) -> bool:
        """Whether the state and step shown are the engine's status reply's (the events read are behind it)."""
        v = self.engine_status
        return v is not None and (v["last"] > self.last_seq or not self.events)

    @property
    def state(self) -> str:
        """The run's state: the last status event's, or the engine's status where the events read are behind."""
        return self.engine_status["state"] if self.from_engine_status else self.event_state

    @state.setter
    def state(self, value: str) -> None:
        """Set as a status event would (the engine's status, if any, no longer shown)."""
        self.event_state, self.engine_status = value, None

    @property
    def status_message(self) -> str:
        if self.from_engine_status:
            return "state, step and loss from the engine's status, not the event log"
        return self.event_message

    @property
    def outcome(self) -> str:
        if self.from_engine_status:
            return self.engine_status["outcome"] if self.engine_status["state"] == "finished" else ""
        return self.event_outcome

    @property
    def crashed(self) -> bool:
        """The run did not finish, and the engine that served it is gone: killed (or its machine went
        away), also before any event of the run was read (an empty, missing or unreadable events.jsonl:
        ``voxtui engine list`` says crashed then too). A run that never had an engine (a worker run on its
        own, no engine.json) is not judged.
        A run whose workers stopped because their engine was gone (finished, outcome engine_lost) is
        crashed too, as ``voxtui engine list`` says: ``--resume`` continues it."""
        if self.state == "finished" and self.outcome == "engine_lost":
            return not self.engine_live
        return self.engine_live is False and self.engine_pid is not None and self.state in NOT_ENDED \
            and not self.trained_out

    @property
    def trained_out(self) -> bool:
        """No engine, no final status read (events.jsonl's last line torn or cut), yet every step of the plan
        trained and lora_final saved: the run finished, as ``voxtui engine list`` says (``--resume`` would
        refuse it: nothing to resume)."""
        return self.engine_live is False and self.state in NOT_ENDED and bool(self.disk_final) \
            and self.total_steps > 0 and self.step == self.total_steps

    @property
    def shown_state(self) -> str:
        """The state as it is, not as the last event left it: "crashed" when no engine serves an
        unfinished run; "stopped" for a run that finished because it was asked to stop (what ``voxtui
        engine list`` and the picker say)."""
        if self.crashed:
            return "crashed"
        if self.trained_out:
            return "finished"
        if self.state == "new" and self.folder_gone and not self.events:
            return "unknown"  # the folder went before any of it was read: nothing says it is a new run
        return shown_state(self.state, self.outcome)

    def outcome_text(self) -> str:
        """How a finished run ended, in words ("" when not finished or not said)."""
        if self.state != "finished":
            return ""
        return OUTCOMES.get(self.outcome, self.outcome)

    def gpus(self) -> list:
        """(host, GpuStat) of every GPU, from each rank's latest telemetry, by host and index."""
        seen = {}
        for (host, _), t in self.telemetry_by_rank.items():
            for g in t.gpus:
                seen[(str(host), g.index)] = g
        return [(host, seen[(host, i)]) for host, i in sorted(seen)]

    def rank_step_times(self) -> list[float]:
        """Each rank's median step time over the last steps (RANK_TIMES_KEPT), for ranks that reported one."""
        import statistics

        if not self.rank_times:
            return []
        ranks = max(len(r) for r in self.rank_times)
        out = []
        for i in range(ranks):
            times = [r[i] for r in self.rank_times if i < len(r) and isinstance(r[i], (int, float))]
            out.append(statistics.median(times) if times else 0.0)
        return out

    @property
    def step(self) -> int:
        if self.from_engine_status and self.engine_status["step"] is not None:
            return self.engine_status["step"]
        return self.last_step.step if self.last_step is not None else 0

    @property
    def loss(self) -> float | None:
        """The last step's loss (None: none yet, or not finite)."""
        if self.from_engine_status and self.engine_status["step"] is not None:
            return self.engine_status["loss"]
        return self.last_step.loss if self.last_step is not None else None

    @property
    def total_steps(self) -> int:
        if self.from_engine_status and self.engine_status["total_steps"] and not self.info.get("total_steps"):
            return self.engine_status["total_steps"]
        return int(self.info.get("total_steps", 0))

    def eta_s(self) -> float | None:
        """Seconds left at the pace of the last 20 steps taken since the run last resumed (a pause is no
        part of the pace); None while paused, ended, or with too few steps to tell."""
        if len(self.steps) < 2 or not self.total_steps or self.state in FINAL or self.crashed \
                or self.state == "paused":
            return None
        recent = [row for row in self.steps[-20:] if row[-1] >= self.running_since]
        if len(recent) < 2:
            return None
        (s0, *_, t0), (s1, *_, t1) = recent[0], recent[-1]
        if s1 <= s0:
            return None
        return (self.total_steps - s1) * (t1 - t0) / (s1 - s0)

    def epoch(self) -> float:
        return getattr(self.last_step, "epoch", 0.0) if self.last_step is not None else 0.0

    def age(self) -> float:
        return time.time() - self.events[-1].time if self.events else 0.0

    def best_step(self) -> int | None:
        """The run's current best step: the latest eval's, else the newest checkpoint's trainer_state."""
        if self.best and self.best[0]:
            return int(self.best[0])
        for c in reversed(self.disk_checkpoints or []):
            if isinstance(c.get("best_step"), int) and c["best_step"] > 0:
                return c["best_step"]
        return None

    def val_loss_at(self, step: int) -> float | None:
        """The validation loss measured at ``step`` (eval events, a checkpoint event, else its trainer_state)."""
        for st, loss, _ in reversed(self.evals):
            if st == step:
                return loss
        ev = self.checkpoints.get(step)
        if ev is not None and ev.val_loss is not None:
            return ev.val_loss
        for c in self.disk_checkpoints or []:
            if c["step"] == step and c.get("best_step") == step and isinstance(c.get("best_loss"), (int, float)):
                return float(c["best_loss"])
        return None

    def is_final_checkpoint(self, step: int) -> bool:
        ev = self.checkpoints.get(step)
        if ev is not None and ev.final:
            return True
        return any(c["step"] == step and c.get("reason") == "final" for c in self.disk_checkpoints or [])


def fmt_duration(s: float | None) -> str:
    if s is None:
        return "–"
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"
