"""Warm per-command latency: Overhaul's transport vs plain Fabric vs a raw paramiko loop, same host, same run.

Usage (as root, from the repository): .venv/bin/python bench/transport_latency.py [--commands 200]
Starts a one-host lab on 127.50.0.1 (torn down afterwards) and prints medians and ratios.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import fabric
import paramiko

from overhaul.inventory import load_inventory_file
from overhaul.lab import Lab
from overhaul.transport import Transport


def measure(label: str, command: Callable[[], object], count: int) -> float:
    for _ in range(10):  # warm up: connection open, caches filled
        command()
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        command()
        samples.append(time.perf_counter() - started)
    median = statistics.median(samples) * 1000
    print(f"{label:<44} median {median:7.2f} ms   p90 {statistics.quantiles(samples, n=10)[-1] * 1000:7.2f} ms")
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lab = Lab(home=Path(tmp) / "lab", inventory=Path(tmp) / "hosts/lab.yaml", subnet="127.50.0", log=lambda _: None)
        lab.up(1)
        try:
            inventory = load_inventory_file(lab.inventory)
            address = inventory.hosts[0].address

            raw = paramiko.SSHClient()
            raw.load_host_keys(str(lab.known_hosts))
            raw.connect(address, username="root", key_filename=str(lab.key_file), look_for_keys=False, allow_agent=False)

            fast = paramiko.SSHClient()
            fast.load_host_keys(str(lab.known_hosts))
            sock = socket.create_connection((address, 22))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            fast.connect(address, username="root", key_filename=str(lab.key_file), look_for_keys=False,
                         allow_agent=False, sock=sock)

            def loop(client: paramiko.SSHClient, command: str = "true") -> None:
                _, out, _ = client.exec_command(command)
                out.read()
                out.channel.recv_exit_status()

            plain = fabric.Connection(address, user="root", connect_kwargs={"key_filename": str(lab.key_file)})
            transport = Transport(inventory)
            host = transport.host(inventory.hosts[0].name)

            print(f"{args.commands} warm commands (`true`) on one lab host\n")
            ours = measure("overhaul RemoteHost.run (timeout-wrapped)", lambda: host.run("true"), args.commands)
            fab = measure("fabric Connection.run (defaults)", lambda: plain.run("true", hide=True, in_stream=False),
                          args.commands)
            paramiko_ms = measure("raw paramiko exec_command loop", lambda: loop(raw), args.commands)
            nodelay_ms = measure("raw paramiko loop + TCP_NODELAY", lambda: loop(fast), args.commands)
            wrapped_ms = measure("raw paramiko + TCP_NODELAY, same timeout wrap",
                                 lambda: loop(fast, "timeout -k 5 300 sh -c true"), args.commands)
            print(f"\nraw paramiko / overhaul            : {paramiko_ms / ours:5.2f}x")
            print(f"fabric / overhaul                  : {fab / ours:5.2f}x")
            print(f"overhaul / raw+NODELAY, same wrap  : {ours / wrapped_ms:5.2f}x  (transport overhead)")
            print(f"overhaul / raw+NODELAY, bare `true`: {ours / nodelay_ms:5.2f}x  (includes the kill-on-timeout wrap)")
            raw.close()
            fast.close()
            plain.close()
            transport.close()
        finally:
            lab.down()


if __name__ == "__main__":
    main()
