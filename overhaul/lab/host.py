"""One lab host: a Debian tree in its own mount, PID, UTS and IPC namespaces, sshd on a loopback address.

The host's mounts (overlay root, /proc, /run, the data tmpfs, the read-only repository) are made
inside its own mount namespace, so they vanish with it. Killing the namespace's init (PID 1 inside)
makes the kernel end every process of the host: that is how a host is stopped.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from overhaul.lab.rootfs import REPO_MOUNT
from overhaul.proc import alive, start_time

DATA_MOUNT = "/opt/scalr-server/data"

# PID 1 inside the host: start sshd and the application's supervisor, then reap orphans forever.
INIT = """\
import os, subprocess, time
if not os.path.exists("/etc/ssh/ssh_host_ed25519_key"):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", "/etc/ssh/ssh_host_ed25519_key"], check=True)
os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
subprocess.run(["/usr/sbin/sshd"], check=True)
if os.path.exists("/opt/scalr-server/etc/supervisor/supervisord.conf"):
    subprocess.run(["/etc/init.d/scalr", "start"])
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(1)
"""

# What a host's processes keep of root's powers: enough for sshd (privilege separation chroots),
# supervisord, MariaDB (runs as mysql), dpkg/apt and sudo. Gone, among others: sys_admin (mount),
# sys_module, sys_rawio, sys_ptrace, sys_time, net_admin, net_raw, mknod, syslog, sys_boot.
CAPABILITIES = ("chown", "dac_override", "fowner", "fsetid", "kill", "setgid", "setuid", "net_bind_service",
                "sys_chroot", "audit_write")
BOUNDING = "-all," + ",".join(f"+{cap}" for cap in CAPABILITIES)  # setpriv's --bounding-set for everything a host runs

# Device nodes a host gets (on a tmpfs of its own) instead of the machine's /dev: name, major, minor.
DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0))

# Run by `unshare` as the namespace's first process, before it becomes the host's init. The host's
# root becomes its overlay by pivot_root, and the machine's root is unmounted from the namespace:
# unlike a chroot, there is no path back to it. Then the capabilities not listed above are dropped.
BOOT = """\
set -e
M={merged}
mount -t overlay overlay -o {overlay} "$M"
mount -t proc proc "$M"/proc
mount --bind "$M"/proc/sys "$M"/proc/sys
mount -o remount,bind,ro "$M"/proc/sys
if [ -e "$M"/proc/sysrq-trigger ]; then mount --bind /dev/null "$M"/proc/sysrq-trigger; fi
mount -t tmpfs -o mode=755,nosuid,noexec,size=1m overhaul-dev "$M"/dev
{devices}
mkdir "$M"/dev/pts "$M"/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5,nosuid,noexec devpts "$M"/dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev overhaul-shm "$M"/dev/shm
ln -s pts/ptmx "$M"/dev/ptmx
ln -s /proc/self/fd "$M"/dev/fd
ln -s /proc/self/fd/0 "$M"/dev/stdin
ln -s /proc/self/fd/1 "$M"/dev/stdout
ln -s /proc/self/fd/2 "$M"/dev/stderr
mount -t tmpfs -o mode=755 tmpfs "$M"/run
mount -t tmpfs -o mode=1777 tmpfs "$M"/tmp
mkdir -p "$M"{data}
mount -t tmpfs -o size={data_mb}m,mode=755 overhaul-data "$M"{data}
mount --bind {repo} "$M"{repo_mount}
mount -o remount,bind,ro "$M"{repo_mount}
hostname {name}
mkdir "$M"/run/.machine-root
cd "$M"
pivot_root . run/.machine-root
umount -l /run/.machine-root
rmdir /run/.machine-root
exec setpriv --inh-caps=-all --bounding-set={bounding} -- /usr/bin/python3 /usr/local/sbin/overhaul-lab-init
"""

HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class HostSpec:
    """What a lab host is: its name, its role in the farm and its loopback address."""

    name: str
    role: str
    address: str


class LabHost:
    """A running (or stopped) lab host, driven from the machine that runs the lab."""

    def __init__(self, spec: HostSpec, home: Path, pid: int | None = None, started: int | None = None):
        self.spec = spec
        self.home = home
        self.pid = pid
        self.started = started

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def upper(self) -> Path:
        """The host's own writes (its disk): files put here before start appear in the host."""
        return self.home / "upper"

    def start(self, rootfs: Path, repo: Path, data_mb: int) -> None:
        """Boot the host; its files in `upper` must be in place first."""
        for sub in ("upper", "work", "merged"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
        init = self.upper / "usr/local/sbin/overhaul-lab-init"
        init.parent.mkdir(parents=True, exist_ok=True)
        init.write_text(INIT)
        listen = self.upper / "etc/ssh/sshd_config.d/listen.conf"
        listen.parent.mkdir(parents=True, exist_ok=True)
        listen.write_text(f"ListenAddress {self.spec.address}\n")
        (self.upper / "etc").mkdir(exist_ok=True)
        (self.upper / "etc/hostname").write_text(self.name + "\n")
        script = BOOT.format(
            merged=shlex.quote(str(self.home / "merged")), repo=shlex.quote(str(repo)),
            overlay=shlex.quote(f"lowerdir={rootfs},upperdir={self.upper},workdir={self.home / 'work'}"),
            data=DATA_MOUNT, data_mb=data_mb, repo_mount=REPO_MOUNT, name=shlex.quote(self.name),
            devices="\n".join(f"mknod -m 666 \"$M\"/dev/{name} c {major} {minor}" for name, major, minor in DEVICES),
            bounding=BOUNDING,
        )
        with open(self.home / "console.log", "ab") as console:
            unshare = subprocess.Popen(
                ["unshare", "--mount", "--pid", "--uts", "--ipc", "--fork", "--kill-child", "--", "sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=console, stderr=console, start_new_session=True,
            )
        self.pid = _wait_for_child(unshare.pid)
        self.started = start_time(self.pid)

    def running(self) -> bool:
        """True while the recorded init process is alive and is still the one we started."""
        if self.pid is None:
            return False
        return alive(self.pid, self.started)

    def stop(self) -> None:
        """Kill the host's init: the kernel ends every process of the host and its mounts go."""
        if not self.running():
            return
        assert self.pid is not None
        os.kill(self.pid, signal.SIGCONT)  # a frozen host must die too
        os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.running():
            raise RuntimeError(f"lab: host {self.name} (pid {self.pid}) did not stop")

    def sshd_answers(self, timeout: float = 1.0) -> bool:
        """True when something on the host's address:22 sends an SSH banner."""
        try:
            with socket.create_connection((self.spec.address, 22), timeout=timeout) as sock:
                sock.settimeout(timeout)
                return sock.recv(8).startswith(b"SSH-")
        except OSError:
            return False

    def wait_for_sshd(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.sshd_answers():
            if not self.running():
                log = (self.home / "console.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"lab: host {self.name} died while booting:\n{log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"lab: sshd on {self.name} ({self.spec.address}) did not answer in {timeout:.0f} s")
            time.sleep(0.1)

    def host_key(self) -> str:
        """The host's public SSH key line ("ssh-ed25519 AAAA...")."""
        fields = (self.upper / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()
        return f"{fields[0]} {fields[1]}"

    def exec(self, command: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        """Run a shell command inside the host as root, without SSH (setup and fault injection).

        With the host's own bounded capabilities: what it starts (an sshd restarted by a fault, the services of
        the setup) is as confined as the host's init, not as powerful as the machine's root.
        """
        if not self.running():
            raise RuntimeError(f"lab: host {self.name} is not running")
        argv = [
            "nsenter", f"--target={self.pid}", "--mount", "--uts", "--ipc", "--pid", "--root", "--wd", "--",
            "setpriv", "--inh-caps=-all", f"--bounding-set={BOUNDING}",
            "/usr/bin/env", "-i", f"PATH={HOST_PATH}", "HOME=/root", "LC_ALL=C.UTF-8",
            "DEBIAN_FRONTEND=noninteractive", "/bin/sh", "-c", command,
        ]
        proc = subprocess.run(argv, input=input, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"lab: on {self.name}: {shlex.quote(command)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def path(self, inside: str) -> Path:
        """A path inside the running host, as seen from outside (through /proc/PID/root)."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def processes(self) -> list[int]:
        """PIDs (as seen from outside) of every process of the host, init included."""
        if not self.running():
            return []
        namespace = os.readlink(f"/proc/{self.pid}/ns/pid")
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.readlink(f"/proc/{entry}/ns/pid") == namespace:
                        pids.append(int(entry))
                except OSError:
                    continue
        return pids


def _wait_for_child(parent: int, timeout: float = 10.0) -> int:
    """The PID of the first child of `parent` (unshare's forked namespace init)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            children = []
        if children:
            return int(children[0])
        time.sleep(0.01)
    raise RuntimeError("lab: unshare did not start the host's init")
