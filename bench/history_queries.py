"""The environment's history after months of monitoring: each question the way back asks, in milliseconds.

Usage (as root, from the repository): .venv/bin/python bench/history_queries.py [--verifies 5000] [--checks 10]
    [--dir DIR] [--no-postgresql]
Journals an upgrade, a no-op re-run of it, then `--verifies` read-only verify runs (each with `--checks` check
events), straight into the journal, for the embedded SQLite file and a PostgreSQL server on loopback that the bench
starts itself. Then times, in one process, each question of overhaul.history (median of 20) against the same answer
read the way it was read before (every run of the environment and every event, then filtered in Python), and
prints the ratio. Target: each query in milliseconds (under 10 ms), whatever the number of verify runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from backends import on_each_backend

from overhaul.history import History, find_run
from overhaul.state import ResultRecord, RunRecord, State

ENV = "production"
CHECK = '{"check": "test_farm.py::test_services", "host": "app1", "status": "passed", "message": ""}'


def fill(state: State, verifies: int, checks: int) -> tuple[str, str]:
    """An upgrade, its no-op re-run, then the monitor's verify runs; returns the two upgrade ids."""
    now = time.time() - verifies * 300 - 1000
    upgrade = RunRecord("20260101T000000-aaaaaa", "upgrade", "/r/upgrade.yaml", "0" * 64, ENV, {"version": "1.1.0"},
                        "ops", now, now + 60, "succeeded")
    rerun = RunRecord("20260101T000500-bbbbbb", "upgrade", "/r/upgrade.yaml", "0" * 64, ENV, {"version": "1.1.0"},
                      "ops", now + 300, now + 330, "succeeded")
    for record in (upgrade, rerun):
        state.start_run(record)
    backup = {"path": f"/b/pre-upgrade-1.1.0-20260101T000000Z-{upgrade.id}.sql.gz", "size": 10, "sha256": "a" * 64}
    state.record(ResultRecord(upgrade.id, 0, "backup database", "db1", "changed", 1, now, now + 1, "", "", backup))
    for host in ("db1", "worker1", "app1", "app2"):
        state.record(ResultRecord(upgrade.id, 2, "upgrade package", host, "changed", 1, now, now + 2, "", "",
                                  {"version": "1.1.0", "previous": "1.0.0"}))
        state.record(ResultRecord(rerun.id, 2, "upgrade package", host, "ok", 1, now, now + 2, "", "",
                                  {"version": "1.1.0"}))
    rows: list[dict[str, Any]] = []
    for n in range(verifies):
        run_id, at = f"20260102T{n:06d}-{n:06x}", now + 600 + n * 300
        rows.append({"table": "runs", "row": {
            "id": run_id, "runbook": "verify", "runbook_path": "/r/verify.yaml", "runbook_sha256": "0" * 64,
            "environment": ENV, "params": "{}", "operator": "monitor", "started": at, "ended": at + 5,
            "status": "succeeded", "mutating": False}})
        rows += [{"table": "events", "row": {"at": at + 1 + c / 100, "environment": ENV, "run_id": run_id,
                                             "kind": "check", "detail": CHECK}} for c in range(checks)]
    state.import_rows(rows)
    return upgrade.id, rerun.id


def scanned(state: State) -> dict[str, Callable[[], object]]:
    """The same answers read as before overhaul.history: every run and event of the environment, then Python."""
    def runs() -> list[RunRecord]:
        return state.runs(ENV, 1_000_000)

    def passed() -> list[float]:
        limited = {run_id for _, run_id, kind, _ in state.events(ENV) if kind == "limit"}
        return [r.ended or r.started for r in runs() if r.runbook == "upgrade" and r.status == "succeeded"
                and r.id not in limited and r.params.get("version") == "1.1.0"]

    def source() -> RunRecord | None:
        return next((r for r in runs() if r.runbook == "upgrade" and r.mutating and any(
            x.facts.get("previous") and x.outcome == "changed" for x in state.results(r.id))), None)

    return {"promotion evidence": passed, "expected version": passed, "rollback source": source,
            "a run by id prefix": lambda: [r for r in state.runs(None, 1_000_000) if r.id.startswith("20260101T0005")]}


def queried(state: State) -> dict[str, Callable[[], object]]:
    history = History(state, ENV)
    return {"promotion evidence": lambda: history.passed("1.1.0"), "expected version": history.expected_version,
            "rollback source": history.rollback_source,
            "a run by id prefix": lambda: find_run(state, "20260101T0005")}


def median_ms(work: Callable[[], object], repeat: int = 20) -> float:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


def measure(state: State, verifies: int, checks: int) -> dict[str, tuple[float, float]]:
    state.migrate()
    upgrade, rerun = fill(state, verifies, checks)
    history = History(state, ENV)
    assert history.rollback_source().upgrade.id == upgrade and history.expected_version() == "1.1.0"
    assert find_run(state, rerun[:17]).id == rerun
    fast, slow = queried(state), scanned(state)
    return {name: (median_ms(fast[name]), median_ms(slow[name], 3)) for name in fast}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verifies", type=int, default=5000)
    parser.add_argument("--checks", type=int, default=10, help="check events per verify run")
    parser.add_argument("--dir", default=".overhaul")
    parser.add_argument("--no-postgresql", action="store_true", help="measure the embedded file only")
    args = parser.parse_args()
    results = on_each_backend(lambda state: measure(state, args.verifies, args.checks), args.dir,
                              postgresql=not args.no_postgresql)
    print(f"an upgrade, its no-op re-run, then {args.verifies} verify runs ({args.checks} check events each); "
          "ms per question (median):")
    print(f"  {'backend':<24} {'question':<20} {'query':>9} {'scan all':>10} {'scan / query':>13}")
    for backend, numbers in results.items():
        for name, (fast, slow) in numbers.items():
            print(f"  {backend:<24} {name:<20} {fast:9.2f} {slow:10.1f} {slow / fast:12.0f}x")
    worst = max(fast for numbers in results.values() for fast, _ in numbers.values())
    print(f"target: every question under 10 ms: {'met' if worst < 10 else 'NOT met'} (slowest {worst:.2f} ms)")


if __name__ == "__main__":
    main()
