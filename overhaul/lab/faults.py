"""Fault injection on lab hosts, for tests and rehearsals. Every fault has its undo.

Faults act from outside the host (nsenter, signals, /proc/PID/root), so they work even when the
host's sshd is down or the host is frozen.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from overhaul.lab import package
from overhaul.lab.host import DATA_MOUNT, LabHost
from overhaul.proc import process_state

FILL_FILE = "overhaul-lab-fill"
BROKEN_DIR = "/opt/scalr-server/var/broken"


def stop_sshd(host: LabHost) -> None:
    """Kill the host's sshd (listener and sessions): connections are refused until start_sshd."""
    host.exec("pkill -KILL -x sshd; while pgrep -x sshd >/dev/null; do sleep 0.05; done")


def start_sshd(host: LabHost) -> None:
    host.exec("mkdir -p /run/sshd && /usr/sbin/sshd")
    host.wait_for_sshd()


def freeze(host: LabHost) -> None:
    """SIGSTOP every process of the host: TCP still connects (the kernel answers) but nothing replies."""
    deadline = time.monotonic() + 10
    while True:  # repeat: a process may fork, or take a moment to stop
        running = [pid for pid in host.processes() if process_state(pid) not in ("T", "Z", None)]
        if not running:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"lab: could not freeze {host.name}: pids {running} still run")
        for pid in running:
            _signal(pid, signal.SIGSTOP)
        time.sleep(0.02)


def thaw(host: LabHost) -> None:
    for pid in host.processes():
        _signal(pid, signal.SIGCONT)


def break_service(host: LabHost, program: str) -> None:
    """Kill one supervised program and make it fail to start again (supervisord gives up: FATAL)."""
    host.exec(f"mkdir -p {BROKEN_DIR} && touch {BROKEN_DIR}/{program}")
    host.exec(f"kill -KILL $(scalr-server-manage pid {program})")
    deadline = time.monotonic() + 30
    while (state := _program_state(host, program)) != "FATAL":  # supervisord has given up: a stable state
        if time.monotonic() > deadline:
            raise RuntimeError(f"lab: {program} on {host.name} is {state}, not FATAL")
        time.sleep(0.1)


def repair_service(host: LabHost, program: str) -> None:
    """Undo break_service: the program starts again and is RUNNING when this returns."""
    host.exec(f"rm -f {BROKEN_DIR}/{program}")
    deadline = time.monotonic() + 20
    while (state := _program_state(host, program)) != "RUNNING":
        if time.monotonic() > deadline:
            raise RuntimeError(f"lab: {program} on {host.name} is {state}, not RUNNING")
        if state in ("FATAL", "EXITED", "STOPPED"):
            host.exec(f"scalr-server-manage start {program}", check=False)
        time.sleep(0.1)


def _program_state(host: LabHost, program: str) -> str:
    fields = host.exec(f"scalr-server-manage status {program}", check=False).stdout.split()
    return fields[1] if len(fields) > 1 else "UNKNOWN"


def fill_data(host: LabHost, percent: float) -> None:
    """Fill the host's data mount until it is at least `percent` % used (as df counts it)."""
    mount = host.path(DATA_MOUNT)
    fill = mount / FILL_FILE
    stat = os.statvfs(mount)
    total = stat.f_blocks * stat.f_frsize
    used = (stat.f_blocks - stat.f_bfree) * stat.f_frsize
    existing = fill.stat().st_size if fill.exists() else 0
    wanted = int(total * percent / 100) - (used - existing) + stat.f_frsize
    with open(fill, "wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, max(wanted, 1))


def clear_data(host: LabHost) -> None:
    (host.path(DATA_MOUNT) / FILL_FILE).unlink(missing_ok=True)


def publish_broken_package(repo: Path, version: str = "1.1.1", roles: tuple[str, ...] = ()) -> None:
    """Serve a scalr-server `version` whose installation fails (its post-install script exits 1), on every host or
    only on the hosts of `roles` (a package broken on one tier)."""
    package.publish_broken(repo, version, roles)


def unpublish_package(repo: Path, version: str = "1.1.1") -> None:
    package.unpublish(repo, version)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
