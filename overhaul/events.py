"""What a run tells as it goes: typed events, published to subscribers (the console view is one of them).

The engine never prints. A run (overhaul.execution.Execution) publishes, in order: `RunStarted` (journaled
runs), `PreflightChecked` (gated runs), then per stage `StageStarted` (and `BatchStarted` for rolling stages),
per (stage, host) `PairStarted`, `CommandStarted` and `CommandDone` for each command and `PairFinished`, then
`RunEnded`. While the preflight reads, `PreflightProgress` says how many hosts are checked. `Notice` carries what
happens beside the stages (a lock taken over, a stop requested, an undo starting).

A subscriber is any callable taking an event. It is called from the run's worker threads, one event at a
time except `CommandStarted`, `CommandDone` (told from each host's worker as its commands start and complete) and
`PreflightProgress` (from each host's preflight worker), and must not block long.
A subscriber that raises is told nothing more (the run goes on, journaled as always): `Publisher.dropped`
keeps it with its exception.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from overhaul.plan import PlannedStage
    from overhaul.preflight import PreflightReport
    from overhaul.runner import HostResult, RunResult
    from overhaul.state import RunRecord
    from overhaul.transport import CommandResult

__all__ = ["Asking", "BatchStarted", "CommandDone", "CommandStarted", "Event", "Notice", "PairFinished", "PairStarted",
           "PreflightChecked", "PreflightProgress", "Publisher", "RunEnded", "RunStarted", "StageStarted", "Subscriber",
           "WaysOn"]


@dataclass(frozen=True)
class RunStarted:
    """A journaled run began (or was resumed: `resuming` is how many of its pairs were already done)."""

    run_id: str
    runbook: str
    environment: str
    hosts: int
    logs: Path
    version: str | None = None
    limit: str = ""
    resuming: int | None = None
    undoing: bool = False


@dataclass(frozen=True)
class PreflightProgress:
    """The preflight has checked `checked` of `total` hosts (told before the first, and as each host's ends)."""

    checked: int
    total: int


@dataclass(frozen=True)
class PreflightChecked:
    """Every stage's preflight on every host, done before the first change: the table and its refusals."""

    report: PreflightReport


@dataclass(frozen=True)
class StageStarted:
    planned: PlannedStage
    hosts: list[str]


@dataclass(frozen=True)
class BatchStarted:
    """A batch of a rolling stage."""

    planned: PlannedStage
    number: int
    total: int
    hosts: list[str]


@dataclass(frozen=True)
class PairStarted:
    planned: PlannedStage
    host: str


@dataclass(frozen=True)
class CommandStarted:
    """A command starts on `host`: `command` as the step wrote it (redacted; without the engine's framing: the
    durable lock, the remote timeout, sudo, the probes read with it); `read`: it only reads the host (probes)."""

    host: str
    command: str
    read: bool = False


@dataclass(frozen=True)
class CommandDone:
    """A command ended on `host` (`result.command` as in `CommandStarted`, `result.read` too)."""

    host: str
    result: CommandResult


@dataclass(frozen=True)
class PairFinished:
    """A (stage, host) ended: ok, changed, failed or skipped."""

    result: HostResult


@dataclass(frozen=True)
class Asking:
    """The run is about to ask the operator (a stage that needs confirmation): a live view gives up the terminal."""


@dataclass(frozen=True)
class Notice:
    """Something beside the stages an operator should read (`warning` and `error` go where errors go)."""

    text: str
    level: Literal["info", "warning", "error"] = "info"


@dataclass(frozen=True)
class WaysOn:
    """The ways on from a failed run that left hosts part-way.

    `left`: host -> (the stages that changed it, the later stages it did not finish there); `undo_blocked`: why an
    undo would refuse (empty: it can undo); `rollback`: the command that goes back to before the run, if any."""

    left: dict[str, tuple[list[str], list[str]]]
    undo_blocked: list[str] = field(default_factory=list)
    rollback: str | None = None


@dataclass(frozen=True)
class RunEnded:
    """The run ended: its result, its status as journaled, and what is needed to say the way on."""

    result: RunResult
    status: str
    elapsed: float
    environment: str
    stages: list[PlannedStage]  # the run's own, then those of its undo and hooks if any
    run: RunRecord | None = None  # None: a check-only run (a plan), not journaled
    ways_on: WaysOn | None = None
    journal_error: str = ""  # a journal write failed: the run stopped there
    undoing: bool = False  # the run began taking itself back: its way on is the undo, not a resume


Event = (RunStarted | PreflightProgress | PreflightChecked | StageStarted | BatchStarted | PairStarted | CommandStarted
         | CommandDone | PairFinished | Asking | Notice | RunEnded)
Subscriber = Callable[[Event], object]


class Publisher:
    """Tells each event to every subscriber, in the order they were given; a view's bug never stops a run."""

    def __init__(self, subscribers: Iterable[Subscriber] = ()):
        self.subscribers = list(subscribers)
        self.dropped: list[tuple[Subscriber, Exception]] = []

    def __call__(self, event: Event) -> None:
        for subscriber in list(self.subscribers):
            try:
                subscriber(event)
            except Exception as exc:
                with suppress(ValueError):  # (another thread dropped it already)
                    self.subscribers.remove(subscriber)
                    self.dropped.append((subscriber, exc))

    def notice(self, text: str, level: Literal["info", "warning", "error"] = "info") -> None:
        self(Notice(text, level))
