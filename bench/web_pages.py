"""The web pages of a big run: 1,000 hosts x 10 stages, 100,000 commands, served as `overhaul serve` serves them.

Usage (as root, from the repository): .venv/bin/python bench/web_pages.py [--hosts 1000] [--stages 10]
    [--commands 10] [--rounds 5] [--dir DIR] [--no-postgresql]
Journals the run straight into each backend (the embedded SQLite file, and a PostgreSQL server on loopback that
the bench starts itself), serves the pages from this process (uvicorn on 127.0.0.1), and times each request
(median of `--rounds`, over HTTP) beside the same run's whole document (`show --json`'s, in this process and as
/runs/ID.json). Target: the run's page (its paged matrix, 100 hosts) under a second on both backends.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time
import urllib.request
from typing import Any

import uvicorn
from backends import on_each_backend

from overhaul.documents import show_document
from overhaul.state import CommandRecord, ResultRecord, RunRecord, State
from overhaul.web.app import make_app

TARGET = 1.0  # seconds for the run's page
RUN_ID = "20261207T120000-b16b16"


def fill(state: State, hosts: int, stages: int, commands: int) -> None:
    """One finished run of `hosts` x `stages` pairs, each with `commands` commands, journaled in batches."""
    started = time.time() - 3600
    state.start_run(RunRecord(RUN_ID, "upgrade", "/runbooks/upgrade.yaml", "0" * 64, "production",
                              {"version": "1.1.0"}, "root@bench", started, started + 1800, "succeeded"))
    for stage in range(stages):
        ends = []
        for host in range(hosts):
            name = f"app{host:04d}"
            at = started + stage * 60 + host * 0.01
            ran = [CommandRecord(RUN_ID, stage, name, at + n, f"step command {n} of stage {stage}", 0, 0.05,
                                 f"/var/runs/{RUN_ID}/{stage + 1:02d}-stage-{name}.log", "bench:1") for n in range(commands)]
            ends.append((ResultRecord(RUN_ID, stage, f"stage {stage + 1}", name, "changed", 1, at, at + commands,
                                      f"changed by stage {stage + 1}"), ran))
        state.record_ends(ends)


def measure(state: State, args: argparse.Namespace) -> dict[str, float]:
    fill(state, args.hosts, args.stages, args.commands)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    try:
        timed = {name: median(lambda path=path: fetch(base + path), args.rounds)
                 for name, path in (("run page (100 hosts of the matrix)", f"/runs/{RUN_ID}"),
                                    ("run page, last hosts", f"/runs/{RUN_ID}?hosts={args.hosts // 100 - 1}"),
                                    ("history", "/history"), ("environments", "/"))}
        timed["show --json's document (in process)"] = median(lambda: show_document(state, state.run(RUN_ID)),
                                                               args.rounds)
        timed["/runs/ID.json (every command)"] = median(lambda: fetch(f"{base}/runs/{RUN_ID}.json"), args.rounds)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    return timed


def fetch(url: str) -> int:
    with urllib.request.urlopen(url, timeout=120) as response:
        return len(response.read())


def median(work: Any, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--stages", type=int, default=10)
    parser.add_argument("--commands", type=int, default=10, help="commands per (stage, host) pair")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default="/tmp", help="where the SQLite journal is made (its disk is measured)")
    parser.add_argument("--no-postgresql", action="store_true", help="measure the embedded file only")
    args = parser.parse_args()
    print(f"a run of {args.hosts} hosts x {args.stages} stages, {args.hosts * args.stages * args.commands:,} commands; "
          f"median of {args.rounds}")
    results = on_each_backend(lambda state: measure(state, args), args.dir, postgresql=not args.no_postgresql)
    for backend, timed in results.items():
        print(f"\n{backend}")
        page = timed["run page (100 hosts of the matrix)"]
        for name, seconds in timed.items():
            print(f"  {name:<40} {seconds * 1000:8.0f} ms  {seconds / page:5.2f}x the run page")
        print(f"  target: the run's page under {TARGET:.0f} s: {'met' if page < TARGET else 'MISSED'}")


if __name__ == "__main__":
    main()
