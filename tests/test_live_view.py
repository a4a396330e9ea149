"""The live view on a real terminal (tmux) during a real upgrade of a lab: what is running now, within the screen.

A run of `overhaul upgrade` is started in a tmux pane of 80x24 (and of 160x50 with -v); the pane is read over and
over while it runs (`capture-pane`), then its whole scrollback after. Each host's line shows the command running
now as the step wrote it (never the engine's lock wrapper or its probe reads), every line of the live view fits
the pane, and no frame of it is left behind in the scrollback.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

from overhaul.context import MARK

WRAPPERS = ("flock", "timeout -k", "/var/lib/overhaul/locks", "sudo -", "rc=$?")
LIVE_HOST = re.compile(r"^  (db1|worker1|app1) +[0-9.ms]+s  ")  # a running host's line (finished: 3 spaces)
LIVE_HEAD = re.compile(r"^(stage \d+ .*: \d+/\d+ done, |preflight: \d+/\d+ hosts checked)")


class Pane:
    """A tmux server of the test's own (its own socket) with one pane of `width` x `height` running `command`."""

    def __init__(self, tmp_path: Path, width: int, height: int, command: str):
        self.socket, self.done = f"overhaul-test-{uuid.uuid4().hex[:8]}", tmp_path / "exit-code"
        script = f"{command}; echo $? > {shlex.quote(str(self.done))}; exec sleep 3600"
        self.tmux("new-session", "-d", "-x", str(width), "-y", str(height), "-c", str(tmp_path), "sh", "-c", script)

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args], check=True, capture_output=True,
                              text=True).stdout

    def screen(self) -> list[str]:
        """What the pane shows now, a line wrapped by the terminal joined back (-J): as wide as it was written."""
        return self.tmux("capture-pane", "-p", "-J").splitlines()

    def scrollback(self) -> list[str]:
        return self.tmux("capture-pane", "-p", "-J", "-S", "-", "-E", "-").splitlines()

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def watch_upgrade(lab, tmp_path: Path, width: int, height: int, *flags: str) -> tuple[list[list[str]], list[str], int]:
    """Upgrade the lab to 1.1.0 in a pane of `width` x `height`: (every screen seen while it ran, the scrollback after
    it, its exit code)."""
    # (-u COLUMNS -u LINES: pytest's readline puts the size of pytest's own terminal in the process environment)
    command = shlex.join(["env", "-u", "NO_COLOR", "-u", "COLUMNS", "-u", "LINES",
                          f"OVERHAUL_JOURNAL={tmp_path / 'journal.sqlite'}", "TERM=xterm", sys.executable, "-m",
                          "overhaul", "upgrade", "--env", "lab", "--version", "1.1.0", "--yes",
                          "--hosts-dir", str(lab.inventory.parent), *flags])
    pane = Pane(tmp_path, width, height, command)
    screens: list[list[str]] = []
    try:
        deadline = time.monotonic() + 600
        while not pane.done.exists():
            assert time.monotonic() < deadline, "\n".join(screens[-1] if screens else [])
            screens.append(pane.screen())
            time.sleep(0.05)
        while not pane.done.read_text().strip():
            time.sleep(0.05)
        return screens, pane.scrollback(), int(pane.done.read_text())
    finally:
        pane.close()


def running_lines(screens: list[list[str]]) -> list[str]:
    return [line for screen in screens for line in screen if LIVE_HOST.match(line)]


def check_the_view(screens: list[list[str]], scrollback: list[str], width: int, height: int) -> None:
    """What holds at any size: no probe marks, no wrapper, every live line within the pane, no frame left behind,
    each finished host's line once, and the run's verdict last."""
    seen = [line for screen in screens for line in screen]
    assert not [line for line in seen + scrollback if MARK in line]
    live = [line for line in seen if LIVE_HOST.match(line) or LIVE_HEAD.match(line)]
    assert live, "the live view was never seen"
    assert not [line for line in live if len(line) > width]  # (-J: a line the terminal wrapped comes back whole)
    assert not [line for line in running_lines(screens) if any(wrapper in line for wrapper in WRAPPERS)]
    # The scrollback holds what was printed, never a frame of the live view.
    assert not [line for line in scrollback if LIVE_HOST.match(line) or LIVE_HEAD.match(line)]
    for host in ("db1", "worker1", "app1"):
        finished = [line for line in scrollback if re.match(rf"^   {host} +changed +reconfigured for scalr-server", line)]
        assert len(finished) == 1, (host, finished)
    text = [line for line in scrollback if line.strip()]
    assert re.match(r"^run \S+ succeeded in [0-9.]+ s: .*; details: overhaul show \S+$", text[-1]), text[-3:]
    assert sum(" succeeded in " in line for line in text) == 1


def test_the_live_view_at_80x24_shows_the_running_command_within_the_screen(fresh_lab, tmp_path):
    lab = fresh_lab(3)
    screens, scrollback, code = watch_upgrade(lab, tmp_path, 80, 24)
    assert code == 0, "\n".join(scrollback)
    check_the_view(screens, scrollback, 80, 24)
    running = running_lines(screens)
    # The reconfigure and the install by what they do (the steps' labels), not by the guards their commands start with.
    assert [line for line in running if line.startswith("  db1") and "$ scalr-server-ctl reconfigure" in line], running
    assert [line for line in running if line.startswith("  app1") and "$ apt-get install scalr-server=1.1.0" in line], \
        running
    assert any(re.match(r"^preflight: \d/3 hosts checked", line) for screen in screens for line in screen)
    # The tables fit: the preflight's columns are the stages' numbers, their names in a legend below.
    header = next(line for line in scrollback if line.lstrip().startswith("host "))
    assert header.split() == ["host", "ssh", *map(str, range(1, 10))] and len(header) <= 80
    assert any(line.startswith("stages: 1 backup database, 2 stop services") for line in scrollback)
    assert not [line for line in scrollback if "rec…" in line]


def test_the_live_view_at_160x50_with_v_shows_the_real_commands(fresh_lab, tmp_path):
    lab = fresh_lab(3)
    screens, scrollback, code = watch_upgrade(lab, tmp_path, 160, 50, "-v")
    assert code == 0, "\n".join(scrollback)
    check_the_view(screens, scrollback, 160, 50)
    running = running_lines(screens)
    assert [line for line in running if line.startswith("  db1") and "$ scalr-server-ctl reconfigure" in line], running
    # -v: each command whole as the step wrote it (its reads too), the wrapper never: the install, the reconfigure.
    commands = [line for line in scrollback if re.match(r"^   (db1|worker1|app1) +\$ ", line)]
    assert [line for line in commands if line.startswith("   app1") and "apt-get install -y -q" in line], commands
    assert [line for line in commands if line.startswith("   db1") and "scalr-server-ctl reconfigure &&" in line]
    assert not [line for line in commands if any(wrapper in line for wrapper in WRAPPERS)]
