"""Commands at step boundaries (docs/training.md, "Control").

They come from the engine's control socket (rank 0) and from signals (every rank: SIGTERM / SIGINT stop,
SIGUSR1 saves), through ``sinks.ControlInbox``. Rank 0's commands reach every rank in one broadcast, so all
ranks apply them at the same boundary; ``command_action`` is the one place a command is recognised, for
the training loop and for the pause alike.
"""

from __future__ import annotations

import time

from engine.protocol import (
    Ack,
    EvalNow,
    Pause,
    PreviewNow,
    Resume,
    SaveCheckpoint,
    SetPreviewParams,
    Status,
    Stop,
)
from engine.worker.dist import Dist
from engine.worker.report import Report


def command_action(c) -> str | None:
    """What a command asks of the workers: "preview_params", "preview", "save", "eval", "pause", "resume" or
    "stop"; None for the engine's own (``run_inference``, the heartbeat), which ask the workers nothing."""
    match c:
        case SetPreviewParams():
            return "preview_params"
        case PreviewNow():
            return "preview"
        case SaveCheckpoint():
            return "save"
        case EvalNow():
            return "eval"
        case Pause():
            return "pause"
        case Resume():
            return "resume"
        case Stop():
            return "stop"
    return None


class Control:
    """The commands of one worker: polled at each step boundary, agreed on by every rank, applied."""

    def __init__(self, endpoint: str | None, engine_timeout: float, d: Dist, out: Report) -> None:
        from engine.worker.sinks import ControlInbox

        self.d, self.out = d, out
        self.inbox = ControlInbox(endpoint, engine_timeout=engine_timeout)
        self.inbox.install_signal_handlers()
        self.previews = None  # evaluation.Previews, once made: set_preview_params changes its parameters

    @property
    def engine_lost(self) -> bool:
        return self.inbox.engine_lost

    @property
    def resumable(self) -> bool:
        """Whether a resume can reach these workers (an engine sends commands; a worker alone takes only signals)."""
        return self.inbox.listening

    def poll(self) -> tuple[list, bool]:
        """The commands waiting (rank 0's; the other ranks' signals count only as a stop signal), and
        whether this rank has a stop waiting."""
        commands = self.inbox.poll()  # rank 0: engine commands and signals; others: signals only
        stop = any(command_action(c) == "stop" for c in commands)
        return (commands if self.d.main else []), stop

    def agree(self, commands: list, any_pending: bool, step: int) -> set[str]:
        """Rank 0's commands, shared with every rank and applied; returns the actions for this boundary
        (``any_pending``: whether rank 0 has any, from the step's all-gather)."""
        if not any_pending:
            return set()
        return self.apply(self.d.broadcast(commands if self.d.main else None), step)

    def pause(self, step: int, act=None, why: str = "") -> str:
        """Paused at this boundary until a resume ("resume") or a stop ("stop"). Other commands are
        acknowledged and done meanwhile: new preview parameters here, a save, an evaluation or previews by
        ``act(actions)`` (on every rank, as at a step boundary), which returns the run's final state when one
        ends it (an evaluation out of patience: that state is returned), else None. ``why``: a pause the workers
        take themselves (a full disk), said in its status and the log."""
        self.out.emit(Status(state="paused", step=step, message=why))
        self.out.log(f"paused at step {step}" + (f": {why}" if why else ""))
        while True:
            commands = self.inbox.poll() if self.d.main else []
            actions = self.apply(self.d.broadcast(commands if self.d.main else None), step)
            if "stop" in actions:
                return "stop"
            ended = act(actions) if act is not None and actions & {"save", "eval", "preview"} else None
            if ended:
                return ended
            if "resume" in actions:
                self.out.emit(Status(state="running", step=step))
                self.out.log(f"resumed at step {step}")
                return "resume"
            time.sleep(0.2)

    def apply(self, commands: list, step: int) -> set[str]:
        """The same commands on every rank: new preview parameters take effect, each command with an id is
        acknowledged (with the parameters now in force, for set_preview_params); returns their actions."""
        actions = set()
        for c in commands:
            action = command_action(c)
            if action == "preview_params":
                self.previews.params = self.previews.params.updated(c)
            if c.id:
                params = self.previews.params.to_dict() if action == "preview_params" else {}
                self.out.emit(Ack(id=c.id, command=c.type, step=step, params=params))
            if action:
                actions.add(action)
        return actions

    def close(self) -> None:
        self.inbox.close()
