"""The embedded state backend: one SQLite file (WAL mode), safe across threads and processes.

Every journal write is its own committed transaction with `synchronous=FULL`, so a result is on disk
before the runner moves past it, even if the controller is killed or the machine loses power.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import threading
import time
from dataclasses import asdict, fields
from pathlib import Path

from overhaul.proc import alive, start_time
from overhaul.state.records import RESUMABLE, UNFINISHED, LockHeld, LockInfo, ResultRecord, RunRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, runbook TEXT, runbook_path TEXT, runbook_sha256 TEXT, environment TEXT,
    params TEXT, operator TEXT, started REAL, ended REAL, status TEXT, mutating INTEGER
);
CREATE INDEX IF NOT EXISTS runs_by_environment ON runs (environment, started);
CREATE TABLE IF NOT EXISTS results (
    run_id TEXT, stage_index INTEGER, stage TEXT, host TEXT, outcome TEXT, attempts INTEGER,
    started REAL, ended REAL, message TEXT, output_path TEXT, facts TEXT,
    PRIMARY KEY (run_id, stage_index, host)
);
CREATE TABLE IF NOT EXISTS events (at REAL, environment TEXT, run_id TEXT, kind TEXT, detail TEXT);
CREATE TABLE IF NOT EXISTS claims (key TEXT PRIMARY KEY, holder TEXT, run_id TEXT, at REAL, expires REAL);
CREATE TABLE IF NOT EXISTS locks (
    environment TEXT PRIMARY KEY, run_id TEXT, holder TEXT, hostname TEXT, pid INTEGER, pid_started INTEGER,
    acquired REAL, heartbeat REAL
);
"""

# Test hook: kill this process with SIGKILL right after the N-th journal write (crash-resume tests).
KILL_AFTER_WRITES = "OVERHAUL_TEST_KILL_AFTER_WRITES"


class SQLiteState:
    """Journal and environment locks in one SQLite file."""

    def __init__(self, path: Path | str, stale_after: float = 60.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stale_after = stale_after
        self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._writes = 0
        kill_after = os.environ.get(KILL_AFTER_WRITES)
        self._kill_after = int(kill_after) if kill_after else None

    def close(self) -> None:
        self._db.close()

    def _write(self, sql: str, args: tuple, journal: bool = True) -> None:
        with self._lock:
            self._db.execute(sql, args)  # autocommit: one durable transaction per write
            if journal:
                self._writes += 1
                if self._kill_after is not None and self._writes >= self._kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)

    # -- journal ---------------------------------------------------------------------------
    def start_run(self, run: RunRecord) -> None:
        row = asdict(run)
        row["params"] = json.dumps(run.params)
        self._write(f"INSERT INTO runs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))

    def set_status(self, run_id: str, status: str, ended: float | None = None) -> None:
        self._write("UPDATE runs SET status = ?, ended = ? WHERE id = ?", (status, ended, run_id))

    def record(self, result: ResultRecord) -> None:
        row = asdict(result)
        row["facts"] = json.dumps(result.facts)
        columns = ", ".join(row)
        self._write(f"INSERT OR REPLACE INTO results ({columns}) VALUES ({', '.join('?' * len(row))})",
                    tuple(row.values()))

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
        return self._select(RunRecord, "params", "runs", where, args)

    def results(self, run_id: str) -> list[ResultRecord]:
        return self._select(ResultRecord, "facts", "results", "WHERE run_id = ? ORDER BY stage_index, started", (run_id,))

    def _select(self, record: type, json_field: str, table: str, where: str, args: tuple) -> list:
        """Rows of `table` as `record` dataclasses, the one JSON column decoded."""
        names = [f.name for f in fields(record)]
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(names)} FROM {table} {where}", args).fetchall()
        records = []
        for row in rows:
            values = dict(zip(names, row, strict=True))
            values[json_field] = json.loads(values[json_field])
            records.append(record(**values))
        return records

    def event(self, environment: str, kind: str, detail: str, run_id: str = "") -> None:
        self._write("INSERT INTO events VALUES (?, ?, ?, ?, ?)", (time.time(), environment, run_id, kind, detail))

    def events(self, environment: str) -> list[tuple[float, str, str, str]]:
        with self._lock:
            return self._db.execute(
                "SELECT at, run_id, kind, detail FROM events WHERE environment = ? ORDER BY at", (environment,)
            ).fetchall()

    # -- claims: one run per key (e.g. per environment and night), even after the run ended ------
    def claim(self, key: str, holder: str, run_id: str, expires: float) -> dict | None:
        """Claim `key` until `expires`; return the existing claim when another run holds it."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT holder, run_id, at, expires FROM claims WHERE key = ?", (key,)).fetchone()
                if row is not None and row[3] > now:
                    self._db.execute("ROLLBACK")
                    return {"holder": row[0], "run_id": row[1], "at": row[2]}
                self._db.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?)", (key, holder, run_id, now, expires))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return None

    # -- locks -----------------------------------------------------------------------------
    def acquire(self, environment: str, run_id: str, holder: str) -> LockInfo | None:
        """Take the environment's lock; return the dead holder's lock when one was taken over.

        A holder on this machine is dead when its PID no longer runs (checked with its start time);
        a holder elsewhere is dead when its heartbeat is older than `stale_after` seconds.
        """
        now = time.time()
        pid = os.getpid()
        mine = LockInfo(environment, run_id, holder, socket.gethostname(), pid, start_time(pid), now, now)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                current = self._lock_row(environment)
                if current is not None and not self._dead(current):
                    raise LockHeld(current)
                self._db.execute("INSERT OR REPLACE INTO locks VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (
                    environment, run_id, holder, mine.hostname, pid, mine.pid_started, now, now))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if current is not None:
            self.event(environment, "lock-takeover", f"took over the lock of dead holder {current.holder} "
                       f"(pid {current.pid}, run {current.run_id})", run_id)
        return current

    def _dead(self, lock: LockInfo) -> bool:
        if lock.hostname == socket.gethostname():
            return not alive(lock.pid, lock.pid_started)
        return time.time() - lock.heartbeat > self.stale_after

    def _lock_row(self, environment: str) -> LockInfo | None:
        row = self._db.execute("SELECT * FROM locks WHERE environment = ?", (environment,)).fetchone()
        return LockInfo(*row) if row else None

    def lock(self, environment: str) -> LockInfo | None:
        with self._lock:
            return self._lock_row(environment)

    def heartbeat(self, environment: str, run_id: str) -> bool:
        """Refresh the lock's heartbeat; False when the lock is no longer ours (force-unlocked, taken over)."""
        with self._lock:
            return self._db.execute("UPDATE locks SET heartbeat = ? WHERE environment = ? AND run_id = ?",
                                    (time.time(), environment, run_id)).rowcount == 1

    def release(self, environment: str, run_id: str) -> None:
        self._write("DELETE FROM locks WHERE environment = ? AND run_id = ?", (environment, run_id), journal=False)

    def force_unlock(self, environment: str, operator: str) -> LockInfo | None:
        """Remove the lock whoever holds it; the removal is journaled."""
        current = self.lock(environment)
        if current is None:
            return None
        self._write("DELETE FROM locks WHERE environment = ?", (environment,), journal=False)
        self.event(environment, "force-unlock", f"{operator} removed the lock of {current.holder} "
                   f"(pid {current.pid}, run {current.run_id})", current.run_id)
        return current
