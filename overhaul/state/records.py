"""What the journal stores, and the interface every state backend provides."""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from overhaul.errors import STATE_EXIT, USAGE_EXIT, OverhaulError, Refused

UNFINISHED = ("running", "interrupted")
# A failed run is continued once the operator repaired the cause; a partial one once the hosts it left out answer.
RESUMABLE = (*UNFINISHED, "failed", "partial")
STATUSES = ("running", "interrupted", "succeeded", "partial", "failed", "rolled back", "refused", "abandoned")  # a run's
LIMIT_EVENT = "limit"  # journal event: a run kept to some hosts (--limit), its detail the limit
KIND_EVENT = "kind"  # journal event: what a run is, whatever its runbook's name ("upgrade": it upgrades a package)
EXCLUDED_EVENT = "excluded"  # journal event: a host left out of a run as unreachable (--skip-unreachable)
OUTCOMES = ("running", "ok", "changed", "failed", "skipped")  # a (stage, host) pair's (overhaul.step.Outcome, running)


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
    status: str = "running"  # running | interrupted | succeeded | partial | failed | rolled back | refused | abandoned
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
class CommandRecord:
    """One remote command of a (stage, host) pair: where its output is, on which controller."""

    run_id: str
    stage_index: int
    host: str
    at: float
    command: str  # redacted
    exit_code: int | None
    duration: float
    log_path: str
    machine: str


@dataclass
class EventRecord:
    """A journal event of an environment (promotion evidence, limits, rebuilds, checks...), maybe of one run."""

    at: float
    environment: str
    run_id: str  # "" when it is no run's
    kind: str
    detail: str  # free text, or JSON for some kinds (check, source-hosts)


@dataclass
class ClaimRecord:
    """A claim: one run per key (e.g. per environment and night) until it expires."""

    key: str
    holder: str
    run_id: str
    at: float
    expires: float


@dataclass
class LockInfo:
    """An environment's lease: who holds it, from which machine and process, until when."""

    environment: str
    run_id: str
    token: str  # the fencing token: new at every acquisition, checked by each of the run's journal writes
    holder: str  # user@host
    machine: str  # machine id : boot id
    pid: int
    pid_started: int | None
    acquired: float
    heartbeat: float
    expires: float
    live: bool = True  # the lease had not expired when it was read (by the database's clock)


class StateError(OverhaulError):
    """The state backend cannot be used (unreachable past the retry budget, a newer schema, bad setting)."""

    exit_code = STATE_EXIT


class StateSettingError(StateError):
    """The state setting itself is wrong (an unknown backend, a password in the URL): bad input."""

    exit_code = USAGE_EXIT


class LockLost(StateError):
    """This run no longer holds the environment's lease: it must not start one more (stage, host) pair, nor write
    anything more of the run (a pair's end, the run's status)."""


class LockHeld(Refused):
    def __init__(self, lock: LockInfo):
        self.lock = lock
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lock.acquired))
        super().__init__(
            f"environment {lock.environment!r} is locked by {lock.holder} (pid {lock.pid}, run {lock.run_id}) "
            f"since {since}; if that run is dead: overhaul unlock --env {lock.environment} --force --reason WHY"
        )


class State(Protocol):
    """A journal and lock backend: the embedded SQLite file, PostgreSQL, or one from an `overhaul.state`
    entry point. Every method is one atomic operation; none is called while holding another. Methods are called
    from several threads at once: a run's workers write their pairs' starts and ends concurrently (`start_pair`,
    `record`, `record_ends`), and a backend may commit the writes waiting at once in one transaction (group commit)
    as long as each call returns only once its own rows are durable, each write keeps its own fence, and a pair's
    rows keep their order."""

    url: str  # where it is, never with a password

    # runs and (stage, host) pairs
    def start_run(self, run: RunRecord) -> None: ...
    # A `fence` (environment, token): the write is made only while that token holds the environment's live lease,
    # in the same transaction (else LockLost, and nothing is written); None: unfenced (a run without a lease).
    def set_status(self, run_id: str, status: str, ended: float | None = None,
                   fence: tuple[str, str] | None = None) -> None: ...
    def start_pair(self, result: ResultRecord, environment: str, token: str) -> None:
        """Journal a pair as running, only while `token` holds the environment's live lease (else LockLost)."""
    def record(self, result: ResultRecord, commands: Iterable[CommandRecord] = (),
               fence: tuple[str, str] | None = None) -> None:
        """Journal a pair's start or end (with its end, the index of the commands it ran), in one transaction."""
    def record_ends(self, ends: Iterable[tuple[ResultRecord, Iterable[CommandRecord]]],
                    fence: tuple[str, str] | None = None) -> None:
        """Journal several pairs' ends (each with the index of its commands) in one transaction."""
    def run(self, run_id: str) -> RunRecord: ...
    def runs(self, environment: str | None = None, limit: int = 20) -> list[RunRecord]: ...
    def unfinished(self, environment: str) -> list[RunRecord]: ...
    def resumable(self, environment: str) -> RunRecord | None: ...
    def results(self, run_id: str) -> list[ResultRecord]: ...
    # events (promotion evidence, limits, rebuilds, checks...) and the command index
    def event(self, environment: str, kind: str, detail: str, run_id: str = "") -> None: ...
    def add_events(self, environment: str, kind: str, details: Iterable[str], run_id: str = "") -> None:
        """Many events of one kind in one transaction (a verify's check results: one write, not one per check)."""
    def events(self, environment: str) -> list[tuple[float, str, str, str]]: ...
    def run_events(self, run_id: str) -> list[tuple[float, str, str]]:
        """One run's events (at, kind, detail) in the order of `at`: read by its index, not from its environment's."""
    def commands(self, run_id: str, hosts: Collection[str] | None = None) -> list[CommandRecord]:
        """The run's commands (only those of `hosts`, when given), in the order they ran."""
    # the environment's history: indexed queries over every run (overhaul.history reasons with them)
    def whole_runs(self, environment: str, runbook: str, status: str) -> list[RunRecord]:
        """The mutating runs of `runbook` on the whole of `environment` (no --limit, no host left out as
        unreachable) that ended `status`, newest first."""
    def changing_runs(self, environment: str, runbook: str, fact: str, limit: int) -> list[RunRecord]:
        """The newest `limit` mutating runs of `runbook` (not rolled back, not refused) with a pair that changed its
        host (or failed) and whose facts name `fact`, newest first."""
    def later_changes(self, environment: str, after: float, hosts: Iterable[str], but: str) -> list[tuple[str, str]]:
        """(run id, host) of each pair that changed (or failed on) one of `hosts` in a mutating run of `environment`
        started after `after`, other than run `but`; newest run first."""
    def run_event(self, run_id: str, kind: str) -> str | None:
        """The detail of the run's first event of `kind` (None: it has none)."""
    def last_event(self, environment: str, kind: str) -> tuple[float, str] | None:
        """(when, detail) of the environment's newest event of `kind`."""
    def environments(self) -> list[str]:
        """Every environment some run or event was journaled for, by name."""
    def runs_of(self, environment: str, runbook: str, limit: int) -> list[RunRecord]:
        """The newest `limit` runs of `runbook` on `environment` (any status), newest first."""
    def runs_with_event(self, environment: str, kind: str, detail: str) -> list[RunRecord]:
        """The runs of `environment` with an event of `kind` whose detail is `detail`, newest first."""
    def runs_starting(self, prefix: str, limit: int) -> list[RunRecord]:
        """Runs whose id starts with `prefix`, newest first."""
    # claims and the environment lease
    def claim(self, key: str, holder: str, run_id: str, expires: float) -> dict | None: ...
    def acquire(self, environment: str, run_id: str, holder: str) -> tuple[LockInfo, LockInfo | None]:
        """Take the lease (or raise LockHeld); return it and the expired or dead lease it replaced, if any."""
    def heartbeat(self, lock: LockInfo) -> bool: ...
    def release(self, lock: LockInfo) -> None: ...
    def lock(self, environment: str) -> LockInfo | None: ...
    def locks(self) -> list[LockInfo]: ...
    def force_unlock(self, environment: str, operator: str, reason: str) -> LockInfo | None: ...
    # the schema, and moving between backends
    def schema_version(self) -> int: ...
    def migrate(self) -> tuple[int, int]: ...
    def export(self) -> Iterator[dict[str, Any]]:
        """Every journal row as {"table": ..., "row": {...}} (overhaul.state.exported describes the format)."""
    def import_rows(self, rows: Iterable[Any]) -> int:
        """Add exported rows (overhaul.state.exported.Row, or dicts as `export` yields them) in one transaction:
        each validated, all or none (overhaul.state.exported.BadExport names the bad row's line); rows whose key
        is already journaled are kept as they are. Return how many were added."""
    def close(self) -> None: ...
