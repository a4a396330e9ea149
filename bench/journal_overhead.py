"""Journal overhead per (stage, host) pair, and the lease's round trip, for both state backends.

Usage (as root, from the repository): .venv/bin/python bench/journal_overhead.py [--pairs 500] [--hosts 50]
    [--dir DIR] [--no-postgresql]
Each pair is what the runner writes: its fenced start (the lease's token checked in the same
transaction) and its end. Measured in one process: one pair at a time (median), and `--hosts`
threads writing their pairs at once (wall time / pairs: what a stage of that many hosts pays), for
the embedded SQLite file (WAL, synchronous=FULL, on DIR's disk, default .overhaul/) and for a
PostgreSQL server on loopback that the bench starts itself (Debian's package, a throw-away cluster,
the same way the tests do). Target: <= 2 ms per pair at 50 hosts in parallel.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from backends import on_each_backend

from overhaul.state import ResultRecord, RunRecord, State


def one_pair(state: State, token: str, run_id: str, stage: int, host: str) -> None:
    state.start_pair(ResultRecord(run_id, stage, f"stage {stage}", host, "running", started=time.time()), "bench", token)
    state.record(ResultRecord(run_id, stage, f"stage {stage}", host, "changed", 1, time.time(), time.time(), "did it",
                              "/tmp/out.log", {"size": 1234}))


def measure(state: State, pairs: int, hosts: int) -> dict[str, float]:
    run_id = f"bench-{time.time_ns()}"
    lease, _ = state.acquire("bench", run_id, "bench@here")
    state.start_run(RunRecord(run_id, "upgrade", "/dev/null", "0" * 64, "bench", {}, "bench@here", time.time()))
    samples = []
    for index in range(pairs):
        started = time.perf_counter()
        one_pair(state, lease.token, run_id, 0, f"host{index}")
        samples.append(time.perf_counter() - started)
    started = time.perf_counter()
    with ThreadPoolExecutor(hosts) as pool:
        list(pool.map(lambda index: one_pair(state, lease.token, run_id, 1 + index // hosts, f"host{index % hosts}"),
                      range(pairs)))
    parallel = (time.perf_counter() - started) / pairs
    state.release(lease)
    trips = []
    for _ in range(100):
        started = time.perf_counter()
        lease, _ = state.acquire("bench", run_id, "bench@here")
        state.release(lease)
        trips.append(time.perf_counter() - started)
    return {"serial": statistics.median(samples) * 1000, "parallel": parallel * 1000,
            "lease": statistics.median(trips) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=500)
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--dir", default=".overhaul")
    parser.add_argument("--no-postgresql", action="store_true", help="measure the embedded file only")
    args = parser.parse_args()
    results = on_each_backend(lambda state: measure(state, args.pairs, args.hosts), args.dir,
                              "sqlite (WAL, synchronous=FULL)", postgresql=not args.no_postgresql)
    print(f"{args.pairs} (stage, host) pairs, a fenced start and an end each; ms per pair:")
    print(f"  {'backend':<32} {'one at a time':>14} {f'{args.hosts} hosts at once':>18} {'lease round trip':>17}")
    for name, numbers in results.items():
        print(f"  {name:<32} {numbers['serial']:14.3f} {numbers['parallel']:18.3f} {numbers['lease']:17.3f}")
    for name, numbers in results.items():
        verdict = "met" if numbers["parallel"] <= 2 else "NOT met"
        print(f"target <= 2 ms per pair at {args.hosts} hosts in parallel, {name}: {verdict}")


if __name__ == "__main__":
    main()
