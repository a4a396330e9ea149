"""Overhaul side by side with raw paramiko, Ansible and pyinfra on the same lab: issues 15 and 27's targets, as ratios.

Usage (as root, from the repository): .venv/bin/python bench/peers.py [--sizes 8,32] [--rounds 5] [--upgrade-rounds 3]
    [--subnet 127.53.0] [--verify-only] [--each-check]

For each size it starts a lab on 127.53.0.x (or --subnet) (torn down afterwards, whatever happens) in a temporary
project folder (hosts/lab.yaml, a copy of the repository's checks/), then measures, each side a fresh
process (start-up and connecting included), in interleaved rounds (A B C D E, A B C D E, ...; one
warm-up round not counted), ratios taken within each round:

  A  `overhaul verify --env lab --no-checks`: the built-in verify runbook alone;
  B  `overhaul verify --env lab`: the same plus the testinfra checks of checks/;
  C  a raw paramiko script (bench/peers/raw.py) sending exactly the command lines A sends (read off the
     wire, see bench/peers/wire.py), stage by stage, strict host keys, a pool as wide as A's;
  D  Ansible (ansible-core, installed into bench/.peers-venv): one `shell` task per question A asks (A's
     command lines, those that join several probes between marks split back into their commands, as a
     playbook is written; C gets A's lines as they are), the lab's inventory converted, forks = hosts,
     pipelining on, ControlMaster/ControlPersist as default but every run cold (its control sockets closed
     after each run, as every other side connects anew), strict host keys with the lab's known_hosts, no
     fact gathering;
  E  pyinfra (same venv): the same questions as D, one `server.shell` each, --parallel = hosts, strict host
     keys. A and C check the outputs (programs RUNNING, disks under the threshold), D does too
     (failed_when); E checks exit codes only.

Every side's run is measured three ways, kept apart because on the lab the hosts share the controller's cores:
wall time; the controller's CPU (the side's process and everything it starts on this machine, ssh masters
included: a cgroup of the bench's own counts them); and the hosts' CPU (every process inside the lab's hosts,
sshd, the commands, supervisord and MariaDB, counted by a second cgroup the hosts' processes are moved into: the
hosts' own accounting, as a real host's would be). A wall-time ratio gets a verdict only against a floor that
sends the hosts the same work (C for A; the hand run with the same safety reads for the upgrade); the other wall
ratios are context, and the targets are on the controller's CPU. After the last size, the controller's CPU per
added host (the slope between the smallest and the largest size, on each side's medians): the built-in verify
against raw paramiko, pyinfra and Ansible, and what the checks add against what the built-in verify costs. The
default sizes, 8 and 32, both run the checks in the same number of pytest sessions (overhaul.verification.CHECK_WIDTH):
a session's fixed cost would otherwise count as the hosts'. Issue 27's no-op targets are at 4 and 20 hosts: --sizes 4,20.

Then the upgrade: one real upgrade 1.0.0 -> 1.1.0 and one no-op re-run, every exec request recorded
(commands per app host, target at most 10), and rounds of the no-op re-run against A (target: controller CPU at
most 1.15x). At the smallest size, the critical path: rounds of a fresh lab upgraded by `overhaul
upgrade` against a fresh lab upgraded by hand over SSH (bench/peers/raw.py) with only the unavoidable
commands, stage by stage, parallel within a stage, and against a fresh lab upgraded by hand with the reads of
the programs' states Overhaul makes for safety added (its preflight, after the stop, after each tier's
reconfigure): the same host work, so the target (upgrade at most 1.1x in wall time) is against that one. A
fresh lab is a new lab (lab.down, lab.up): that is how the tests reset one too.

With --each-check, rounds of A against A plus one check of checks/ at a time (each test function alone in a
copy of its file): what each check adds to the verify, in wall time and in the controller's and the hosts' CPU.

Each ratio line gives the median of the per-round ratios (the verdict), their range, and best/best (the
ratio of the two sides' lowest values): the machine is shared, so the load average is printed too. To measure
another tree of Overhaul, put it first on PYTHONPATH: every side's process inherits it. Needs root (the lab, and
the counting cgroups: cgroup2, or cgroup v1's cpuacct).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from overhaul.inventory import Inventory, load_inventory_file
from overhaul.lab import Lab
from overhaul.verification import CHECK_WIDTH

BENCH = Path(__file__).resolve().parent
REPOSITORY = BENCH.parent
HELPERS = BENCH / "peers"
PEERS_VENV = BENCH / ".peers-venv"
SUBNET = "127.53.0"
THRESHOLD = 80  # the verify runbook's disk threshold (runbooks/verify.yaml)
UPGRADE = ("upgrade", "--env", "lab", "--version", "1.1.0", "--yes")
EXIT_MARK = re.compile(r"\[exit -?\d+(?:, \d+ ms)?\]\n")  # the end of one answer in a pair's log
PROBE_MARK = "::overhaul-probe::"  # overhaul.context.MARK
PROBE_END = re.compile(r"[ \n]\) 2>&1;")  # where a probe's own command ends inside a probe script
CONTEXT = "(context)"  # a ratio printed to explain others, with no target of its own

Stages = list[tuple[str, dict[str, list[dict]]]]  # (stage name, host name -> its commands in order)
Side = Callable[["CpuGroup"], float]  # runs one side once, its processes in the group given: its wall time
MEASURES = {"wall": "times", "controller CPU": "controller", "hosts CPU": "hosts"}  # what a ratio line compares


class BenchError(RuntimeError):
    """A side failed or the lab is not as expected: the numbers would mean nothing."""


@dataclass
class Series:
    """One side, one value per round: its wall time, the controller's CPU (the side's process and all it started
    on this machine) and the hosts' CPU (every process inside the lab's hosts meanwhile)."""

    label: str
    times: list[float] = field(default_factory=list)
    controller: list[float] = field(default_factory=list)
    hosts: list[float] = field(default_factory=list)

    def add(self, wall: float, controller: float, hosts: float) -> None:
        self.times.append(wall)
        self.controller.append(controller)
        self.hosts.append(hosts)

    def median(self, measure: str) -> float:
        values: list[float] = getattr(self, MEASURES[measure])
        return statistics.median(values)


def run_timed(argv: list[str], cwd: Path, env: dict[str, str] | None = None, group: CpuGroup | None = None) -> float:
    """Run a command to its end (in `group`, from before its first instruction); its wall time, or BenchError with
    its output's tail when it fails."""
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          preexec_fn=group.enter if group else None)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise BenchError(f"{shlex.join(argv[:6])} ... exited {proc.returncode}:\n{tail}")
    return elapsed


def overhaul_argv(arguments: list[str], wire: Path | None = None) -> list[str]:
    """The `overhaul` command line, run by this Python (PYTHONPATH is passed on), optionally recording the wire."""
    if wire is None:
        return [sys.executable, "-m", "overhaul", *arguments]
    return [sys.executable, str(HELPERS / "wire.py"), str(wire), *arguments]


def cli_side(project: Path, *arguments: str) -> Side:
    """A, B and the upgrades: `overhaul ARGUMENTS` run from the project folder."""
    return lambda group: run_timed(overhaul_argv(list(arguments)), project, group=group)


# -- what Overhaul sends ---------------------------------------------------------------------------------------
def wire_commands(log: Path) -> dict[str, list[str]]:
    """Host address -> the command lines it was sent, in order (bench/peers/wire.py's log)."""
    sent: dict[str, list[str]] = {}
    for line in log.read_text().splitlines():
        address, command = json.loads(line)
        sent.setdefault(address, []).append(command)
    return sent


def runs(project: Path) -> set[Path]:
    folder = project / ".overhaul/runs"
    return set(folder.iterdir()) if folder.is_dir() else set()


def logged_by(project: Path, before: set[Path], hosts: list[str]) -> dict[int, dict[str, int]]:
    """stage_commands of the run made since `before` was taken (none: a run whose stages sent nothing logs nothing)."""
    made = runs(project) - before
    return stage_commands(made.pop(), hosts) if made else {}


def stage_commands(run: Path, hosts: list[str]) -> dict[int, dict[str, int]]:
    """Stage index (from 0) -> host name -> how many commands the run's per-host log of that stage holds.

    A pair's log is `NN-STAGE-HOST.log` (overhaul.runner.log_name: NN from 1): the host is the longest of `hosts`
    the name ends with (a stage's name may hold '-')."""
    counts: dict[int, dict[str, int]] = {}
    by_length = sorted(hosts, key=len, reverse=True)
    for log in run.glob("*-*.log"):
        number, _, rest = log.stem.partition("-")
        host = next((name for name in by_length if rest == name or rest.endswith("-" + name)), None)
        if not number.isdigit() or host is None:
            continue  # not a pair's log
        counts.setdefault(int(number) - 1, {})[host] = len(EXIT_MARK.findall(log.read_text(errors="replace")))
    return dict(sorted(counts.items()))


def expectation(line: str, package: str) -> dict:
    """The output check a verify makes of this command (as the built-in steps do): services RUNNING, disks < 80 %.
    Probes sent as one command (overhaul.context.probe_script, each answer between marks): a check per answer."""
    script = shlex.split(line)[-1] if " sh -c " in line else line  # (the remote timeout's sh -c, under sudo too)
    if PROBE_MARK in script:
        parts = script.split(f"printf '%s\\n' {PROBE_MARK}; ( ")[1:]
        return {"sections": [{"line": question, **expectation(question, package)}
                             for question in (PROBE_END.split(part)[0] for part in parts)]}
    if f"{package}-manage status" in line:
        return {"expect": "running"}
    if "df -P" in line:
        return {"expect": "disk", "threshold": THRESHOLD}
    return {}


def verify_stages(project: Path, inventory: Inventory, package: str) -> Stages:
    """Run A once with the wire recorded; split each host's command lines into the run's stages.

    The split follows the answers each stage's log holds. When those do not add up to the lines sent (a verify
    that reads every stage's probes in one command per host: its logs hold more answers than commands), each host's
    lines, in order, make one stage: the same lines to the same hosts, the floor C needs."""
    wire = project / "verify-wire.jsonl"
    wire.unlink(missing_ok=True)
    before = runs(project)
    run_timed(overhaul_argv(["verify", "--env", "lab", "--no-checks"], wire), project)
    sent = wire_commands(wire)
    address = {host.name: host.address for host in inventory.hosts}
    stages: Stages = []
    taken = {name: 0 for name in address}
    for index, hosts in logged_by(project, before, list(address)).items():
        stage: dict[str, list[dict]] = {}
        for name, count in hosts.items():
            lines = sent[address[name]][taken[name]:taken[name] + count]
            stage[name] = [{"line": line, **expectation(line, package)} for line in lines]
            taken[name] += count
        stages.append((f"stage {index + 1}", stage))
    if any(count != len(sent.get(address[name], [])) for name, count in taken.items()):
        return [("the verify's lines", {name: [{"line": line, **expectation(line, package)}
                                            for line in sent.get(address[name], [])] for name in address})]
    return stages


def counted_upgrade(project: Path, inventory: Inventory) -> tuple[float, dict[str, list[str]], dict[str, int]]:
    """One upgrade to 1.1.0 with the wire recorded: wall time, each host's command lines, each host's logged ones."""
    wire = project / "upgrade-wire.jsonl"
    wire.unlink(missing_ok=True)
    before = runs(project)
    elapsed = run_timed(overhaul_argv(list(UPGRADE), wire), project)
    sent = wire_commands(wire)
    logged: dict[str, int] = {}
    for hosts in logged_by(project, before, [host.name for host in inventory.hosts]).values():
        for name, count in hosts.items():
            logged[name] = logged.get(name, 0) + count
    by_name = {host.name: sent.get(host.address, []) for host in inventory.hosts}
    return elapsed, by_name, logged


# -- the peers ---------------------------------------------------------------------------------------------------
def ssh_hosts(inventory: Inventory) -> dict[str, dict]:
    """Each host's SSH settings, from the lab's inventory (as every side uses them)."""
    ssh = inventory.ssh
    return {
        host.name: {"address": host.address, "port": host.port or ssh.port, "user": host.user or ssh.user,
                    "key_file": str(ssh.key_file), "known_hosts": str(ssh.known_hosts), "roles": host.roles}
        for host in inventory.hosts
    }


def raw_side(work: Path, inventory: Inventory, stages: Stages, name: str = "raw-spec.json") -> Side:
    """C (and the by-hand upgrade): bench/peers/raw.py over a spec file (0600: it may hold a secret for stdin)."""
    spec = work / name
    spec.touch(mode=0o600)
    spec.write_text(json.dumps({"hosts": ssh_hosts(inventory), "width": len(inventory.hosts),
                                "stages": [{"name": stage, "commands": commands} for stage, commands in stages]}))
    return lambda group: run_timed([sys.executable, str(HELPERS / "raw.py"), str(spec)], work, group=group)


def peers_venv() -> dict[str, str]:
    """Install ansible-core and pyinfra into bench/.peers-venv once; tool -> its program, or -> why it is missing."""
    found: dict[str, str] = {}
    for tool, package, program in (("ansible", "ansible-core", "ansible-playbook"), ("pyinfra", "pyinfra", "pyinfra")):
        binary = PEERS_VENV / "bin" / program
        if not binary.exists():
            try:
                if not (PEERS_VENV / "bin/pip").exists():
                    subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True, capture_output=True)
                subprocess.run([str(PEERS_VENV / "bin/pip"), "install", "-q", package], check=True, capture_output=True,
                               text=True)
            except subprocess.CalledProcessError as exc:
                found[tool] = f"SKIPPED: `pip install {package}` failed: {(exc.stderr or '').strip()[-300:]}"
                continue
        found[tool] = str(binary)
    return found


def same_everywhere(stages: Stages, hosts: list[str]) -> list[tuple[str, list[dict]]]:
    """Each stage's commands, which must be the same lines on every host (one playbook task / one operation each)."""
    plain = []
    for stage, commands in stages:
        first = commands[hosts[0]]
        if sorted(commands) != sorted(hosts) or any(commands[h] != first for h in hosts):
            raise BenchError(f"{stage}: not the same commands on every host; the playbook/deploy writer assumes so")
        plain.append((stage, first))
    return plain


def questions(commands: list[dict]) -> list[dict]:
    """D and E: one task per question the verify asks, as a playbook or a deploy is written (what Overhaul sends a
    host as one command, its probes joined between marks, is split back into its commands)."""
    return [part for command in commands for part in command.get("sections", [command])]


def failed_when(command: dict) -> str | None:
    """Ansible's form of the same output check."""
    if command.get("expect") == "running":
        return r"out.rc != 0 or (out.stdout_lines | reject('regex', '^\\S+\\s+RUNNING(\\s|$)') | list | length > 0)"
    if command.get("expect") == "disk":
        return (r"out.rc != 0 or (out.stdout | regex_findall('(\\d+)%') | map('int') | select('ge', "
                f"{command['threshold']}) | list | length > 0)")
    return None


def jinja_safe(line: str) -> str:
    return "{% raw %}" + line + "{% endraw %}" if any(mark in line for mark in ("{{", "{%", "{#")) else line


def ansible_side(work: Path, inventory: Inventory, stages: Stages, program: str) -> Side:
    """D: a playbook with one `shell` task per command, the lab's inventory as Ansible's, cold each run."""
    hosts = ssh_hosts(inventory)
    folder = work / "ansible"
    folder.mkdir()
    tasks = []
    for stage, commands in same_everywhere(stages, list(hosts)):
        for number, command in enumerate(questions(commands), 1):
            task = {"name": f"{stage} #{number}", "shell": jinja_safe(command["line"]), "register": "out",
                    "changed_when": False}
            if failed_when(command):
                task["failed_when"] = failed_when(command)
            tasks.append(task)
    (folder / "verify.yml").write_text(json.dumps([{"name": "verify", "hosts": "all", "gather_facts": False,
                                                     "tasks": tasks}], indent=1))
    known_hosts = {h["known_hosts"] for h in hosts.values()}.pop()
    (folder / "inventory.yml").write_text(json.dumps({"all": {
        "vars": {"ansible_ssh_common_args": f"-o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes",
                 "ansible_python_interpreter": "/usr/bin/python3"},
        "hosts": {name: {"ansible_host": h["address"], "ansible_port": h["port"], "ansible_user": h["user"],
                         "ansible_ssh_private_key_file": h["key_file"]} for name, h in hosts.items()},
    }}, indent=1))
    control = folder / "cp"
    control.mkdir()
    env = dict(os.environ, ANSIBLE_FORKS=str(len(hosts)), ANSIBLE_PIPELINING="True", ANSIBLE_HOST_KEY_CHECKING="True",
               ANSIBLE_SSH_CONTROL_PATH_DIR=str(control), ANSIBLE_HOME=str(folder / "home"),
               ANSIBLE_LOCAL_TEMP=str(folder / "tmp"), ANSIBLE_RETRY_FILES_ENABLED="False", ANSIBLE_NOCOLOR="1",
               ANSIBLE_CONFIG=str(folder / "none.cfg"))

    def run(group: CpuGroup) -> float:
        try:
            return run_timed([program, "-i", str(folder / "inventory.yml"), str(folder / "verify.yml")], folder, env,
                             group)
        finally:  # cold next time, like every other side: close the masters ControlPersist keeps for 60 s (they
            # are in `group`: what they spent is the controller's, counted once they have ended)
            for socket_path in control.iterdir():
                subprocess.run(["ssh", "-O", "exit", "-o", f"ControlPath={socket_path}", "lab"], capture_output=True)

    return run


def pyinfra_side(work: Path, inventory: Inventory, stages: Stages, program: str) -> Side:
    """E: a deploy with one `server.shell` operation per command, strict host keys, as wide as the lab."""
    hosts = ssh_hosts(inventory)
    folder = work / "pyinfra"
    folder.mkdir()
    entries = [(name, {"ssh_hostname": h["address"], "ssh_port": h["port"], "ssh_user": h["user"], "ssh_key": h["key_file"],
                       "ssh_known_hosts_file": h["known_hosts"], "ssh_strict_host_key_checking": "yes"})
               for name, h in hosts.items()]
    (folder / "inventory.py").write_text(f"hosts = {entries!r}\n")
    operations = ["from pyinfra.operations import server", ""]
    for stage, commands in same_everywhere(stages, list(hosts)):
        for number, command in enumerate(questions(commands), 1):
            operations.append(f"server.shell(name={f'{stage} #{number}'!r}, commands=[{command['line']!r}])")
    (folder / "deploy.py").write_text("\n".join(operations) + "\n")
    argv = [program, "-y", "--parallel", str(len(hosts)), "inventory.py", "deploy.py"]
    return lambda group: run_timed(argv, folder, group=group)


# -- the upgrade by hand -------------------------------------------------------------------------------------------
BACKUP = """set -eu -o pipefail
cnf=$(mktemp); trap 'rm -f "$cnf"' EXIT; cat > "$cnf"
mkdir -p /var/backups/bench && f=/var/backups/bench/pre-upgrade.sql.gz
mysqldump --defaults-extra-file="$cnf" --single-transaction --routines --events --all-databases | gzip > "$f"
gzip -t "$f"; [ "$(zcat "$f" | tail -n 1 | cut -c1-17)" = "-- Dump completed" ]
"""


def unavoidable_stages(inventory: Inventory, package: str, version: str, safety_reads: bool = False) -> Stages:
    """The upgrade's unavoidable commands, in the runbook's stage order: a proven backup, stop, install (the
    lists already hold the version), reconfigure db -> worker -> app, one verify command per host.

    With `safety_reads`, also the reads of the programs' states Overhaul's upgrade makes for safety: on every host
    before anything changes (its preflight: the supervisor answers), after the stop (all stopped before the
    package changes) and after each tier's reconfigure (all RUNNING before the next tier starts), each in the
    same command as the change it follows, as Overhaul sends them."""
    password = inventory.secrets["mysql_backup_password"].resolve()
    role = {host.name: host.roles[0] for host in inventory.hosts}
    every = list(role)

    def on(names: list[str], line: str, stdin: str = "") -> dict[str, list[dict]]:
        return {name: [{"line": line, "stdin": stdin}] for name in names}

    of = {r: [n for n in every if role[n] == r] for r in ("db", "worker", "app")}
    states = f" && {{ {package}-manage status || true; }}" if safety_reads else ""  # the states, whatever they are
    reconfigure = f"{package}-ctl reconfigure{states}"
    preflight = [("preflight", on(every, f"{package}-manage status"))] if safety_reads else []
    return [*preflight,
        ("backup", on(of["db"], f"bash -c {shlex.quote(BACKUP)}", f'[client]\nuser=backup\npassword="{password}"\n')),
        ("stop", on(every, f"{package}-manage stop all{states}")),
        ("install", on(every, f"DEBIAN_FRONTEND=noninteractive apt-get install -y -q {package}={version}")),
        ("reconfigure db", on(of["db"], reconfigure)),
        ("reconfigure worker", on(of["worker"], reconfigure)),
        ("reconfigure app", on(of["app"], reconfigure)),
        ("verify", on(every, f"service scalr status && {package}-manage status && df -P /opt/{package}")),
    ]


# -- who spent the CPU ----------------------------------------------------------------------------------------------
def counting_root() -> tuple[Path, bool]:
    """Where counting groups are made: the cgroup v2 hierarchy if mounted (True), else cgroup v1's cpuacct (False).

    A group made here only counts (no controller is enabled in it): what its processes, and everything they start,
    spend on the CPU, whether they are still running or were never waited for (ssh masters, a host's orphans)."""
    v1 = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, tail = line.partition(" - ")
        fstype, _source, options = tail.split()[:3]
        if fstype == "cgroup2":
            return Path(fields.split()[4]), True
        if fstype == "cgroup" and "cpuacct" in options.split(","):
            v1 = Path(fields.split()[4])
    if v1 is None:
        raise BenchError("no cgroup hierarchy that counts CPU (cgroup2, or cgroup v1 with cpuacct) is mounted")
    return v1, False


class CpuGroup:
    """A cgroup of the bench's own that counts the CPU of the processes put in it and of all they start."""

    def __init__(self, name: str):
        root, self.v2 = counting_root()
        self.path = root / f"overhaul-bench-{os.getpid()}-{name}"
        try:
            self.path.mkdir()
        except OSError as exc:
            raise BenchError(f"cannot make the counting cgroup {self.path} (run as root): {exc}") from exc

    def enter(self) -> None:
        """Put the calling process in the group (a side's process calls it between fork and exec)."""
        self.add(os.getpid())

    def add(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
            (self.path / "cgroup.procs").write_text(str(pid))

    def pids(self) -> list[int]:
        return [int(pid) for pid in (self.path / "cgroup.procs").read_text().split()]

    def seconds(self) -> float:
        """CPU seconds the group's processes have spent, alive or ended, since it was made."""
        if self.v2:
            stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
            return int(stat["usage_usec"]) / 1e6
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until every process of the group has ended (a side's leftovers: ssh masters told to exit)."""
        deadline = time.monotonic() + timeout
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        """Remove the group; processes still in it go back to the root (its CPU so far is no longer counted)."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                (self.path.parent / "cgroup.procs").write_text(str(pid))
        for _ in range(100):  # a process that just ended may hold the group a moment longer
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.05)


class Meter:
    """Each side's wall time, the controller's CPU (its process and everything it starts on this machine) and the
    hosts' CPU (every process inside the lab's hosts: sshd, the commands, supervisord and its programs, MariaDB)."""

    def __init__(self) -> None:
        self.controller = CpuGroup("controller")
        self.hosts = CpuGroup("hosts")

    def track(self, lab: Lab) -> None:
        """Count a (new) lab's hosts: their processes move into the hosts' group, and so will all they start."""
        for _ in range(2):  # a second pass for what the first one's processes forked meanwhile
            for pid in (pid for host in lab.hosts() for pid in host.processes()):
                self.hosts.add(pid)

    def measure(self, series: Series, side: Side) -> None:
        controller, hosts = self.controller.seconds(), self.hosts.seconds()
        wall = side(self.controller)
        self.controller.settle()
        series.add(wall, self.controller.seconds() - controller, self.hosts.seconds() - hosts)

    def close(self) -> None:
        self.controller.close()
        self.hosts.close()


# -- reporting -----------------------------------------------------------------------------------------------------
def ratio_line(label: str, top: Series, bottom: Series, target: str = CONTEXT,
               good: Callable[[float], bool] = lambda ratio: True, measure: str = "wall") -> str:
    """The median of the per-round ratios of `measure` (the verdict), their range, and the ratio of the two sides'
    lowest values (what each side costs when nothing else on the machine gets in its way: a check on the median)."""
    tops, bottoms = getattr(top, MEASURES[measure]), getattr(bottom, MEASURES[measure])
    ratios = [t / b for t, b in zip(tops, bottoms, strict=True)]
    middle = statistics.median(ratios)
    verdict = "" if target == CONTEXT else "met" if good(middle) else "MISSED"
    return (f"  {label:<46} {measure:<14} {middle:6.2f}x  ({min(ratios):5.2f}-{max(ratios):5.2f}x; best/best "
            f"{min(tops) / min(bottoms):5.2f}x)  target {target:<22} {verdict}")


def load() -> str:
    """The machine's load average: these numbers are wall times on a shared machine."""
    return "load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])


def times_line(series: Series) -> str:
    """A side's medians (wall time with its range; the controller's and the hosts' CPU)."""
    times = series.times
    return (f"  {series.label:<46} wall {statistics.median(times):6.2f} s ({min(times):5.2f}-{max(times):5.2f})  "
            f"controller CPU {series.median('controller CPU'):6.2f} s  hosts CPU {series.median('hosts CPU'):6.2f} s")


def rounds(sides: list[tuple[Series, Side]], count: int, meter: Meter) -> None:
    """One warm-up round, then `count` rounds of every side in turn."""
    for index in range(count + 1):
        for series, side in sides:
            meter.measure(series if index else Series(series.label), side)  # round 0 warms up


def command_kinds(lines: list[str], package: str) -> str:
    """How many command lines ask each recurring question (a line that batches several counts for each)."""
    kinds = {"installed version (dpkg-query -W)": "dpkg-query -W", "package manager (apt-get/apt-cache/dpkg)": "apt-",
             f"{package}-manage status": f"{package}-manage status", f"{package}-ctl reconfigure": "-ctl reconfigure",
             "service scalr status": "service scalr status", "df -P": "df -P", "mysql/mysqldump": "mysql"}
    counts = {kind: sum(needle in line for line in lines) for kind, needle in kinds.items()}
    return ", ".join(f"{kind}: {n}" for kind, n in counts.items() if n)


def command_table(inventory: Inventory, sent: dict[str, list[str]], logged: dict[str, int], package: str,
                  limit: int | None = None) -> list[str]:
    """Commands per host, one line per group of hosts that got the same number and kinds; app hosts against `limit`."""
    alike: dict[tuple, list[str]] = {}
    for host in inventory.hosts:
        lines = sent[host.name]
        alike.setdefault((host.roles[0], len(lines), logged.get(host.name, 0), command_kinds(lines, package)),
                         []).append(host.name)
    table = []
    for (role, total, in_logs, kinds), names in alike.items():
        verdict = "" if limit is None else " met" if role != "app" or total <= limit else " MISSED"
        table.append(f"  {role:<7} {total:3d} commands ({in_logs} answers in its stage logs){verdict} on "
                     f"{', '.join(names)}\n          (commands that ask: {kinds})")
    return table


def one_check_folders(checks: Path, work: Path) -> dict[str, Path]:
    """For each test function of the checks folder (top-level `test*` functions; a test class is kept whole in every
    folder), a folder with its file holding only that test (the rest of the file, and every file that is not a
    test file, kept): to measure what each check costs on its own."""
    folders = {}
    for file in sorted(checks.glob("test_*.py")):
        text = file.read_text()
        lines = io.StringIO(text).readlines()  # lines as ast numbers them (str.splitlines also splits at \f, ...)
        tests = [node for node in ast.parse(text).body
                 if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test")]
        for kept in tests:
            dropped = {number for node in tests if node is not kept
                       for number in range(min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1, node.end_lineno)}
            name = f"{file.stem}::{kept.name}"
            folder = work / f"only-{file.stem}-{kept.name}"
            shutil.copytree(checks, folder, ignore=shutil.ignore_patterns("test_*.py", "__pycache__"))
            (folder / file.name).write_text("".join(line for number, line in enumerate(lines) if number not in dropped))
            folders[name] = folder
    return folders


def bench_each_check(project: Path, work: Path, verify: tuple[Series, Side], count: int, size: int,
                     meter: Meter) -> None:
    """Rounds of the built-in verify against itself plus one check of checks/ at a time: what each check adds."""
    plain = Series(verify[0].label)
    sides = [(plain, verify[1])] + [(Series(f"+ {name}"), cli_side(project, "verify", "--env", "lab", "--checks", str(folder)))
                                    for name, folder in one_check_folders(project / "checks", work).items()]
    rounds(sides, count, meter)
    print(f"\n== {size} hosts: the built-in verify plus one check of checks/ at a time, {count} rounds (+1 warm-up); "
          f"{load()}")
    for series, _ in sides:
        print(times_line(series))
    for series, _ in sides[1:]:
        for measure in MEASURES:
            print(ratio_line(f"{series.label[2:].partition('::')[2][:40]} / A", series, plain,
                             measure=measure))


# -- one lab size ----------------------------------------------------------------------------------------------------
def new_project(tmp: Path, subnet: str = SUBNET) -> tuple[Path, Lab]:
    project = tmp / "project"
    project.mkdir()
    shutil.copytree(REPOSITORY / "checks", project / "checks")
    lab = Lab(home=tmp / "lab", inventory=project / "hosts/lab.yaml", subnet=subnet, log=lambda _: None)
    return project, lab


def bench_size(size: int, count: int, tools: dict[str, str], meter: Meter, subnet: str = SUBNET, upgrade: bool = True,
               each_check: bool = False) -> dict[str, Series]:
    """The verify's sides at one size (returned by letter, for the costs per added host), then the upgrade's."""
    with tempfile.TemporaryDirectory(prefix="overhaul-peers-") as tmp_name:
        tmp = Path(tmp_name)
        project, lab = new_project(tmp, subnet)
        try:
            lab.up(size)
            meter.track(lab)
            inventory = load_inventory_file(lab.inventory)
            package = inventory.vars.get("package", "scalr-server")
            stages = verify_stages(project, inventory, package)
            verify = (Series("A overhaul verify --no-checks"), cli_side(project, "verify", "--env", "lab", "--no-checks"))
            sides = [verify, (Series("B overhaul verify (checks/)"), cli_side(project, "verify", "--env", "lab")),
                     (Series("C raw paramiko, same command lines"), raw_side(tmp, inventory, stages))]
            skipped = []
            for tool, make in (("ansible", ansible_side), ("pyinfra", pyinfra_side)):
                if tools[tool].startswith("SKIPPED"):
                    skipped.append(f"  {tool}: {tools[tool]}")
                else:
                    letter = "D" if tool == "ansible" else "E"
                    sides.append((Series(f"{letter} {tool}, one task per question"), make(tmp, inventory, stages, tools[tool])))
            per_host = sum(len(commands) for _, hosts in stages for commands in hosts.values()) / size
            print(f"\n== {size} hosts: verify, {count} rounds (+1 warm-up), {per_host:g} commands per host, "
                  f"{len(stages)} stages; {load()}", flush=True)
            rounds(sides, count, meter)
            series = {s.label[0]: s for s, _ in sides}
            for s, _ in sides:
                print(times_line(s))
            for line in skipped:
                print(line)
            a, b, c = series["A"], series["B"], series["C"]
            print(ratio_line("A / C  built-in vs raw paramiko, same lines", a, c, "<= 1.15x (50 hosts)",
                             lambda r: r <= 1.15))
            print(ratio_line("B / A  verify with checks vs built-in", b, a))
            if "E" in series:
                print(ratio_line("A / E  built-in vs pyinfra", a, series["E"]))
            if "D" in series:
                print(ratio_line("D / A  Ansible vs built-in", series["D"], a))
            print("  whole runs, start-up included (the targets are per added host, after the last size):")
            print(ratio_line("A / C  built-in vs raw paramiko", a, c, measure="controller CPU"))
            if "E" in series:
                print(ratio_line("A / E  built-in vs pyinfra", a, series["E"], measure="controller CPU"))
            if "D" in series:
                print(ratio_line("D / A  Ansible vs built-in", series["D"], a, measure="controller CPU"))
            print(ratio_line("B / A  verify with checks vs built-in", b, a, measure="controller CPU"))
            print(ratio_line("B / A  verify with checks vs built-in", b, a, measure="hosts CPU"))
            print(ratio_line("A / C  built-in vs raw paramiko, same lines", a, c, measure="hosts CPU"))
            if each_check:
                bench_each_check(project, tmp, verify, count, size, meter)
            if not upgrade:
                return series

            elapsed, sent, logged = counted_upgrade(project, inventory)
            print(f"\n== {size} hosts: upgrade 1.0.0 -> 1.1.0 in {elapsed:.1f} s; commands per host (target: app hosts <= 10)")
            print(*command_table(inventory, sent, logged, package, limit=10), sep="\n")
            elapsed, sent, logged = counted_upgrade(project, inventory)
            print(f"  the no-op re-run (once, recorded; {elapsed:.1f} s) sends:")
            print(*command_table(inventory, sent, logged, package), sep="\n")

            noop = Series("no-op upgrade --version 1.1.0")
            plain = Series(verify[0].label)
            rounds([(plain, verify[1]), (noop, cli_side(project, *UPGRADE))], count, meter)
            print(f"\n== {size} hosts: no-op re-run of the upgrade, {count} rounds (+1 warm-up); {load()}")
            print(times_line(plain))
            print(times_line(noop))
            print(ratio_line("no-op upgrade / verify", noop, plain, "<= 1.15x", lambda r: r <= 1.15, "controller CPU"))
            print(ratio_line("no-op upgrade / verify (not the same host work)", noop, plain))
            print(ratio_line("no-op upgrade / verify", noop, plain, measure="hosts CPU"))
            return series
        finally:
            lab.down()


def bench_critical_path(size: int, count: int, meter: Meter, subnet: str = SUBNET) -> None:
    """Rounds of: a fresh lab upgraded by overhaul; a fresh lab upgraded by hand (the unavoidable commands only);
    a fresh lab upgraded by hand with Overhaul's safety reads of the programs' states added (see unavoidable_stages)."""
    with tempfile.TemporaryDirectory(prefix="overhaul-peers-") as tmp_name:
        tmp = Path(tmp_name)
        project, lab = new_project(tmp, subnet)
        upgrade, by_hand = Series("overhaul upgrade 1.0.0 -> 1.1.0"), Series("by hand: unavoidable commands, same order")
        safe = Series("by hand, plus Overhaul's reads of the states")
        try:
            for _ in range(count):
                for series in (upgrade, by_hand, safe):
                    lab.down()
                    lab.up(size)
                    meter.track(lab)
                    inventory = load_inventory_file(lab.inventory)
                    if series is upgrade:
                        side = cli_side(project, *UPGRADE)
                    else:
                        stages = unavoidable_stages(inventory, inventory.vars.get("package", "scalr-server"), "1.1.0",
                                                    safety_reads=series is safe)
                        side = raw_side(tmp, inventory, stages, "by-hand-spec.json")
                    meter.measure(series, side)
        finally:
            lab.down()
    print(f"\n== {size} hosts: upgrade vs the critical path of its unavoidable commands, {count} rounds (a fresh lab "
          f"each); {load()}")
    print(times_line(upgrade))
    print(times_line(by_hand))
    print(times_line(safe))
    print(ratio_line("upgrade / by hand with the same safety reads", upgrade, safe, f"<= 1.1x ({size} hosts)",
                     lambda r: r <= 1.1))
    print(ratio_line("upgrade / critical path (less host work)", upgrade, by_hand))
    print(ratio_line("the safety reads alone: by hand with / without", safe, by_hand))
    for measure in ("controller CPU", "hosts CPU"):
        print(ratio_line("upgrade / by hand with the same safety reads", upgrade, safe, measure=measure))


def per_added_host(results: dict[int, dict[str, Series]]) -> None:
    """The cost of one more host, on each side: the slope of its medians between the smallest and the largest size
    (start-up, imports and the like cancel out), and the targets on the controller's CPU."""
    small, large = min(results), max(results)
    if small == large:
        return

    def slope(letter: str, measure: str = "controller CPU") -> float:
        return (results[large][letter].median(measure) - results[small][letter].median(measure)) / (large - small)

    print(f"\n== per added host, {small} -> {large} hosts (each side's medians)")
    letters = [letter for letter in "ABCDE" if letter in results[large]]
    for letter in letters:
        print(f"  {results[large][letter].label:<46} controller CPU {slope(letter) * 1000:6.1f} ms  hosts CPU "
              f"{slope(letter, 'hosts CPU') * 1000:6.1f} ms  wall {slope(letter, 'wall') * 1000:6.1f} ms")
    checks = slope("B") - slope("A")
    print(f"  {'what the checks add (B - A)':<46} controller CPU {checks * 1000:6.1f} ms  hosts CPU "
          f"{(slope('B', 'hosts CPU') - slope('A', 'hosts CPU')) * 1000:6.1f} ms")
    sessions = {size: min(CHECK_WIDTH, size) for size in (small, large)}
    if sessions[small] != sessions[large]:
        # a session costs the same whatever its hosts (pytest's configuration, plugins, collection): going from
        # fewer sessions to more puts that fixed cost into the slope, as if each host paid for it
        print(f"  (the checks ran in {sessions[small]} pytest sessions at {small} hosts, {sessions[large]} at {large}: "
              f"the slope also holds {sessions[large] - sessions[small]} sessions' fixed cost; both sizes >= "
              f"{CHECK_WIDTH} measure the hosts alone)")

    def line(label: str, top: float, bottom: float, target: str, limit: float, at_most: bool = True) -> str:
        """A ratio of two slopes against its target; a slope at or below zero is the machine's noise, not a cost:
        no verdict then (more rounds, or sizes further apart)."""
        if top <= 0 or bottom <= 0:
            return (f"  {label:<46} controller CPU     --   target {target:<22} NO VERDICT: a slope <= 0 is noise "
                    "(more --rounds, sizes further apart)")
        good = top / bottom <= limit if at_most else top / bottom >= limit
        return f"  {label:<46} controller CPU {top / bottom:6.2f}x  target {target:<22} {'met' if good else 'MISSED'}"

    a = slope("A")
    print(line("A / C  built-in vs raw paramiko", a, slope("C"), "<= 1.2x", 1.2))
    if "E" in results[large]:
        print(line("A / E  built-in vs pyinfra", a, slope("E"), "<= 1.0x", 1.0))
    print(line("(B - A) / A  the checks vs the built-in", checks, a, "<= 1.0x", 1.0))
    if "D" in results[large]:
        print(line("D / A  Ansible vs built-in", slope("D"), a, ">= 10x", 10.0, at_most=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,32", help="lab sizes, comma-separated (default 8,32)")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per comparison (default 5)")
    parser.add_argument("--upgrade-rounds", type=int, default=3,
                        help="rounds of the critical-path comparison, at the smallest size (default 3; 0 skips it)")
    parser.add_argument("--subnet", default=SUBNET, help=f"the labs' loopback subnet, three octets (default {SUBNET})")
    parser.add_argument("--verify-only", action="store_true", help="only the verify comparisons: no upgrade measured")
    parser.add_argument("--each-check", action="store_true",
                        help="also the built-in verify plus each check of checks/ alone: what each check adds")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",") if size.strip()]
    tools = peers_venv()
    print(f"overhaul from {Path(sys.modules['overhaul'].__file__).parent}; peers: "
          + ", ".join(f"{tool} {'missing' if path.startswith('SKIPPED') else 'installed'}" for tool, path in tools.items()))
    meter = Meter()
    try:
        results = {size: bench_size(size, args.rounds, tools, meter, args.subnet, upgrade=not args.verify_only,
                                    each_check=args.each_check) for size in sizes}
        per_added_host(results)
        if args.upgrade_rounds and not args.verify_only:
            bench_critical_path(min(sizes), args.upgrade_rounds, meter, args.subnet)
    finally:
        meter.close()


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        sys.exit(f"bench: {exc}")
