"""The team backend: PostgreSQL through psycopg 3 and a connection pool.

One journal, one lease per environment and one history for every operator and CI runner. The clock
of the lease is the database's, so controllers with skewed clocks still agree on who holds it. A
database that goes away (restart, failover) is waited for with backoff for `retry_for` seconds; then
the operation fails with StateError and a run stops as interrupted, resumable.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from overhaul.state.records import StateError, StateSettingError
from overhaul.state.sql import Execute, SQLState

T = TypeVar("T")
logging.getLogger("psycopg.pool").addHandler(logging.NullHandler())  # its reconnect attempts: ours are told once
MIGRATION_LOCK = 0x0E4A11  # pg_advisory_xact_lock key: one migrating controller at a time


def printable(conninfo: str) -> str:
    """The database as a URL without its password, as it may be printed."""
    parts = {key: value for key, value in conninfo_to_dict(conninfo).items() if key != "password"}
    user = f"{parts.pop('user')}@" if parts.get("user") else ""
    where = f"{parts.pop('host', '')}" + (f":{parts.pop('port')}" if parts.get("port") else "")
    url = f"postgresql://{user}{where}/{parts.pop('dbname', '')}"
    return url + ("?" + urllib.parse.urlencode(parts) if parts else "")


class PostgresState(SQLState):
    """Journal and environment leases in a PostgreSQL database (schema created and migrated by Overhaul)."""

    now = "extract(epoch from clock_timestamp())::float8"
    for_share = "FOR SHARE"

    def __init__(self, conninfo: str, password: str | None = None, *, lease: float = 60.0, retry_for: float = 60.0,
                 max_connections: int = 16, migrate: bool = False):
        super().__init__(lease)
        if "password" in conninfo_to_dict(conninfo):
            raise StateSettingError("the state database's password must not be in its URL (it gets printed and logged): "
                             "give it by reference (state: {url: ..., password: {file: PATH}}), or in ~/.pgpass")
        self.url = printable(conninfo)
        self.retry_for = retry_for
        extra: dict[str, Any] = {"autocommit": True}
        if password is not None:
            extra["password"] = password
        self._pool = ConnectionPool(conninfo, kwargs=extra, min_size=1, max_size=max_connections, open=False,
                                    timeout=min(10.0, max(retry_for, 1.0)), name="overhaul-state")
        self._pool.open(wait=False)
        self.ensure_schema(migrate=migrate)

    def close(self) -> None:
        self._pool.close()

    def _transaction(self, work: Callable[[Execute], T]) -> T:
        def attempt() -> T:
            with self._pool.connection() as conn, conn.transaction():
                def execute(sql: str, args: tuple) -> tuple[int, list[tuple]]:
                    cursor = conn.execute(sql.replace("?", "%s"), args, prepare=True)
                    return cursor.rowcount, cursor.fetchall() if cursor.description else []
                return work(execute)

        retrying = Retrying(retry=retry_if_exception_type((psycopg.OperationalError, PoolTimeout)),
                            wait=wait_exponential(multiplier=0.2, max=5), stop=stop_after_delay(self.retry_for),
                            reraise=True)
        try:
            return retrying(attempt)
        except (psycopg.Error, PoolTimeout) as exc:
            raise StateError(f"the state database {self.url}: {str(exc).strip() or type(exc).__name__}") from None

    def _lock_schema(self, execute: Execute) -> None:
        execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
