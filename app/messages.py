"""App-wide messages (past tense, as events)."""

from __future__ import annotations

from textual.message import Message


class EventsReceived(Message):
    """A batch of engine events, in order."""

    def __init__(self, events: list) -> None:
        super().__init__()
        self.events = events


class EngineLost(Message):
    """The engine stopped answering (no heartbeat); the stream reconnects with back-off. ``refused``: it
    answers, but cannot serve the run's events (``reason`` says why: events.jsonl unreadable, missing)."""

    def __init__(self, reason: str, refused: bool = False) -> None:
        super().__init__()
        self.reason = reason
        self.refused = refused


class EngineStatusRead(Message):
    """The engine's answer to a status request, asked when it refuses the run's history (events.jsonl
    unreadable, removed): the run's state, last step, its loss, the steps planned, how it finished, and
    the seq of its last event (``last``)."""

    def __init__(self, state: str, step: int | None, loss: float | None, total_steps: int | None, outcome: str,
                 last: int) -> None:
        super().__init__()
        self.state, self.step, self.loss, self.total_steps = state, step, loss, total_steps
        self.outcome, self.last = outcome, last


class EngineSeen(Message):
    """Whether an engine process serves the run now (from engine.json and its pid), on every change;
    ``workers``: the pids of workers that outlive a gone engine (they save and stop by themselves)."""

    def __init__(self, live: bool, pid: int | None, workers: tuple = ()) -> None:
        super().__init__()
        self.live, self.pid, self.workers = live, pid, workers


class CommandReplied(Message):
    """The engine's reply to a command the user sent (``key``: what the screen marked in flight; ``id``: the
    command's, which the workers' ack carries)."""

    def __init__(self, command: str, status: str, reason: str, key: str = "", id: str = "") -> None:
        super().__init__()
        self.command, self.status, self.reason, self.key, self.id = command, status, reason, key, id


class DiskScanned(Message):
    """What the run folder holds now: complete checkpoints, lora_final, inference jobs; ``gone``: the folder
    itself no longer exists (deleted or moved while attached); ``inferring``: the checkpoints that inference
    processes of the run work on now ("all": every checkpoint-N), as seen by the scan begun at ``started``
    (time.monotonic)."""

    def __init__(self, checkpoints: list | None, final: str | None, inference: dict | None, error: str = "",
                 gone: bool = False, inferring: frozenset = frozenset(), started: float = 0.0) -> None:
        super().__init__()
        self.checkpoints, self.final, self.inference, self.error = checkpoints, final, inference, error
        self.gone, self.inferring, self.started = gone, inferring, started


class ConfigRead(Message):
    """The run folder's config.toml as read ({} and ``error`` when missing or unreadable)."""

    def __init__(self, config: dict, error: str = "") -> None:
        super().__init__()
        self.config, self.error = config, error


class LogRead(Message):
    """Lines appended to one of the run's log files since the last read (Logs tab): read from byte ``start``
    to ``offset``."""

    def __init__(self, file: str, lines: list, offset: int, pending: bytes, start: int = 0,
                 where: str = "") -> None:
        super().__init__()
        self.file, self.lines, self.offset, self.pending, self.start = file, lines, offset, pending, start
        self.where = where  # "" (the file is there), "file" (not there), "folder" (the run folder is not there)
