"""What the preflight gate costs, and what a no-op upgrade costs, each as a ratio to one `verify`.

Usage (as root, from the repository): .venv/bin/python bench/preflight_cost.py [--sizes 4 50] [--rounds 5]
Starts a lab per size on 127.52.0.x (torn down afterwards) and upgrades it to 1.1.0 once. Then each
round, in the same process and interleaved: the built-in verify runbook, the upgrade runbook's
preflight alone, and a whole no-op upgrade (gate, lock, journal, every stage finding its work done),
each over fresh connections (connecting included). Prints min / median per side and the median of
the per-round ratios to verify.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from overhaul.execution import Execution, Gate
from overhaul.inventory import load_inventory_file
from overhaul.lab import Lab
from overhaul.plan import Plan, build_plan
from overhaul.preflight import run_preflight
from overhaul.runbook import load_runbook
from overhaul.runner import Runner
from overhaul.state import SQLiteState
from overhaul.step import Registry
from overhaul.transport import Transport


def timed_verify(plan: Plan) -> float:
    transport = Transport(plan.inventory)
    started = time.perf_counter()
    try:
        transport.connect(plan.hosts)
        result = Runner(plan, transport).run()
    finally:
        transport.close()
    assert not result.failed, [r.message for r in result.results if r.outcome.value == "failed"]
    return time.perf_counter() - started


def timed_preflight(plan: Plan) -> float:
    transport = Transport(plan.inventory)
    started = time.perf_counter()
    try:
        report = run_preflight(plan, transport, "bench")
    finally:
        transport.close()
    assert report.ok, report.refusals
    return time.perf_counter() - started


def timed_upgrade(plan: Plan, state: SQLiteState) -> float:
    started = time.perf_counter()
    result = Execution(plan, state=state, gate=Gate()).run()
    assert not result.failed and not result.refused, result.refused
    return time.perf_counter() - started


def line(label: str, times: list[float], verifies: list[float]) -> str:
    ratio = statistics.median(t / v for t, v in zip(times, verifies, strict=True))
    return f"{label} min {min(times):5.2f} s median {statistics.median(times):5.2f} s ({ratio:4.2f}x verify)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 50], help="lab sizes (default 4 50)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            lab = Lab(home=Path(tmp) / "lab", inventory=Path(tmp) / "hosts/lab.yaml", subnet="127.52.0",
                      log=lambda _: None)
            lab.up(size)
            try:
                inventory = load_inventory_file(lab.inventory)
                verify = build_plan(load_runbook("verify"), inventory, Registry(), {})
                upgrade = build_plan(load_runbook("upgrade"), inventory, Registry(), {"version": "1.1.0"})
                timed_preflight(upgrade)  # warm: apt's caches and the page cache, for every side alike
                state = SQLiteState(Path(tmp) / "journal.sqlite")
                timed_upgrade(upgrade, state)  # the real upgrade, 1.0.0 -> 1.1.0; every later one is a no-op
                verifies, preflights, noops = [], [], []
                for _ in range(args.rounds):
                    verifies.append(timed_verify(verify))
                    preflights.append(timed_preflight(upgrade))
                    noops.append(timed_upgrade(upgrade, state))
                print(f"{size:>3} hosts, {args.rounds} rounds: verify min {min(verifies):5.2f} s median "
                      f"{statistics.median(verifies):5.2f} s | {line('upgrade preflight', preflights, verifies)} | "
                      f"{line('no-op upgrade', noops, verifies)}")
            finally:
                lab.down()


if __name__ == "__main__":
    main()
