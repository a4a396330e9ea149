"""What the journal stores, and the interface every state backend provides."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from overhaul.errors import Refused

UNFINISHED = ("running", "interrupted")
RESUMABLE = (*UNFINISHED, "failed")  # a failed run is continued once the operator repaired the cause


@dataclass
class RunRecord:
    id: str
    runbook: str
    runbook_path: str
    runbook_sha256: str
    environment: str
    params: dict[str, Any]
    operator: str
    started: float
    ended: float | None = None
    status: str = "running"  # running | interrupted | succeeded | failed | refused | abandoned
    mutating: bool = True  # False: a read-only run (verify), never "unfinished", never resumed

    @property
    def duration(self) -> float:
        return (self.ended or time.time()) - self.started


@dataclass
class ResultRecord:
    run_id: str
    stage_index: int
    stage: str
    host: str
    outcome: str  # running | ok | changed | failed | skipped
    attempts: int = 0
    started: float = 0.0
    ended: float | None = None
    message: str = ""
    output_path: str = ""
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass
class LockInfo:
    environment: str
    run_id: str
    holder: str  # user@host
    hostname: str
    pid: int
    pid_started: int | None
    acquired: float
    heartbeat: float


class LockHeld(Refused):
    def __init__(self, lock: LockInfo):
        self.lock = lock
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lock.acquired))
        super().__init__(
            f"environment {lock.environment!r} is locked by {lock.holder} (pid {lock.pid}, run {lock.run_id}) "
            f"since {since}; if that run is dead: overhaul unlock --env {lock.environment} --force"
        )


class State(Protocol):
    """A journal and lock backend."""

    def start_run(self, run: RunRecord) -> None: ...
    def set_status(self, run_id: str, status: str, ended: float | None = None) -> None: ...
    def record(self, result: ResultRecord) -> None: ...
    def run(self, run_id: str) -> RunRecord: ...
    def runs(self, environment: str | None = None, limit: int = 20) -> list[RunRecord]: ...
    def unfinished(self, environment: str) -> list[RunRecord]: ...
    def resumable(self, environment: str) -> RunRecord | None: ...
    def results(self, run_id: str) -> list[ResultRecord]: ...
    def event(self, environment: str, kind: str, detail: str, run_id: str = "") -> None: ...
    def events(self, environment: str) -> list[tuple[float, str, str, str]]: ...
    def acquire(self, environment: str, run_id: str, holder: str) -> LockInfo | None: ...
    def heartbeat(self, environment: str, run_id: str) -> bool: ...
    def release(self, environment: str, run_id: str) -> None: ...
    def force_unlock(self, environment: str, operator: str) -> LockInfo | None: ...
