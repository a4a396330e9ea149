"""The two state backends a journal benchmark measures in one process: the embedded SQLite file (in a temporary
folder of DIR, on its disk) and a throw-away PostgreSQL cluster on loopback, started the way the tests do."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from overhaul.state import SQLiteState, State

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
T = TypeVar("T")


def on_each_backend(measure: Callable[[State], T], directory: str, sqlite: str = "sqlite",
                    postgresql: bool = True) -> dict[str, T]:
    """`measure` run on a fresh journal of each backend: {backend's label: what it returned}."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        state = SQLiteState(Path(tmp) / "journal.sqlite")
        results[sqlite] = measure(state)
        state.close()
    if postgresql:
        from pgserver import PgServer

        from overhaul.state.postgresql import PostgresState

        server = PgServer()
        try:
            state = PostgresState(server.database(), server.password)
            results["postgresql on 127.0.0.1"] = measure(state)
            state.close()
        finally:
            server.close()
    return results
