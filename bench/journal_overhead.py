"""Journal overhead per (stage, host): the two durable writes the runner makes for each pair.

Usage: .venv/bin/python bench/journal_overhead.py [--pairs 500] [--dir DIR]
Prints the median cost per pair with the journal's real setting (WAL, synchronous=FULL) beside the
same writes with synchronous=NORMAL and into an in-memory database, measured in the same process.
DIR defaults to .overhaul/ (the disk the journal really lives on).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from overhaul.state import ResultRecord, RunRecord, SQLiteState


def per_pair(state: SQLiteState, pairs: int) -> float:
    state.start_run(RunRecord("bench", "upgrade", "/dev/null", "0" * 64, "bench", {}, "bench@here", time.time()))
    samples = []
    for index in range(pairs):
        started = time.perf_counter()
        state.record(ResultRecord("bench", index % 9, f"stage {index % 9}", f"host{index}", "running",
                                  started=time.time()))
        state.record(ResultRecord("bench", index % 9, f"stage {index % 9}", f"host{index}", "changed", 1,
                                  time.time(), time.time(), "did it", "/tmp/out.log", {"size": 1234}))
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=500)
    parser.add_argument("--dir", default=".overhaul")
    args = parser.parse_args()
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        full = per_pair(SQLiteState(Path(tmp) / "full.sqlite"), args.pairs)
        normal_state = SQLiteState(Path(tmp) / "normal.sqlite")
        normal_state._db.execute("PRAGMA synchronous=NORMAL")
        normal = per_pair(normal_state, args.pairs)
        memory = per_pair(SQLiteState(":memory:"), args.pairs)
    print(f"{args.pairs} (stage, host) pairs, 2 journal writes each, median per pair:")
    print(f"  journal as shipped (WAL, synchronous=FULL): {full:6.3f} ms")
    print(f"  WAL, synchronous=NORMAL                   : {normal:6.3f} ms   FULL/NORMAL {full / normal:5.1f}x")
    print(f"  in-memory (no durability)                 : {memory:6.3f} ms   FULL/memory {full / memory:5.1f}x")
    print(f"target <= 2 ms per pair: {'met' if full <= 2 else 'NOT met'}")


if __name__ == "__main__":
    main()
