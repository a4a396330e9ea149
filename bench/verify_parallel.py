"""`verify` checks across hosts: one host at a time vs in parallel, on a 4-host lab and a larger one.

Usage (as root, from the repository): .venv/bin/python bench/verify_parallel.py [--large 12] [--checks checks]
Starts labs on 127.51.0.x (torn down afterwards); runs the checks folder on every host with
concurrency 1 and 8 in the same process and prints the wall times and their ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from overhaul.lab import Lab
from overhaul.verification import run_checks


def timed(env: str, hosts_dir: str, checks: Path, hosts: list[str], concurrency: int) -> tuple[float, int]:
    started = time.perf_counter()
    cases = run_checks(env, hosts_dir, checks, hosts, concurrency)
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
                serial, cases = timed("lab", str(Path(tmp) / "hosts"), checks, hosts, 1)
                parallel, _ = timed("lab", str(Path(tmp) / "hosts"), checks, hosts, 8)
                print(f"{size:>3} hosts, {cases:>3} (check, host) cases: one host at a time {serial:6.2f} s, "
                      f"8 at a time {parallel:6.2f} s  -> {serial / parallel:4.1f}x faster")
            finally:
                lab.down()


if __name__ == "__main__":
    main()
