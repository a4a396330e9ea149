"""The journal and the environment lease in SQL, shared by the SQLite and PostgreSQL backends.

Every operation is one transaction, most of them one statement: the lease is taken by one atomic
upsert that only replaces an expired (or provably dead) holder, and a (stage, host) pair is journaled
as started only in the same transaction that finds this run's fencing token still holding a live lease.
The pairs' writes of concurrent workers are committed together (group commit, see `SQLState._grouped`):
one disk sync, or one round trip, for all the rows waiting, each caller returning once its own are durable.
The backends differ only in how they connect, their clock and their row locking.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from overhaul.proc import alive, start_time
from overhaul.state.records import (
    EXCLUDED_EVENT,
    KIND_EVENT,
    LIMIT_EVENT,
    RESUMABLE,
    UNFINISHED,
    ClaimRecord,
    CommandRecord,
    EventRecord,
    LockHeld,
    LockInfo,
    LockLost,
    ResultRecord,
    RunRecord,
    StateError,
)

# Test hook: kill this process with SIGKILL right after the N-th journal write (crash-resume tests).
KILL_AFTER_WRITES = "OVERHAUL_TEST_KILL_AFTER_WRITES"
RUN_ID = re.compile(r"[0-9A-Za-z-]+")  # what a run id is made of (overhaul.execution.new_run_id)
MACHINE_ID = "OVERHAUL_MACHINE_ID"  # overrides /etc/machine-id (containers cloned from one image share it)

# Versioned migrations: the SQL both databases accept. Version N is MIGRATIONS[N - 1]; a database
# records its version in overhaul_schema. Files written before versions existed are version 0.
MIGRATIONS: list[list[str]] = [
    [  # 1: the journal
        """CREATE TABLE IF NOT EXISTS runs (
            id TEXT PRIMARY KEY, runbook TEXT, runbook_path TEXT, runbook_sha256 TEXT, environment TEXT,
            params TEXT, operator TEXT, started DOUBLE PRECISION, ended DOUBLE PRECISION, status TEXT,
            mutating BOOLEAN)""",
        "CREATE INDEX IF NOT EXISTS runs_by_environment ON runs (environment, started)",
        """CREATE TABLE IF NOT EXISTS results (
            run_id TEXT, stage_index INTEGER, stage TEXT, host TEXT, outcome TEXT, attempts INTEGER,
            started DOUBLE PRECISION, ended DOUBLE PRECISION, message TEXT, output_path TEXT, facts TEXT,
            PRIMARY KEY (run_id, stage_index, host))""",
        """CREATE TABLE IF NOT EXISTS events (
            at DOUBLE PRECISION, environment TEXT, run_id TEXT, kind TEXT, detail TEXT)""",
        "CREATE INDEX IF NOT EXISTS events_by_environment ON events (environment, at)",
        """CREATE TABLE IF NOT EXISTS claims (
            key TEXT PRIMARY KEY, holder TEXT, run_id TEXT, at DOUBLE PRECISION, expires DOUBLE PRECISION)""",
    ],
    [  # 2: the environment lease with a fencing token (replaces version 0's per-PID lock)
        "DROP TABLE IF EXISTS locks",
        """CREATE TABLE locks (
            environment TEXT PRIMARY KEY, run_id TEXT, token TEXT, holder TEXT, machine TEXT, pid INTEGER,
            pid_started BIGINT, acquired DOUBLE PRECISION, heartbeat DOUBLE PRECISION, expires DOUBLE PRECISION)""",
    ],
    [  # 3: the per-command output index
        """CREATE TABLE IF NOT EXISTS commands (
            run_id TEXT, stage_index INTEGER, host TEXT, at DOUBLE PRECISION, command TEXT, exit_code INTEGER,
            duration DOUBLE PRECISION, log_path TEXT, machine TEXT)""",
        "CREATE INDEX IF NOT EXISTS commands_by_run ON commands (run_id, stage_index, host)",
    ],
    [  # 4: the environment's history without a window of recent runs (overhaul.history)
        "CREATE INDEX IF NOT EXISTS runs_by_runbook ON runs (environment, runbook, started)",
        "CREATE INDEX IF NOT EXISTS runs_mutating ON runs (environment, mutating, started)",
        "CREATE INDEX IF NOT EXISTS events_by_run ON events (run_id, kind, at)",
        "CREATE INDEX IF NOT EXISTS events_by_kind ON events (environment, kind, at)",
    ],
]
LATEST = len(MIGRATIONS)

# What `export` writes and `import_rows` reads (the lease is not history: it is never exported), in that order:
# each table's record type gives its columns (overhaul.state.exported: the format, and each row's validation).
RECORDS: dict[str, type] = {"runs": RunRecord, "results": ResultRecord, "events": EventRecord, "claims": ClaimRecord,
                            "commands": CommandRecord}
COLUMNS = {table: [f.name for f in fields(record)] for table, record in RECORDS.items()}
# What makes a row the same row. A table with a primary key holds each key once (so does its export); events and
# commands have none: two alike are two rows, and an import adds one only if no row with its key is there yet.
KEYS = {"runs": ["id"], "results": ["run_id", "stage_index", "host"], "events": ["at", "run_id", "kind"],
        "claims": ["key"], "commands": ["run_id", "stage_index", "host", "at"]}
PRIMARY = ("runs", "results", "claims")
IMPORT_BATCH = 500  # rows per INSERT of an import (11 columns at most: far below either database's limit)
MAX_GROUP = 1000  # pairs' writes committed in one transaction at most (see SQLState._grouped)
LOCK_COLUMNS = [f.name for f in fields(LockInfo) if f.name != "live"]

T = TypeVar("T")
Execute = Callable[[str, tuple], tuple[int, list[tuple]]]  # (sql, args) -> (rowcount, rows)


def machine_identity() -> str:
    """This machine and this boot: the same value for every controller process until the next reboot."""
    machine = os.environ.get(MACHINE_ID) or _read("/etc/machine-id") or os.uname().nodename
    return f"{machine}:{_read('/proc/sys/kernel/random/boot_id')}"


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


class SQLState:
    """The queries; a backend supplies `_transaction`, its clock (`now`) and its row-lock clause."""

    url = ""
    now = ""  # SQL expression: the database's clock in seconds since the epoch (one clock for every machine)
    for_share = ""  # row lock for the fence check, where a write does not lock the whole database

    def __init__(self, lease: float = 60.0):
        self.lease = lease
        self.max_group = MAX_GROUP  # 1: each pair's write in a transaction of its own (as before group commit)
        self._waiting: list[_Write] = []  # pairs' writes queued for the next group commit, in the order they came
        self._committing = False  # a thread is committing a group (False: none is, and none waits)
        self._turn = threading.Lock()  # guards the two above
        self._counting = threading.Lock()
        self._writes = 0
        kill_after = os.environ.get(KILL_AFTER_WRITES)
        self._kill_after = int(kill_after) if kill_after else None

    # -- what a backend provides -----------------------------------------------------------------
    def _transaction(self, work: Callable[[Execute], T]) -> T:
        """Run `work` in one transaction (retried as a whole where the backend retries)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    # -- the schema ----------------------------------------------------------------------------------
    def schema_version(self) -> int:
        def read(execute: Execute) -> int:
            self._lock_schema(execute)
            execute("CREATE TABLE IF NOT EXISTS overhaul_schema (version INTEGER NOT NULL)", ())
            _, rows = execute("SELECT max(version) FROM overhaul_schema", ())
            return rows[0][0] or 0
        return self._transaction(read)

    def migrate(self) -> tuple[int, int]:
        """Apply the pending migrations in one transaction; return (version before, version after)."""
        def apply(execute: Execute) -> tuple[int, int]:
            self._lock_schema(execute)
            _, rows = execute("SELECT max(version) FROM overhaul_schema", ())
            before = rows[0][0] or 0
            self._refuse_newer(before)
            for version in range(before + 1, LATEST + 1):
                for statement in MIGRATIONS[version - 1]:
                    execute(statement, ())
                execute("INSERT INTO overhaul_schema (version) VALUES (?)", (version,))
            return before, max(before, LATEST)
        self.schema_version()  # creates the version table
        return self._transaction(apply)

    def _lock_schema(self, execute: Execute) -> None:
        """Keep two controllers from migrating at once (SQLite's write transaction already does)."""

    def _refuse_newer(self, version: int) -> None:
        if version > LATEST:
            raise StateError(f"the state at {self.url} has schema version {version}, newer than this Overhaul "
                             f"knows ({LATEST}): upgrade Overhaul")

    def ensure_schema(self, migrate: bool) -> None:
        """Check the schema is this Overhaul's; migrate it when allowed or when the database is empty."""
        version = self.schema_version()
        self._refuse_newer(version)
        if version < LATEST:
            if not migrate and version > 0:
                raise StateError(f"the state at {self.url} has schema version {version}, this Overhaul needs "
                                 f"{LATEST}: run `overhaul state migrate` (every controller then needs this version)")
            self.migrate()

    # -- writes ----------------------------------------------------------------------------------
    def _write(self, sql: str, args: tuple, journal: bool = True) -> int:
        count, _ = self._transaction(lambda execute: execute(sql, args))
        if journal:
            self._journaled()
        return count

    def _journaled(self) -> None:
        with self._counting:
            self._writes += 1
            kill = self._kill_after is not None and self._writes >= self._kill_after
        if kill:
            os.kill(os.getpid(), signal.SIGKILL)

    def start_run(self, run: RunRecord) -> None:
        row = _row(run)
        row["params"] = json.dumps(run.params)
        self._write(_insert("runs", row), tuple(row.values()))

    def set_status(self, run_id: str, status: str, ended: float | None = None,
                   fence: tuple[str, str] | None = None) -> None:
        """The run's status (and end); with a `fence`, only while it holds the lease (see `_hold`)."""
        def write(execute: Execute) -> None:
            self._hold(execute, fence, f"writing the status {status!r} of run {run_id}")
            execute("UPDATE runs SET status = ?, ended = ? WHERE id = ?", (status, ended, run_id))
        self._transaction(write)
        self._journaled()

    def record(self, result: ResultRecord, commands: Iterable[CommandRecord] = (),
               fence: tuple[str, str] | None = None) -> None:
        """A pair's row (its start or its end) and, with its end, the index of its commands: one transaction."""
        ends = [(result, commands)]
        self.record_ends(ends, fence) if fence is not None else self.record_ends(ends)  # (a subclass may not fence)

    def record_ends(self, ends: Iterable[tuple[ResultRecord, Iterable[CommandRecord]]],
                    fence: tuple[str, str] | None = None) -> None:
        """Pairs' rows and their commands' index, in one transaction (one disk sync for them all); with a `fence`,
        only while it holds the lease (see `_hold`). Committed with other threads' waiting writes (`_grouped`)."""
        self._grouped(_Write([(result, list(commands)) for result, commands in ends], fence, live=False))

    def start_pair(self, result: ResultRecord, environment: str, token: str) -> None:
        """The pair as running, only while `token` holds the live lease; committed with other threads' waiting
        writes (`_grouped`)."""
        self._grouped(_Write([(result, [])], (environment, token), live=True))

    def _grouped(self, write: _Write) -> None:
        """Group commit: journal `write` in one transaction with the pairs' writes other threads are waiting on.

        A thread that finds no group being committed commits every write queued (up to `max_group`), its own
        first, in the order they came, so a pair's start is before its end; the threads that queue meanwhile wait,
        and the first of them is woken to commit the next group (each waiter is woken once: when its write is
        committed, or when it commits). Each caller returns once its own rows are durable, or raises its own error:
        LockLost when its fence no longer holds (its rows alone are not written, as each write's fence is checked
        in the transaction that writes it), or the failure of the transaction to each of its writes (none of them
        written)."""
        with self._turn:
            self._waiting.append(write)
            leading = not self._committing
            self._committing = True
        if not leading:
            write.turn.wait()  # its group was committed, or it is first in line: its turn to commit
        if not write.done:
            with self._turn:  # (first in line: its own write is the group's first)
                group, self._waiting = self._waiting[:self.max_group], self._waiting[self.max_group:]
            try:
                self._commit(group)
            finally:
                with self._turn:
                    for each in group:
                        each.done = True
                    following = self._waiting[0] if self._waiting else None
                    self._committing = following is not None
                for each in group:
                    each.turn.set()
                if following is not None:
                    following.turn.set()  # the next group's turn
        if write.error is not None:
            raise write.error

    def _commit(self, group: list[_Write]) -> None:
        """Write `group` in one transaction; each write's error, if any, is set on it."""
        try:
            refused = self._transaction(lambda execute: self._write_group(execute, group))
        except BaseException as exc:
            for write in group:
                write.error = _own(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for write, why in zip(group, refused, strict=True):
            if why:
                write.error = LockLost(why)
        for write in group:
            if write.error is None:
                self._journaled()  # (each write counts, whatever it was committed with: see KILL_AFTER_WRITES)

    def _write_group(self, execute: Execute, group: list[_Write]) -> list[str]:
        """In one transaction: the rows of each write of `group` whose fence holds (see `_hold`); for each write,
        why it was refused ("": written). A pair written twice (its start, then its end) is written as its last."""
        environments = sorted({write.fence[0] for write in group if write.fence is not None})
        leases: dict[str, tuple[str, bool]] = {}
        if environments:
            _, rows = execute(f"SELECT environment, token, expires > {self.now} FROM locks WHERE environment IN "
                              f"({', '.join('?' * len(environments))}) {self.for_share}", tuple(environments))
            leases = {environment: (token, bool(live)) for environment, token, live in rows}
        refused: list[str] = []
        results: dict[tuple[str, int, str], ResultRecord] = {}
        commands: list[CommandRecord] = []
        for write in group:
            why = write.refusal(leases)
            refused.append(why)
            if not why:
                for result, its_commands in write.ends:
                    results[(result.run_id, result.stage_index, result.host)] = result
                    commands += its_commands
        rows = [_result_row(result) for result in results.values()]
        for start in range(0, len(rows), IMPORT_BATCH):
            chunk = rows[start:start + IMPORT_BATCH]
            one = f"({', '.join('?' * len(chunk[0]))})"
            execute(_upsert_result(f"VALUES {', '.join([one] * len(chunk))}"), tuple(v for row in chunk for v in row))
        names = COLUMNS["commands"]
        for start in range(0, len(commands), IMPORT_BATCH):
            chunk = [tuple(getattr(command, name) for name in names)
                     for command in commands[start:start + IMPORT_BATCH]]
            one = f"({', '.join('?' * len(names))})"
            execute(f"INSERT INTO commands ({', '.join(names)}) VALUES {', '.join([one] * len(chunk))}",
                    tuple(v for row in chunk for v in row))
        return refused

    def _hold(self, execute: Execute, fence: tuple[str, str] | None, doing: str, live: bool = False) -> None:
        """In a write's transaction, before it writes: LockLost (the transaction then writes nothing) unless the
        lease of `fence` (environment, token) is still that token's (and, with `live`, unexpired: a new pair starts
        only on a live lease). A takeover or `unlock --force` always replaces the token; a lease that merely expired
        (the state database was away longer than the lease) is still the run's until someone takes it, so the ends
        of what it did are written. The row lock (FOR SHARE; SQLite's write transaction locks the whole file) makes
        a concurrent takeover wait until this transaction ends."""
        if fence is None:
            return
        environment, token = fence
        unexpired = f"AND expires > {self.now} " if live else ""
        _, held = execute(f"SELECT 1 FROM locks WHERE environment = ? AND token = ? {unexpired}{self.for_share}",
                          (environment, token))
        if not held:
            raise LockLost(lease_lost(environment, live, doing))

    def event(self, environment: str, kind: str, detail: str, run_id: str = "") -> None:
        self.add_events(environment, kind, [detail], run_id)

    def add_events(self, environment: str, kind: str, details: Iterable[str], run_id: str = "") -> None:
        now = time.time()  # each a microsecond after the one before: events are read back in the order of `at`
        rows = [(now + index * 1e-6, environment, run_id, kind, detail) for index, detail in enumerate(details)]

        def write(execute: Execute) -> None:
            for row in rows:
                execute("INSERT INTO events (at, environment, run_id, kind, detail) VALUES (?, ?, ?, ?, ?)", row)

        if rows:
            self._transaction(write)
            self._journaled()

    # -- reads -----------------------------------------------------------------------------------
    def _rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        return self._transaction(lambda execute: execute(sql, args))[1]

    def run(self, run_id: str) -> RunRecord:
        runs = self._runs("WHERE id = ?", (run_id,))
        if not runs:
            raise KeyError(run_id)
        return runs[0]

    def runs(self, environment: str | None = None, limit: int = 20) -> list[RunRecord]:
        if environment is None:
            return self._runs("ORDER BY started DESC LIMIT ?", (limit,))
        return self._runs("WHERE environment = ? ORDER BY started DESC LIMIT ?", (environment, limit))

    def unfinished(self, environment: str) -> list[RunRecord]:
        marks = ", ".join("?" * len(UNFINISHED))
        return self._runs(f"WHERE environment = ? AND mutating AND status IN ({marks}) ORDER BY started DESC",
                          (environment, *UNFINISHED))

    def resumable(self, environment: str) -> RunRecord | None:
        """The environment's last mutating run (refused ones aside), if it is unfinished or failed."""
        last = self._runs("WHERE environment = ? AND mutating AND status != 'refused' ORDER BY started DESC LIMIT 1",
                          (environment,))
        return last[0] if last and last[0].status in RESUMABLE else None

    def _runs(self, where: str, args: tuple) -> list[RunRecord]:
        runs = self._select(RunRecord, "runs", where, args)
        for run in runs:
            run.params = json.loads(run.params)  # type: ignore[arg-type]
            run.mutating = bool(run.mutating)
        return runs

    def results(self, run_id: str) -> list[ResultRecord]:
        results = self._select(ResultRecord, "results", "WHERE run_id = ? ORDER BY stage_index, started", (run_id,))
        for result in results:
            result.facts = json.loads(result.facts)  # type: ignore[arg-type]
        return results

    def commands(self, run_id: str, hosts: Collection[str] | None = None) -> list[CommandRecord]:
        if hosts is None:
            return self._select(CommandRecord, "commands", "WHERE run_id = ? ORDER BY at", (run_id,))
        if not hosts:
            return []
        return self._select(CommandRecord, "commands", f"WHERE run_id = ? AND host IN ({', '.join('?' * len(hosts))}) "
                            "ORDER BY at", (run_id, *hosts))

    def _select(self, record: type[T], table: str, where: str, args: tuple) -> list[T]:
        names = COLUMNS[table]
        return [record(*row) for row in self._rows(f"SELECT {', '.join(names)} FROM {table} {where}", args)]

    def events(self, environment: str) -> list[tuple[float, str, str, str]]:
        rows = self._rows("SELECT at, run_id, kind, detail FROM events WHERE environment = ? ORDER BY at", (environment,))
        return [tuple(row) for row in rows]  # type: ignore[misc]

    def run_events(self, run_id: str) -> list[tuple[float, str, str]]:
        rows = self._rows("SELECT at, kind, detail FROM events WHERE run_id = ? ORDER BY at", (run_id,))
        return [tuple(row) for row in rows]  # type: ignore[misc]

    # -- the environment's history (overhaul.history) -----------------------------------------------
    # A run is of `runbook` by its runbook's name, or by its kind (a runbook composed in Python that upgrades).
    _OF_RUNBOOK = ("(runbook = ? OR EXISTS (SELECT 1 FROM events WHERE events.run_id = runs.id AND events.kind = ? "
                   "AND events.detail = ?))")

    def whole_runs(self, environment: str, runbook: str, status: str) -> list[RunRecord]:
        return self._runs(f"WHERE environment = ? AND {self._OF_RUNBOOK} AND status = ? AND mutating AND NOT EXISTS ("
                          "SELECT 1 FROM events WHERE events.run_id = runs.id AND events.kind IN (?, ?)) "
                          "ORDER BY started DESC", (environment, runbook, KIND_EVENT, runbook, status, LIMIT_EVENT,
                                                    EXCLUDED_EVENT))

    def changing_runs(self, environment: str, runbook: str, fact: str, limit: int) -> list[RunRecord]:
        return self._runs(f"WHERE environment = ? AND {self._OF_RUNBOOK} AND mutating AND status NOT IN ('rolled back', "
                          "'refused') AND EXISTS (SELECT 1 FROM results WHERE results.run_id = runs.id AND "
                          "results.outcome IN ('changed', 'failed') AND results.facts LIKE ?) ORDER BY started DESC "
                          "LIMIT ?", (environment, runbook, KIND_EVENT, runbook, f'%"{fact}"%', limit))

    def later_changes(self, environment: str, after: float, hosts: Iterable[str], but: str) -> list[tuple[str, str]]:
        hosts = list(hosts)
        if not hosts:
            return []
        rows = self._rows(
            f"SELECT runs.id, results.host FROM runs JOIN results ON results.run_id = runs.id WHERE "
            f"runs.environment = ? AND runs.mutating AND runs.started > ? AND runs.id != ? AND "
            f"results.outcome IN ('changed', 'failed') AND results.host IN ({', '.join('?' * len(hosts))}) "
            f"ORDER BY runs.started DESC, results.stage_index", (environment, after, but, *hosts))
        return [(run_id, host) for run_id, host in rows]

    def run_event(self, run_id: str, kind: str) -> str | None:
        rows = self._rows("SELECT detail FROM events WHERE run_id = ? AND kind = ? ORDER BY at LIMIT 1", (run_id, kind))
        return rows[0][0] if rows else None

    def last_event(self, environment: str, kind: str) -> tuple[float, str] | None:
        rows = self._rows("SELECT at, detail FROM events WHERE environment = ? AND kind = ? ORDER BY at DESC LIMIT 1",
                          (environment, kind))
        return (rows[0][0], rows[0][1]) if rows else None

    def environments(self) -> list[str]:
        rows = self._rows("SELECT DISTINCT environment FROM runs UNION SELECT DISTINCT environment FROM events "
                          "ORDER BY 1", ())
        return [row[0] for row in rows]

    def runs_of(self, environment: str, runbook: str, limit: int) -> list[RunRecord]:
        return self._runs("WHERE environment = ? AND runbook = ? ORDER BY started DESC LIMIT ?",
                          (environment, runbook, limit))

    def runs_with_event(self, environment: str, kind: str, detail: str) -> list[RunRecord]:
        return self._runs("WHERE environment = ? AND EXISTS (SELECT 1 FROM events WHERE events.run_id = runs.id AND "
                          "events.kind = ? AND events.detail = ?) ORDER BY started DESC", (environment, kind, detail))

    def runs_starting(self, prefix: str, limit: int) -> list[RunRecord]:
        if not RUN_ID.fullmatch(prefix):
            return []  # (no run id has another character, nor a LIKE wildcard)
        return self._runs("WHERE substr(id, 1, ?) = ? ORDER BY started DESC LIMIT ?", (len(prefix), prefix, limit))

    # -- claims: one run per key (e.g. per environment and night), even after the run ended ------
    def claim(self, key: str, holder: str, run_id: str, expires: float) -> dict | None:
        """Claim `key` until `expires`; return the existing claim when another run holds it."""
        now = time.time()
        _, mine = self._transaction(lambda execute: execute(
            "INSERT INTO claims (key, holder, run_id, at, expires) VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE "
            "SET holder = excluded.holder, run_id = excluded.run_id, at = excluded.at, expires = excluded.expires "
            "WHERE claims.expires <= ? RETURNING key", (key, holder, run_id, now, expires, now)))
        if mine:
            return None
        [(holder, run_id, at)] = self._rows("SELECT holder, run_id, at FROM claims WHERE key = ?", (key,))
        return {"holder": holder, "run_id": run_id, "at": at}

    # -- the environment lease -------------------------------------------------------------------------
    def acquire(self, environment: str, run_id: str, holder: str) -> tuple[LockInfo, LockInfo | None]:
        """Take the lease in one atomic statement: it replaces the holder only when that holder's lease has
        expired, or when the holder ran on this machine since its last boot and its process is gone."""
        pid = os.getpid()
        token = uuid.uuid4().hex
        machine = machine_identity()
        for _ in range(3):  # the holder may release between our read and our write: read again
            current = self.lock(environment)
            dead = current.token if current is not None and _dead_here(current, machine) else ""
            taken = self._rows(
                f"INSERT INTO locks ({', '.join(LOCK_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?, {self.now}, {self.now}, "
                f"{self.now} + ?) ON CONFLICT (environment) DO UPDATE SET "
                + ", ".join(f"{name} = excluded.{name}" for name in LOCK_COLUMNS[1:])
                + f" WHERE locks.expires <= {self.now} OR locks.token = ? RETURNING token",
                (environment, run_id, token, holder, machine, pid, start_time(pid), self.lease, dead))
            if taken:
                mine = self.lock(environment)
                assert mine is not None and mine.token == token
                return mine, current
            current = self.lock(environment)
            if current is not None:
                raise LockHeld(current)
        raise StateError(f"could not take the lease of {environment!r}: it changed hands three times while trying")

    def lock(self, environment: str) -> LockInfo | None:
        rows = self._rows(f"SELECT {', '.join(LOCK_COLUMNS)}, expires > {self.now} FROM locks WHERE environment = ?",
                          (environment,))
        return LockInfo(*rows[0][:-1], live=bool(rows[0][-1])) if rows else None

    def locks(self) -> list[LockInfo]:
        rows = self._rows(f"SELECT {', '.join(LOCK_COLUMNS)}, expires > {self.now} FROM locks ORDER BY environment")
        return [LockInfo(*row[:-1], live=bool(row[-1])) for row in rows]

    def heartbeat(self, lock: LockInfo) -> bool:
        """Extend our lease; False when it is no longer ours (taken over after it expired, or force-unlocked)."""
        return self._write(f"UPDATE locks SET heartbeat = {self.now}, expires = {self.now} + ? "
                           "WHERE environment = ? AND token = ?", (self.lease, lock.environment, lock.token),
                           journal=False) == 1

    def release(self, lock: LockInfo) -> None:
        self._write("DELETE FROM locks WHERE environment = ? AND token = ?", (lock.environment, lock.token),
                    journal=False)

    def force_unlock(self, environment: str, operator: str, reason: str) -> LockInfo | None:
        """Remove the lease whoever holds it; who removed it and why is journaled."""
        removed = self._rows(f"DELETE FROM locks WHERE environment = ? RETURNING {', '.join(LOCK_COLUMNS)}",
                             (environment,))
        if not removed:
            return None
        lock = LockInfo(*removed[0])
        self.event(environment, "force-unlock", f"{operator} removed the lock of {lock.holder} "
                   f"(pid {lock.pid}, run {lock.run_id}): {reason}", lock.run_id)
        return lock

    # -- moving a team between backends --------------------------------------------------------------
    def export(self) -> Iterator[dict[str, Any]]:
        """Every journal row as {"table": ..., "row": {...}}, runs first (JSON lines on the way out)."""
        for table, names in COLUMNS.items():
            for row in self._rows(f"SELECT {', '.join(names)} FROM {table}"):
                values = dict(zip(names, row, strict=True))
                if table == "runs":
                    values["mutating"] = bool(values["mutating"])
                yield {"table": table, "row": values}

    def import_rows(self, rows: Iterable[Any]) -> int:
        """Add exported rows in one transaction, all or none; return how many were added.

        `rows`: overhaul.state.exported.Row (a Reader's, validated as read) or dicts as `export` yields them
        (validated here). Rows are staged in temporary tables, a batch at a time, then added by one statement
        per table: a row whose key is already journaled is kept as it is (importing twice adds nothing). A bad
        row, or a key twice in a table that has one, raises BadExport naming its line: nothing is added.
        """
        from overhaul.state.exported import rows_of

        source = getattr(rows, "source", "rows")
        attempts = 0

        def add(execute: Execute) -> int:
            nonlocal attempts
            attempts += 1
            if attempts > 1:  # a backend retrying the transaction: the rows were read (a stream is read once)
                raise StateError(f"the state database {self.url} went away during the import (it kept all of it or "
                                 "none): import again (rows already there are kept as they are)")
            for table, names in COLUMNS.items():
                execute(f"CREATE TEMP TABLE import_{table} AS SELECT 0 AS line, {', '.join(names)} FROM {table} "
                        "WHERE 1 = 0", ())
            pending: dict[str, list[tuple]] = {table: [] for table in COLUMNS}
            for row in rows_of(rows, source):
                batch = pending[row.table]
                batch.append((row.line, *row.values))
                if len(batch) == IMPORT_BATCH:
                    _stage(execute, row.table, batch)
                    batch.clear()
            for table, batch in pending.items():
                _stage(execute, table, batch)
            for table in PRIMARY:
                _refuse_twice(execute, table, source)
            added = sum(execute(_add_new(table), ())[0] for table in COLUMNS)
            for table in COLUMNS:
                execute(f"DROP TABLE import_{table}", ())
            return added
        return self._transaction(add)


class _Write:
    """One caller's pairs' rows waiting for a group commit (see SQLState._grouped): written together or not at all,
    only while `fence` (environment, token) holds the lease (and, with `live`, the lease is unexpired)."""

    __slots__ = ("done", "ends", "error", "fence", "live", "turn")

    def __init__(self, ends: list[tuple[ResultRecord, list[CommandRecord]]], fence: tuple[str, str] | None,
                 live: bool):
        self.ends, self.fence, self.live = ends, fence, live
        self.done = False  # its group's transaction ended (committed, or failed: then `error`)
        self.error: BaseException | None = None
        self.turn = threading.Event()  # set when it is done, or when its writer is to commit the next group

    def refusal(self, leases: dict[str, tuple[str, bool]]) -> str:
        """Why the write must not be made, given each fenced environment's (token, unexpired) lease ("": made)."""
        if self.fence is None:
            return ""
        environment, token = self.fence
        held, unexpired = leases.get(environment, ("", False))
        if held == token and (unexpired or not self.live):
            return ""
        if self.live:
            doing = ", ".join(f"starting {result.stage!r} on {result.host}" for result, _ in self.ends)
        else:
            doing = "writing the end of " + ", ".join(f"{result.stage!r} on {result.host}"
                                                      for result, _ in self.ends[:3])
            doing += " ..." if len(self.ends) > 3 else ""
        return lease_lost(environment, self.live, doing)


def lease_lost(environment: str, live: bool, doing: str) -> str:
    """Why a fenced write is refused: the run's lease of `environment` is gone (`live`: a start, which also needs it
    unexpired; else the end of work done, refused only once another holder took the lease)."""
    why = "taken over or expired" if live else "taken over, or unlocked by force"
    return f"this run no longer holds the lease of {environment!r} ({why}): not {doing}"


def _own(error: BaseException) -> BaseException:
    """A copy of a failed group commit's `error` for one of its writers (one exception object raised in several
    threads would share its traceback); a StateError when it cannot be copied, or is no Exception (an interrupt)."""
    if isinstance(error, Exception):
        try:
            return copy.copy(error)
        except Exception:
            pass
    return StateError(f"the journal write failed: {type(error).__name__}: {error}")


def _stage(execute: Execute, table: str, rows: list[tuple]) -> None:
    """Stage rows (line, *values) of `table` for an import: one INSERT of them all."""
    if rows:
        names = ["line", *COLUMNS[table]]
        one = f"({', '.join('?' * len(names))})"
        execute(f"INSERT INTO import_{table} ({', '.join(names)}) VALUES {', '.join([one] * len(rows))}",
                tuple(value for row in rows for value in row))


def _refuse_twice(execute: Execute, table: str, source: str) -> None:
    """A key twice in the staged rows of a table that has a primary key: the export is not one journal's."""
    from overhaul.state.exported import BadExport

    key = KEYS[table]
    _, twice = execute(f"SELECT {', '.join(key)}, min(line) FROM import_{table} GROUP BY {', '.join(key)} "
                       "HAVING count(*) > 1 ORDER BY min(line) LIMIT 1", ())
    if twice:
        *values, first = twice[0]
        where = " AND ".join(f"{name} = ?" for name in key)
        _, [(again,)] = execute(f"SELECT line FROM import_{table} WHERE {where} ORDER BY line LIMIT 1 OFFSET 1",
                                tuple(values))
        said = ", ".join(f"{name} {value!r}" for name, value in zip(key, values, strict=True))
        raise BadExport(f"{source}:{again}: {table}: {said} again (first on line {first}): a journal holds each "
                        f"{table[:-1]} once, so this is no export of one")


def _add_new(table: str) -> str:
    """The staged rows of `table` whose key is not journaled yet, added (in the file's order)."""
    names = ", ".join(COLUMNS[table])
    if table in PRIMARY:
        return (f"INSERT INTO {table} ({names}) SELECT {names} FROM import_{table} WHERE true ORDER BY line "
                f"ON CONFLICT ({', '.join(KEYS[table])}) DO NOTHING")
    # An anti-join (SQLite: an automatic index on the key; PostgreSQL: a hash anti-join), never a scan per row.
    match = " AND ".join(f"e.{name} = s.{name}" for name in KEYS[table])
    return (f"INSERT INTO {table} ({names}) SELECT {', '.join(f's.{name}' for name in COLUMNS[table])} "
            f"FROM import_{table} s LEFT JOIN {table} e ON {match} WHERE e.{KEYS[table][0]} IS NULL ORDER BY s.line")


def holder_gone(lock: LockInfo) -> bool:
    """The lease expired, or its holder ran on this machine and is gone."""
    return not lock.live or _dead_here(lock, machine_identity())


def _dead_here(lock: LockInfo, machine: str) -> bool:
    """The holder ran on this machine (same machine id) and is gone: rebooted since, or its process ended."""
    holder_machine, _, holder_boot = lock.machine.partition(":")
    here_machine, _, here_boot = machine.partition(":")
    if holder_machine != here_machine:
        return False
    return holder_boot != here_boot or not alive(lock.pid, lock.pid_started)


def _insert(table: str, row: dict[str, Any]) -> str:
    return f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})"


def _upsert_result(rows: str = "") -> str:
    """Insert or replace a pair's row; `rows` is a SELECT giving it (default: VALUES of every column)."""
    names = COLUMNS["results"]
    updates = ", ".join(f"{name} = excluded.{name}" for name in names[3:])
    return (f"INSERT INTO results ({', '.join(names)}) {rows or 'VALUES (' + ', '.join('?' * len(names)) + ')'} "
            f"ON CONFLICT (run_id, stage_index, host) DO UPDATE SET {updates}")


def _row(record: Any) -> dict[str, Any]:
    """A record's fields as a flat dict (asdict would deep-copy every value: a third of the journal's CPU)."""
    return {f.name: getattr(record, f.name) for f in fields(record)}


def _result_row(result: ResultRecord) -> tuple:
    row = _row(result)
    row["facts"] = json.dumps(result.facts)
    return tuple(row.values())
