"""Journal overhead per (stage, host) pair, and the lease's round trip, for both state backends.

Usage (as root, from the repository): .venv/bin/python bench/journal_overhead.py [--pairs 1000] [--workers 100]
    [--rounds 3] [--dir DIR] [--no-postgresql]
Each pair is what a mutating run writes: its fenced start (the lease's token checked in the same transaction)
and its fenced end. Measured in one process: one pair at a time (median), and `--workers` threads writing
`--pairs` pairs back to back (wall time / pairs: the journal's cost per pair when that many workers write at
once), the way the runner wrote them before group commit (each write a transaction of its own, one at a time
under the runner's listener lock: `max_group = 1` and a lock) and with it (no lock: the writes waiting at once
share a transaction), interleaved for `--rounds`
rounds (medians). For the embedded SQLite file (WAL, synchronous=FULL, on DIR's disk, default .overhaul/) and a
PostgreSQL server on loopback that the bench starts itself (Debian's package, a throw-away cluster with its
default fsync and synchronous_commit, the way the tests start it). Targets: with group commit, at most 0.3 ms
per pair on SQLite and 1 ms on PostgreSQL under 100 concurrent workers.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

from backends import on_each_backend

from overhaul.execution import LockKeeper
from overhaul.state import ResultRecord, RunRecord, State
from overhaul.state.sql import MAX_GROUP

TARGETS = {"sqlite": 0.3, "postgresql": 1.0}  # ms per pair under 100 concurrent workers, with group commit


def one_pair(state: State, token: str, run_id: str, stage: int, host: str, waits: list[float] | None = None,
             listening: threading.Lock | None = None) -> None:
    """A pair's two writes, as the journal makes them (each under `listening`, as the runner's listener lock held
    them before group commit); each write's wait appended to `waits`."""
    fence = ("bench", token)
    started = time.perf_counter()
    with listening or nullcontext():
        state.start_pair(ResultRecord(run_id, stage, f"stage {stage}", host, "running", started=time.time()), *fence)
    between = time.perf_counter()
    with listening or nullcontext():
        state.record(ResultRecord(run_id, stage, f"stage {stage}", host, "changed", 1, time.time(), time.time(),
                                  "did it", "/tmp/out.log", {"size": 1234}), fence=fence)
    if waits is not None:
        waits += [between - started, time.perf_counter() - between]


def at_once(state: State, token: str, run_id: str, stage: int, pairs: int, workers: int,
            grouped: bool) -> tuple[float, float]:
    """`pairs` pairs written by `workers` threads at once: (ms per pair, median ms a write waits)."""
    state.max_group = MAX_GROUP if grouped else 1  # type: ignore[attr-defined]
    listening = None if grouped else threading.Lock()
    waits: list[float] = []
    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda index: one_pair(state, token, run_id, stage, f"host{index}", waits, listening),
                      range(pairs)))
    return (time.perf_counter() - started) / pairs * 1000, statistics.median(waits) * 1000


def measure(state: State, pairs: int, workers: int, rounds: int) -> dict[str, float]:
    run_id = f"bench-{time.time_ns()}"
    samples: list[float] = []
    before: list[float] = []
    after: list[float] = []
    before_wait: list[float] = []
    after_wait: list[float] = []
    with LockKeeper(state, "bench", run_id) as keeper:  # the lease, renewed as a run's is (a round may outlast it)
        assert keeper.lease is not None
        token = keeper.lease.token
        state.start_run(RunRecord(run_id, "upgrade", "/dev/null", "0" * 64, "bench", {}, "bench@here", time.time()))
        for index in range(min(pairs, 300)):
            started = time.perf_counter()
            one_pair(state, token, run_id, 0, f"host{index}")
            samples.append(time.perf_counter() - started)
        for round_ in range(rounds):
            per_pair, wait = at_once(state, token, run_id, 1 + 2 * round_, pairs, workers, grouped=False)
            before.append(per_pair)
            before_wait.append(wait)
            per_pair, wait = at_once(state, token, run_id, 2 + 2 * round_, pairs, workers, grouped=True)
            after.append(per_pair)
            after_wait.append(wait)
    trips = []
    for _ in range(100):
        started = time.perf_counter()
        lease, _ = state.acquire("bench", run_id, "bench@here")
        state.release(lease)
        trips.append(time.perf_counter() - started)
    return {"serial": statistics.median(samples) * 1000, "before": statistics.median(before),
            "after": statistics.median(after), "before_wait": statistics.median(before_wait),
            "after_wait": statistics.median(after_wait), "lease": statistics.median(trips) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=".overhaul")
    parser.add_argument("--no-postgresql", action="store_true", help="measure the embedded file only")
    args = parser.parse_args()
    results = on_each_backend(lambda state: measure(state, args.pairs, args.workers, args.rounds), args.dir,
                              "sqlite (WAL, synchronous=FULL)", postgresql=not args.no_postgresql)
    print(f"{args.pairs} (stage, host) pairs, a fenced start and a fenced end each, {args.workers} workers at once "
          f"(median of {args.rounds} interleaved rounds); ms per pair (wall time / pairs):")
    print(f"  {'backend':<32} {'one at a time':>13} {'before':>8} {'after':>8} {'before/after':>12} "
          f"{'write waits before':>18} {'after':>7} {'lease round trip':>16}")
    for name, n in results.items():
        print(f"  {name:<32} {n['serial']:13.3f} {n['before']:8.3f} {n['after']:8.3f} {n['before'] / n['after']:11.1f}x "
              f"{n['before_wait']:18.3f} {n['after_wait']:7.3f} {n['lease']:16.3f}")
    print("  (before: each write a transaction of its own, one at a time, as the runner wrote them; after: group "
          "commit.\n   write waits: the median time a worker waits for one of its writes to be durable)")
    for name, n in results.items():
        target = TARGETS["sqlite" if name.startswith("sqlite") else "postgresql"]
        verdict = "met" if n["after"] <= target else "NOT met"
        print(f"target <= {target:g} ms per pair under {args.workers} workers, {name}: {n['after']:.3f} ms, {verdict}")


if __name__ == "__main__":
    main()
