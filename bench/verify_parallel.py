"""`verify` checks across hosts: one pytest session for every host vs one session per host.

Usage (as root, from the repository): .venv/bin/python bench/verify_parallel.py [--large 12] [--checks checks]
Starts labs on 127.51.0.x (torn down afterwards); runs the checks folder on every host as one pytest
session (the default) and as one session per host (the way it was done before), in the same process,
and prints the wall times and their ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from overhaul.lab import Lab
from overhaul.verification import run_checks


def timed(env: str, hosts_dir: str, checks: Path, hosts: list[str], processes: int) -> tuple[float, int]:
    started = time.perf_counter()
    cases = run_checks(env, hosts_dir, checks, hosts, processes)
    assert all(case.status == "passed" for case in cases), [c for c in cases if c.status != "passed"]
    return time.perf_counter() - started, len(cases)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", type=int, default=12, help="hosts in the larger lab (default 12)")
    parser.add_argument("--checks", default="checks")
    args = parser.parse_args()
    checks = Path(args.checks).resolve()
    for size in (4, args.large):
        with tempfile.TemporaryDirectory() as tmp:
            lab = Lab(home=Path(tmp) / "lab", inventory=Path(tmp) / "hosts/lab.yaml", subnet="127.51.0",
                      log=lambda _: None)
            lab.up(size)
            try:
                hosts = [host.name for host in lab.hosts()]
                one, cases = timed("lab", str(Path(tmp) / "hosts"), checks, hosts, 1)
                per_host, _ = timed("lab", str(Path(tmp) / "hosts"), checks, hosts, len(hosts))
                print(f"{size:>3} hosts, {cases:>3} (check, host) cases: one session {one:6.2f} s, "
                      f"one session per host {per_host:6.2f} s  -> one session is {per_host / one:4.1f}x faster")
            finally:
                lab.down()


if __name__ == "__main__":
    main()
