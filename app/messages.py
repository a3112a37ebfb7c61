"""App-wide messages (past tense, as events)."""

from __future__ import annotations

from textual.message import Message


class EventsReceived(Message):
    """A batch of engine events, in order."""

    def __init__(self, events: list) -> None:
        super().__init__()
        self.events = events


class EngineLost(Message):
    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason


class EngineBack(Message):
    pass


class CommandReplied(Message):
    """The engine's reply to a command the user sent."""

    def __init__(self, command: str, status: str, reason: str) -> None:
        super().__init__()
        self.command, self.status, self.reason = command, status, reason
