"""`overhaul state.import` at 10,000 and at 40,000 rows: does four times the rows take four times as long?

Usage (as root, from the repository): .venv/bin/python bench/state_import.py [--rows 10000] [--factor 4]
    [--dir DIR] [--no-postgresql]
Writes two exports of a journal of upgrade runs (per run: its row, four pairs, four commands, one event), of
--rows and of --rows x --factor rows, and imports each the way `overhaul state.import` does (read a line at a
time, each row validated, one transaction), into an empty journal and then again into the same one (every
row there already: nothing added), for the embedded SQLite file (on DIR's disk, default .overhaul/) and for
a PostgreSQL server on loopback that the bench starts itself (as the tests do). It prints the seconds and the
ratio large/small: about --factor when the import is linear, about --factor squared when it is quadratic
(the import this replaced took 89 s for 20,000 events and did not finish 250,000 in 300 s).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from overhaul.state import SQLiteState, State
from overhaul.state.exported import Reader

T0 = 1_800_000_000.0


def write_export(path: Path, rows: int) -> Path:
    """An export of rows // 10 upgrade runs, ten rows each."""
    with path.open("w") as out:
        def line(table: str, row: dict) -> None:
            out.write(json.dumps({"table": table, "row": row}) + "\n")

        runs = range(rows // 10)
        for n in runs:
            line("runs", {"id": f"run-{n}", "runbook": "upgrade", "runbook_path": "/srv/ops/runbooks/upgrade.yaml",
                          "runbook_sha256": "ab" * 32, "environment": "production", "params": '{"version": "1.1.0"}',
                          "operator": "ops@controller", "started": T0 + n * 60, "ended": T0 + n * 60 + 50,
                          "status": "succeeded", "mutating": True})
        for n in runs:
            for stage in range(4):
                line("results", {"run_id": f"run-{n}", "stage_index": stage, "stage": f"stage {stage}", "host": "db1",
                                 "outcome": "changed", "attempts": 1, "started": T0 + n * 60 + stage,
                                 "ended": T0 + n * 60 + stage + 1, "message": "done", "output_path": "/srv/out.log",
                                 "facts": '{"backup": "/var/backups/all.sql.gz"}'})
        for n in runs:
            line("events", {"at": T0 + n * 60 + 49, "environment": "production", "run_id": f"run-{n}",
                            "kind": "check", "detail": json.dumps({"check": "test_ports", "host": "db1",
                                                                   "status": "passed", "message": ""})})
        for n in runs:
            for stage in range(4):
                line("commands", {"run_id": f"run-{n}", "stage_index": stage, "host": "db1",
                                  "at": T0 + n * 60 + stage, "command": "app-ctl reconfigure", "exit_code": 0,
                                  "duration": 0.25, "log_path": "/srv/runs/db1.log", "machine": "controller:boot"})
    return path


def timed_import(state: State, path: Path) -> tuple[float, int]:
    started = time.perf_counter()
    with path.open("rb") as stream:
        added = state.import_rows(Reader(stream, str(path)))
    return time.perf_counter() - started, added


def measure(open_state: Callable[[str], State], exports: dict[int, Path]) -> dict[int, tuple[float, float]]:
    """Per size: seconds to import into an empty journal, and to import the same again."""
    seconds = {}
    for rows, path in exports.items():
        state = open_state(f"rows{rows}")
        fresh, added = timed_import(state, path)
        assert added == rows, (added, rows)
        again, added = timed_import(state, path)
        assert added == 0, added
        seconds[rows] = (fresh, again)
        state.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--dir", default=".overhaul")
    parser.add_argument("--no-postgresql", action="store_true", help="measure the embedded file only")
    args = parser.parse_args()
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    sizes = [args.rows // 10 * 10, args.rows * args.factor // 10 * 10]
    results = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        exports = {rows: write_export(Path(tmp) / f"export-{rows}.jsonl", rows) for rows in sizes}
        results["sqlite (WAL, synchronous=FULL)"] = measure(
            lambda name: SQLiteState(Path(tmp) / name / "journal.sqlite"), exports)
        if not args.no_postgresql:
            from pgserver import PgServer

            from overhaul.state.postgresql import PostgresState

            server = PgServer()
            try:
                results["postgresql on 127.0.0.1"] = measure(
                    lambda name: PostgresState(server.database(), server.password), exports)
            finally:
                server.close()
    small, large = sizes
    print(f"state.import of {small:,} and {large:,} rows (runs, pairs, events, commands); seconds, and the ratio "
          f"{large:,}/{small:,} (linear: about {args.factor}; quadratic: about {args.factor ** 2}):")
    print(f"  {'backend':<32} {'import':<8} {f'{small:,} rows':>11} {f'{large:,} rows':>11} {'ratio':>7}")
    for name, seconds in results.items():
        for index, what in enumerate(("fresh", "again")):
            ratio = seconds[large][index] / seconds[small][index]
            print(f"  {name:<32} {what:<8} {seconds[small][index]:11.2f} {seconds[large][index]:11.2f} {ratio:7.2f}")


if __name__ == "__main__":
    main()
