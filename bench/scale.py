"""A 1,000-host scale bench: Overhaul against a raw paramiko floor sending the same commands, on N loopback SSH endpoints.

Usage (as root, from the repository): .venv/bin/python bench/scale.py [--sizes 200 500 1000] [--forks 100] [--rounds 1]
    [--changes]

What it does. It starts OpenSSH's sshd (installing Debian's openssh-server if missing) in the foreground with its
own config, host key and authorized_keys in a temporary folder, listening on port 2222 of 127.60.240.1 and up
(one address per endpoint, 250 per /24), and writes, per size N, an inventory of N hosts (one address each) and a
known_hosts with one `[address]:port key` line per host, so strict host-key checking is per host as in production.
First, once, Overhaul runs on one endpoint with every exec request recorded (paramiko's `Channel.exec_command`
wrapped in that process only): the command lines it sends a host are the raw floor's, so both sides send the hosts
the same commands. Then, per size and round, each side runs in a child process of its own (interleaved, the order
alternating by round):

- overhaul: the verify runbook's three steps (`supervisor.up` and `services.verify` on stand-ins for `service` and
  `manage status` first on the sessions' PATH, `disk.usage` of /), each stage `on_failure: continue`, run the way
  `overhaul verify --no-checks` runs it (`Execution.read`, journal and per-host logs included), width: Overhaul's default
  (the inventory's `ssh.forks`, 100) or `--forks`;
- raw: a paramiko script over a thread pool of the same width: per host, connect (known_hosts parsed once and
  shared, RejectPolicy, TCP_NODELAY as Overhaul sets it, the key file read once), send the recorded lines, close.

With --changes, the sides instead change every host in three stages (`true`, as far as Overhaul knows a change):
- overhaul: a runbook of three `shell` stages run the way `overhaul run` runs it: the preflight gate on every host,
  every pair's start and end journaled to disk before its command may start or the run go on, stage by stage; on a
  farm of more hosts than forks, each host's connection is kept open between its uses, idle, within the pool's bound
  (`overhaul.transport.idle_bound`: at most 10 per fork, so 1,000 at the default forks), so a farm within it is
  connected to once per run;
- raw: a group of connections as Fabric's ThreadingGroup keeps one: every host connected first (same pool), the three
  stages run over the open connections (each the line Overhaul sent for it), all closed at the end: one handshake per
  host, a thread per host.

Printed per size and side: wall time (inventory loaded to last result); the controller's CPU (the side's process and
its children on this machine, over the same span; in brackets the child's whole, start-up and imports included); the
hosts' CPU (the bench's sshd processes and their ended children, sessions and commands: utime + stime + cutime +
cstime from /proc/PID/stat, read before the side and once its sessions have all ended after it); the controller's
peak RSS, peak threads and peak open file descriptors (sampled from /proc every 50 ms by this parent); then
overhaul/raw ratios, and the issue's targets. The wall-time ratio is a verdict because the floor sends the same
commands: the hosts' CPU column says what each side's handshakes and commands cost the hosts.

What it models: the controller side of a large farm: connections, host-key checks, threads and memory, the runner,
journal and logs, at N endpoints that each need their own SSH handshake and their own known_hosts entry.
What it does not model: network latency (loopback, well under a millisecond); distinct machines: the controller,
every sshd (about 35 ms of CPU per connection here) and every command share this machine's cores, so wall time
counts the hosts' work too, and other work on the machine (the load average is printed per round); distinct host
keys (every endpoint offers the same key); OpenSSH listens on at most 16 addresses per process, so there is one sshd
per 16 endpoints, all with one config but their ListenAddress lines; hosts' own shell start-up files (sessions get an
empty HOME); users other than root; bastions.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PER_SSHD = 16  # OpenSSH's MAX_LISTEN_SOCKS: addresses one sshd process can listen on
FIRST_OCTET3 = 240  # endpoints are 127.60.240.1 and up, 250 per /24
MANAGE_OUTPUT = "web RUNNING pid 101, uptime 1:00:00\nworker RUNNING pid 102, uptime 1:00:00\n"
TARGET_RATIO, TARGET_RSS_MB, THREAD_SLACK = 1.3, 600, 16
CHANGES_RATIO = 1.5  # issue 27: --changes, overhaul/raw in wall time and in the controller's CPU
CHANGE = "true"  # what each stage of --changes runs on every host


def address(index: int) -> str:
    return f"127.60.{FIRST_OCTET3 + index // 250}.{1 + index % 250}"


@dataclass
class Farm:
    """The files of one bench run: keys, sshd configs, and per size an inventory and a known_hosts."""

    root: Path
    port: int

    @property
    def client_key(self) -> Path:
        return self.root / "client_ed25519"

    @property
    def host_key(self) -> Path:
        return self.root / "host_ed25519"

    @property
    def manage(self) -> Path:
        return self.root / "manage"

    @property
    def service(self) -> Path:
        return self.root / "bin" / "service"

    @property
    def runbook(self) -> Path:
        return self.root / "scale-verify.yaml"

    @property
    def changes_runbook(self) -> Path:
        return self.root / "scale-changes.yaml"

    def known_hosts(self, size: int) -> Path:
        return self.root / f"known_hosts-{size}"

    def floor(self, changes: bool) -> Path:
        """The command lines Overhaul sent one host, recorded (see record_side): what the raw floor sends each host."""
        return self.root / f"floor-{'changes' if changes else 'verify'}.json"

    def inventory(self, size: int) -> Path:
        return self.root / f"scale-{size}.yaml"


def write_farm(farm: Farm, sizes: list[int], forks: int) -> None:
    for key in (farm.client_key, farm.host_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "overhaul-scale", "-f", str(key)], check=True)
    (farm.root / "authorized_keys").write_text(farm.client_key.with_suffix(".pub").read_text())
    farm.manage.write_text(f"#!/bin/sh\nprintf '{MANAGE_OUTPUT}'\n")
    farm.manage.chmod(0o755)
    farm.service.parent.mkdir(exist_ok=True)
    farm.service.write_text("#!/bin/sh\necho \"$1 is running\"\n")  # what `service scalr status` says on a farm host
    farm.service.chmod(0o755)
    farm.runbook.write_text(
        "name: scale-verify\ndescription: three read-only commands per host, verify's steps\nstages:\n"
        f"  - {{name: supervisor up, step: supervisor.up, on_failure: continue}}\n"
        f"  - {{name: services running, step: services.verify, on_failure: continue,"
        f" params: {{manage_command: {farm.manage}}}}}\n"
        f"  - {{name: disk usage, step: disk.usage, on_failure: continue, params: {{mounts: [/], threshold: 100}}}}\n"
    )
    farm.changes_runbook.write_text("name: scale-changes\ndescription: three stages that change hosts (as far as Overhaul "
                                    "knows)\nstages:\n" + "".join(f"  - {{name: change {number}, step: shell, params: "
                                                                   f"{{command: '{CHANGE}'}}}}\n" for number in (1, 2, 3)))
    key_type, key_data = farm.host_key.with_suffix(".pub").read_text().split()[:2]
    for size in sizes:
        farm.known_hosts(size).write_text("".join(f"[{address(i)}]:{farm.port} {key_type} {key_data}\n" for i in range(size)))
        lines = ["environment: scale", "ssh:", "  user: root", f"  port: {farm.port}", f"  key_file: {farm.client_key.name}",
                 f"  known_hosts: {farm.known_hosts(size).name}", "  connect_timeout: 30", f"  forks: {forks}", "hosts:"]
        for i in range(size):
            lines += [f"  - name: h{i + 1:04d}", f"    address: {address(i)}", "    roles: [app]"]
        farm.inventory(size).write_text("\n".join(lines) + "\n")


# -- the endpoints -------------------------------------------------------------------------------------------------

def ensure_sshd() -> str:
    """The sshd binary; Debian's openssh-server is installed first when it is missing (as root)."""
    found = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    if found:
        return found
    print("sshd not found: installing openssh-server", flush=True)
    subprocess.run(["apt-get", "install", "-y", "-q", "openssh-server"], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return "/usr/sbin/sshd"


def listening(port: int) -> set[str]:
    """The IPv4 addresses with a TCP listener on `port` (read from /proc: no connection, no sshd child)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        host, _, hex_port = local.partition(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(socket.inet_ntoa(int(host, 16).to_bytes(4, "little")))
    return found


def start_sshds(farm: Farm, size: int, log_level: str = "ERROR") -> list[subprocess.Popen]:
    """One foreground sshd per 16 endpoints, all sharing one host key and one authorized_keys; ready on return.
    Each logs to sshd-NNN.log beside its config (`log_level` INFO: a line per accepted login)."""
    wanted = [address(i) for i in range(size)]
    taken = listening(farm.port) & (set(wanted) | {"0.0.0.0"})
    if taken:
        raise SystemExit(f"port {farm.port} is already in use on {', '.join(sorted(taken)[:5])}: choose another --port")
    sshd = ensure_sshd()
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # its privilege-separation directory
    common = [
        f"HostKey {farm.host_key}", f"AuthorizedKeysFile {farm.root / 'authorized_keys'}", "PermitRootLogin prohibit-password",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "UseDNS no",
        "PidFile none", "MaxStartups 1000", "MaxSessions 100", "PrintMotd no", "PrintLastLog no", f"LogLevel {log_level}",
        # Sessions get an empty HOME: no shell start-up file of this machine's root (pyenv init: +120 ms per command).
        f"SetEnv HOME={farm.root / 'home'} PATH={farm.service.parent}:/usr/sbin:/usr/bin:/sbin:/bin",
    ]
    (farm.root / "home").mkdir(exist_ok=True)
    processes = []
    try:
        for group in range(0, size, PER_SSHD):
            config = farm.root / f"sshd-{group // PER_SSHD:03d}.conf"
            listen = [f"ListenAddress {a}:{farm.port}" for a in wanted[group:group + PER_SSHD]]
            config.write_text("\n".join(listen + common) + "\n")
            with open(config.with_suffix(".log"), "w") as log:
                processes.append(subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                                  stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 30
        while set(wanted) - listening(farm.port):
            dead = [p for p in processes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = " ".join(p.read_text().strip() for p in sorted(farm.root.glob("sshd-*.log")))[:500]
                raise SystemExit(f"sshd did not listen on every endpoint: {logs or 'no output'}")
            time.sleep(0.1)
    except BaseException:
        stop_sshds(processes)
        raise
    return processes


def stop_sshds(processes: list[subprocess.Popen]) -> None:
    """Stop the sshd processes this bench started (by their own PIDs: never another sshd of this machine)."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def hosts_cpu(processes: list[subprocess.Popen]) -> float:
    """CPU seconds of the bench's sshd processes and of their ended children (each connection's sshd, its session and
    commands: an sshd reaps its children, so their time adds to its cutime and cstime): the hosts' own accounting."""
    ticks = 0
    for process in processes:
        fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime (fields 14-17 of proc(5))
    return ticks / os.sysconf("SC_CLK_TCK")


def settle(processes: list[subprocess.Popen], timeout: float = 60) -> None:
    """Wait until no sshd of the bench has a child left (every session ended and reaped): their CPU is then counted."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split() for p in processes):
            return
        time.sleep(0.05)
    print("  (sshd sessions still open after the side ended: the hosts' CPU misses theirs)", flush=True)


# -- the two sides (each in a child process) -------------------------------------------------------------------------

def raw_connect(farm: Farm, host: str, known: Any, key: Any) -> Any:
    """One raw connection: strict (known_hosts parsed once and shared read-only, RejectPolicy), TCP_NODELAY as
    Overhaul sets it, the key read once."""
    import paramiko

    sock = socket.create_connection((host, farm.port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client = paramiko.SSHClient()
    client._host_keys = known
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(host, farm.port, username="root", pkey=key, sock=sock, look_for_keys=False, allow_agent=False,
                       timeout=30, banner_timeout=30, auth_timeout=30)
    except BaseException:
        client.close()
        raise
    return client


def raw_ran(client: Any, command: str) -> bool:
    """Run a command to its end (its output read); whether it exited 0."""
    _, stdout, stderr = client.exec_command(command)
    stdout.read()
    stderr.read()
    return stdout.channel.recv_exit_status() == 0


def raw_credentials(farm: Farm, size: int) -> tuple[Any, Any]:
    import paramiko

    return paramiko.HostKeys(str(farm.known_hosts(size))), paramiko.Ed25519Key.from_private_key_file(str(farm.client_key))


def floor_lines(farm: Farm, changes: bool) -> list[str]:
    return json.loads(farm.floor(changes).read_text())


def raw_side(farm: Farm, size: int, forks: int) -> dict[str, str]:
    """Per host over a pool of `forks` threads: connect strictly, send the lines Overhaul sent (see record_side), close.
    Returns host -> failure."""
    known, key = raw_credentials(farm, size)
    commands = floor_lines(farm, changes=False)

    def one(host: str) -> str | None:
        try:
            client = raw_connect(farm, host, known, key)
            try:
                for command in commands:
                    if not raw_ran(client, command):
                        return f"`{command}` failed"
            finally:
                client.close()
        except Exception as exc:  # reported, not raised: the run goes on, as Overhaul's does
            return f"{type(exc).__name__}: {exc}"
        return None

    hosts = [address(i) for i in range(size)]
    with ThreadPoolExecutor(max_workers=forks) as pool:
        return {host: failure for host, failure in zip(hosts, pool.map(one, hosts), strict=True) if failure}


def raw_changes_side(farm: Farm, size: int, forks: int) -> dict[str, str]:
    """--changes: every host connected first (a pool of `forks`), then stage by stage the line Overhaul sent for that
    stage on every host, all connections kept to the end: a group of connections, as Fabric's ThreadingGroup keeps
    one."""
    known, key = raw_credentials(farm, size)
    stages = floor_lines(farm, changes=True)
    hosts = [address(i) for i in range(size)]
    clients: dict[str, Any] = {}
    failures: dict[str, str] = {}

    def connect(host: str) -> None:
        try:
            clients[host] = raw_connect(farm, host, known, key)
        except Exception as exc:
            failures[host] = f"{type(exc).__name__}: {exc}"

    def change(host: str, line: str) -> None:
        if host in failures:
            return
        try:
            if not raw_ran(clients[host], line):
                failures[host] = f"`{line}` failed"
        except Exception as exc:
            failures[host] = f"{type(exc).__name__}: {exc}"

    try:
        with ThreadPoolExecutor(max_workers=forks) as pool:
            list(pool.map(connect, hosts))
            for line in stages:
                list(pool.map(change, hosts, [line] * len(hosts)))
    finally:
        for client in clients.values():
            client.close()
    return failures


def overhaul_run(farm: Farm, size: int, runbook: Path, expected: str, read_only: bool = False) -> dict[str, str]:
    """`runbook` on the farm's first `size` hosts through `Execution` (`read_only`: a verify), the way the command line
    runs it (journal and per-host logs included; width: the inventory's `ssh.forks`, written as `forks`).
    Returns host -> its first pair whose outcome is not `expected`."""
    from overhaul.execution import Execution
    from overhaul.inventory import load_inventory_file
    from overhaul.plan import build_plan
    from overhaul.runbook import load_runbook
    from overhaul.step import Registry

    os.environ["OVERHAUL_JOURNAL"] = str(farm.root / f"journal-{size}-{time.monotonic_ns()}" / "journal.sqlite")
    plan = build_plan(load_runbook(str(runbook)), load_inventory_file(farm.inventory(size)), Registry(), {})
    execution = Execution(plan)
    result = execution.read() if read_only else execution.run()
    failures: dict[str, str] = {}
    for r in result.results:
        if r.outcome.value != expected:
            failures.setdefault(r.host, f"{r.stage}: {r.outcome.value}: {r.message}")
    if result.refused or len(result.results) != size * len(plan.stages):
        refused = f"; refused: {'; '.join(result.refused[:2])}" if result.refused else ""
        failures["(run)"] = f"{len(result.results)} results, expected {size * len(plan.stages)}{refused}"
    return failures


def overhaul_side(farm: Farm, size: int, forks: int) -> dict[str, str]:
    """The verify runbook as `overhaul verify --no-checks` runs it."""
    return overhaul_run(farm, size, farm.runbook, "ok", read_only=True)


def overhaul_changes_side(farm: Farm, size: int, forks: int) -> dict[str, str]:
    """--changes: the three-stage runbook as `overhaul run` runs it (preflight gate, journal of every pair's start and
    end, stage by stage)."""

    return overhaul_run(farm, size, farm.changes_runbook, "changed")


def record_side(farm: Farm, changes: bool) -> dict[str, str]:
    """Overhaul on the first endpoint alone, every exec request recorded: the lines the raw floor sends each host
    (--changes: one per stage, checked). paramiko's `Channel.exec_command` is wrapped in this process only."""
    import paramiko

    sent: list[str] = []
    send = paramiko.Channel.exec_command

    def recorded(channel: paramiko.Channel, command: str | bytes) -> None:
        sent.append(command.decode() if isinstance(command, bytes) else command)
        send(channel, command)

    paramiko.Channel.exec_command = recorded
    failures = (overhaul_changes_side if changes else overhaul_side)(farm, 1, 1)
    if changes and len(sent) != 3:
        failures["(floor)"] = f"expected one command per stage, Overhaul sent {len(sent)}: {sent}"
    farm.floor(changes).write_text(json.dumps(sent))
    return failures


SIDES = {"raw": raw_side, "overhaul": overhaul_side, "raw-changes": raw_changes_side,
         "overhaul-changes": overhaul_changes_side,
         "record": lambda farm, size, forks: record_side(farm, changes=False),
         "record-changes": lambda farm, size, forks: record_side(farm, changes=True)}


def child(args: argparse.Namespace) -> None:
    """One side, one size: do the work and write its wall time, CPU and failures to `--result`."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a socket per open connection
    farm = Farm(Path(args.dir), args.port)
    side = SIDES[args.side]
    importlib.import_module("paramiko" if args.side.startswith("raw") else "overhaul.execution")  # start-up, not work
    cpu_before, started = _cpu(), time.perf_counter()
    failures = side(farm, args.hosts, args.forks)
    wall, cpu = time.perf_counter() - started, _cpu() - cpu_before
    Path(args.result).write_text(json.dumps({"wall": wall, "cpu": cpu, "failures": failures}))
    sys.exit(1 if failures else 0)


def _cpu() -> float:
    """This process's CPU seconds and its ended children's (the controller's own: nothing of the hosts')."""
    return sum(usage.ru_utime + usage.ru_stime
               for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))


# -- measuring ---------------------------------------------------------------------------------------------------------

@dataclass
class Measure:
    failed: int  # hosts
    wall: float
    cpu: float  # the controller's, over the work: the side's process and its children
    cpu_total: float  # the whole child's, start-up and imports included
    hosts_cpu: float  # the bench's sshd processes and their ended children, over the whole side
    rss_mb: float
    threads: int
    fds: int


def measure(side: str, farm: Farm, size: int, forks: int, timeout: float, sshds: list[subprocess.Popen]) -> Measure:
    """Run one side in a child; sample its threads and descriptors from /proc; its rusage from wait4; the hosts' CPU
    from the sshd processes' accounting before and after (once their sessions have ended)."""
    settle(sshds)
    hosts_before = hosts_cpu(sshds)
    result = farm.root / f"result-{side}-{size}.json"
    result.unlink(missing_ok=True)
    process = subprocess.Popen([sys.executable, __file__, "--side", side, "--hosts", str(size), "--dir", str(farm.root),
                                "--forks", str(forks), "--port", str(farm.port), "--result", str(result)])
    threads = fds = 0
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            break
        try:
            status_text = Path(f"/proc/{process.pid}/status").read_text()
            threads = max(threads, int(status_text.split("Threads:")[1].split()[0]))
            fds = max(fds, len(os.listdir(f"/proc/{process.pid}/fd")))
        except (OSError, IndexError):
            pass  # it is ending
        if time.monotonic() > deadline:
            process.kill()
        time.sleep(0.05)
    if not result.exists():
        raise SystemExit(f"{side} side at {size} hosts ended with {process.returncode} and no result")
    settle(sshds)
    hosts = hosts_cpu(sshds) - hosts_before
    data = json.loads(result.read_text())
    failures = data["failures"]
    if failures:
        first = "; ".join(f"{host}: {why}" for host, why in list(failures.items())[:2])
        print(f"  {side}: {len(failures)} hosts failed, e.g. {first}", flush=True)
    cpu_total = usage.ru_utime + usage.ru_stime
    return Measure(len(failures), data["wall"], data["cpu"], cpu_total, hosts, usage.ru_maxrss / 1024, threads, fds)


HEADER = (f"  {'side':<9} {'failed':>6} {'wall s':>8} {'controller cpu s':>17} {'hosts cpu s':>12} {'peak RSS MB':>12} "
          f"{'peak threads':>13} {'peak fds':>9}")


def row(side: str, m: Measure) -> str:
    cpu = f"{m.cpu:7.2f} ({m.cpu_total:6.2f})"
    return (f"  {side:<9} {m.failed:6d} {m.wall:8.2f} {cpu:>17} {m.hosts_cpu:12.2f} {m.rss_mb:12.1f} {m.threads:13d} "
            f"{m.fds:9d}")


def ratios(o: Measure, r: Measure) -> str:
    return (f"  overhaul/raw: wall {o.wall / r.wall:4.2f}x, controller cpu {o.cpu / r.cpu:4.2f}x, hosts cpu "
            f"{o.hosts_cpu / r.hosts_cpu:4.2f}x, peak RSS {o.rss_mb / r.rss_mb:4.2f}x, peak threads "
            f"{o.threads / r.threads:4.2f}x")


def verdict(ok: bool) -> str:
    return "ok" if ok else "OFF TARGET"


def median_ratio(overhaul: list[Measure], raw: list[Measure], what: str) -> float:
    return statistics.median(getattr(o, what) / getattr(r, what) for o, r in zip(overhaul, raw, strict=True))


def targets(size: int, forks: int, overhaul: list[Measure], raw: list[Measure], threads: dict[int, tuple[int, int]]) -> None:
    """Issue 15's targets for the verify, against the largest size. The raw script, same width, is the yardstick of "the
    width plus a constant": a pool worker and paramiko's transport thread per connection in flight."""
    ratio, cpu = median_ratio(overhaul, raw, "wall"), median_ratio(overhaul, raw, "cpu")
    rss = max(m.rss_mb for m in overhaul)
    peak, bound = threads[size][0], threads[size][1] + THREAD_SLACK
    failed = max(m.failed for m in overhaul)
    print(f"\ntargets at {size} hosts (issue 15), forks {forks}:")
    print(f"  every host verified: {failed} failed  {verdict(not failed)}")
    print(f"  wall within {TARGET_RATIO}x of the raw floor (median of rounds): {ratio:4.2f}x  {verdict(ratio <= TARGET_RATIO)}")
    print(f"  controller cpu, overhaul/raw (median of rounds): {cpu:4.2f}x")
    print(f"  controller peak RSS under {TARGET_RSS_MB} MB: {rss:.0f} MB  {verdict(rss < TARGET_RSS_MB)}")
    print(f"  peak threads bounded by the width plus a constant (raw's peak + {THREAD_SLACK} = {bound}): {peak}  "
          f"{verdict(peak <= bound)}")
    print("  peak threads overhaul/raw by size: " + ", ".join(f"{n} hosts {o}/{r}" for n, (o, r) in sorted(threads.items())))


def changes_targets(size: int, forks: int, overhaul: list[Measure], raw: list[Measure]) -> None:
    """Issue 27's targets for --changes at one size. Threads: a worker per fork, and a paramiko thread per open
    connection: at most the forks' in use plus those the pool keeps idle (`idle_bound`), never more than the farm."""
    from overhaul.transport import idle_bound

    wall, cpu = median_ratio(overhaul, raw, "wall"), median_ratio(overhaul, raw, "cpu")
    hosts = median_ratio(overhaul, raw, "hosts_cpu")
    rss, peak, failed = max(m.rss_mb for m in overhaul), max(m.threads for m in overhaul), max(m.failed for m in overhaul)
    kept = idle_bound(forks, size)
    design = forks + min(size, forks + kept)  # a worker per fork, a paramiko thread per open connection
    bound = max(m.threads for m in raw) + THREAD_SLACK  # the yardstick, as for the verify: the raw group's own peak
    print(f"\ntargets at {size} hosts (issue 27, --changes), forks {forks}, medians of rounds:")
    print(f"  every host changed: {failed} failed  {verdict(not failed)}")
    print(f"  wall within {CHANGES_RATIO}x of the raw group: {wall:4.2f}x  {verdict(wall <= CHANGES_RATIO)}")
    print(f"  controller cpu within {CHANGES_RATIO}x of the raw group: {cpu:4.2f}x  {verdict(cpu <= CHANGES_RATIO)}")
    print(f"  hosts' cpu, overhaul/raw (context: the same commands; handshakes and the preflight's reads differ): "
          f"{hosts:4.2f}x")
    print(f"  controller peak RSS under {TARGET_RSS_MB} MB: {rss:.0f} MB  {verdict(rss < TARGET_RSS_MB)}")
    print(f"  peak threads bounded as the raw group's (its peak + {THREAD_SLACK} = {bound}; by design forks + min(hosts, "
          f"forks + kept idle {kept}) = {design}, sampled a few above it as threads start and end): {peak}  "
          f"{verdict(peak <= bound)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 500, 1000], help="endpoints (default 200 500 1000)")
    parser.add_argument("--forks", type=int, default=0, help="width of both sides (default: ssh.forks's)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each side per size, interleaved (default 1)")
    parser.add_argument("--port", type=int, default=2222)
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed to one side at one size")
    parser.add_argument("--changes", action="store_true",
                        help="instead of the verify: three stages that change every host, gated by the preflight")
    parser.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)  # the child's arguments
    parser.add_argument("--hosts", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        child(args)
        return
    from overhaul.inventory import SSHSettings

    default_forks = SSHSettings.model_fields["forks"].default
    if os.geteuid() != 0:
        raise SystemExit("run as root: the bench starts sshd and logs in as root on its own endpoints")
    if max(args.sizes) > 250 * (256 - FIRST_OCTET3) or min(args.sizes) < 1:
        raise SystemExit(f"--sizes: between 1 and {250 * (256 - FIRST_OCTET3)}")
    forks = args.forks or default_forks
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 3 * max(args.sizes) + 100:
        raise SystemExit(f"the hard limit of open files ({hard}) is too low for {max(args.sizes)} connections: raise it "
                         "(ulimit -Hn) or give smaller --sizes")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # as the children do (the pool's bound depends on it)
    sizes = sorted(set(args.sizes))
    with tempfile.TemporaryDirectory(prefix="overhaul-scale-") as tmp:
        farm = Farm(Path(tmp), args.port)
        write_farm(farm, sorted({1, *sizes}), forks)
        sshds = start_sshds(farm, max(sizes))
        try:
            recorded = measure("record-changes" if args.changes else "record", farm, 1, forks, args.timeout, sshds)
            if recorded.failed:
                raise SystemExit("overhaul failed on the first endpoint: no floor to compare with")
            lines = floor_lines(farm, args.changes)
            print(f"{len(sshds)} sshd processes on 127.60.{FIRST_OCTET3}.1 and up, port {args.port}; forks {forks}; "
                  f"the raw floor sends each host the {len(lines)} command line(s) Overhaul sent one host, e.g. "
                  f"{lines[0][:100]!r}; controller cpu: the work's (the child's whole)", flush=True)
            threads: dict[int, tuple[int, int]] = {}
            for size in sizes:
                overhaul, raw = [], []
                for number in range(args.rounds):
                    load = os.getloadavg()[0]
                    print(f"\n{size} hosts, round {number + 1}/{args.rounds} (load average {load:.2f})\n{HEADER}", flush=True)
                    for side in ("raw", "overhaul") if number % 2 == 0 else ("overhaul", "raw"):
                        m = measure(f"{side}-changes" if args.changes else side, farm, size, forks, args.timeout,
                                    sshds)
                        (raw if side == "raw" else overhaul).append(m)
                        print(row(side, m), flush=True)
                    print(ratios(overhaul[-1], raw[-1]), flush=True)
                threads[size] = (max(m.threads for m in overhaul), max(m.threads for m in raw))
                if args.changes:
                    changes_targets(size, forks, overhaul, raw)
            if not args.changes:
                targets(sizes[-1], forks, overhaul, raw, threads)
        finally:
            stop_sshds(sshds)


if __name__ == "__main__":
    main()
