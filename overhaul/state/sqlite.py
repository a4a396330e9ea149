"""The embedded state backend: one SQLite file (WAL mode), safe across threads and processes.

Every journal write is committed with `synchronous=FULL` before its call returns, so a result is on disk
before the runner moves past it, even if the controller is killed or the machine loses power. The pairs'
writes of concurrent workers share a transaction, one disk sync for them all (group commit: overhaul.state.sql).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from overhaul.files import FILE_MODE, create_private, private_dir, tighten
from overhaul.state.records import StateError
from overhaul.state.sql import KILL_AFTER_WRITES, Execute, SQLState

__all__ = ["KILL_AFTER_WRITES", "SQLiteState"]
T = TypeVar("T")


class SQLiteState(SQLState):
    """Journal and environment leases in one SQLite file."""

    now = "((julianday('now') - 2440587.5) * 86400.0)"

    def __init__(self, path: Path | str, lease: float = 60.0):
        super().__init__(lease)
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        try:
            self._create_private()
            self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
        except (sqlite3.Error, OSError) as exc:
            raise StateError(f"the journal {self.path}: {exc}") from None
        self._lock = threading.Lock()
        self.ensure_schema(migrate=True)  # one team member's own file: always brought up to date

    def _create_private(self) -> None:
        """The journal's folder 0700 and its file 0600 before SQLite opens it: SQLite makes the -wal and -shm
        files with the database file's mode. Overhaul's own `.overhaul` folder, and files of an older Overhaul
        (0755 and 0644), are tightened; a folder the operator named (OVERHAUL_JOURNAL) is left as it is."""
        folder = self.path.parent
        private_dir(folder, tighten_existing=folder.name == ".overhaul")
        create_private(self.path)
        for suffix in ("-wal", "-shm", "-journal"):
            tighten(f"{self.path}{suffix}", FILE_MODE)

    def close(self) -> None:
        self._db.close()

    def _transaction(self, work: Callable[[Execute], T]) -> T:
        def execute(sql: str, args: tuple) -> tuple[int, list[tuple]]:
            cursor = self._db.execute(sql, args)
            rows = cursor.fetchall()  # first: with RETURNING, rowcount counts the rows fetched
            return cursor.rowcount, rows

        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    done = work(execute)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StateError(f"the journal {self.path}: {exc}") from None
            return done
