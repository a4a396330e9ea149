"""A test kit: a fake host for step authors, and a fake connection the engine runs whole plans on. No SSH, no root.

**One step** — a step's parsing and decisions (what `check` concludes from a command's output, what `apply` runs,
what it remembers for an undo) are tested on `fake_host` in milliseconds::

    from overhaul.testing import Answer, fake_host

    host = fake_host({"df -P": Answer(stdout=DF_AT_85_PERCENT)})
    assert not DiskUsage(DiskUsage.Params(threshold=80)).check(host).done
    assert host.remote.commands == ["df -P -- /opt/scalr-server"]

Each command the step runs is matched against the table's keys in order: a key that the command's text
contains answers it (a compiled `re.Pattern` is searched instead). A command nothing answers fails the test
at once, naming the command: the table is the whole of what the host knows. What the step ran is in
`host.remote.commands`, in order, each as its text (`Command.text`), and what it sent on standard input in
`host.remote.stdins`. A reply may also be a function of the command's text, or `in_turn(...)` replies given one
per call (a command that fails twice, then succeeds).

The fake host is a `StepHost` over a fake connection: facts are cached as in a run, and probes are read one
command each.

**A whole plan** — the engine's rules (failure budgets, strategies, retries, resume, undo, the preflight gate, the
journal) run on `FakeTransport`, which stands in for `overhaul.transport.Transport`: the `Runner` and
`run_preflight` take it as they take the real one::

    from overhaul.testing import Answer, FakeTransport, fake_inventory, fake_plan, in_turn

    # Touch: a step whose check runs `test -e PATH` and whose apply runs `touch PATH`
    inventory = fake_inventory({"db1": ["db"], "app1": ["app"]})
    plan = fake_plan({"name": "demo", "stages": [{"name": "mark", "step": "touch", "params": {"path": "/x"},
                                                  "max_failures": 1}]}, inventory, [Touch])
    transport = FakeTransport(inventory, {"touch": Answer()},
                              hosts={"db1": {"test -e": in_turn(Answer(exited=1), Answer())},
                                     "app1": {"test -e": Answer(exited=1)}})
    result = Runner(plan, transport, sleep=lambda _: None).run()
    assert [r.outcome.value for r in result.results] == ["changed", "failed"]  # app1: its verify never holds
    assert transport.host("db1").commands == ["test -e /x", "touch /x", "test -e /x"]

Each host answers from its own table (`hosts`) first, then from the common one; what it ran is recorded per host
(`transport.host(name).commands`) and across hosts in order (`transport.commands`, (host, command) pairs). A host
named in `unreachable` cannot be connected to (`HostUnreachable`, as the real transport raises), for good or, given
as `{name: N}`, for its first N attempts; a reply may raise `HostUnreachable` too (a connection lost during a
command). Several probes sent as one command (the preflight's and the runner's `prefetch`, an apply's
`run_then_read`) and durable commands are unframed: each probe's command is answered and recorded on its own, and
answered in the framing the engine reads back. A command no table answers fails its pair, the message naming the
command (`transport.unanswered` lists them). A reply in the common table is one object shared by every host (an
`in_turn` there counts the calls of all hosts): give each host its own where it keeps state.

The fake answers at once, where real hosts take milliseconds: in a parallel stage, a host's failure may come before
the other hosts' pairs started, and a spent failure budget then skips them ("stage failure budget exceeded"). A test
that needs every pair of a stage started first makes them wait for each other (a `threading.Barrier` in a reply).

`fake_inventory` and `fake_plan` make the inventory and the plan from Python values, without files.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from overhaul.command import Command, as_command
from overhaul.config import Document
from overhaul.context import MARK, Facts, Probe, StepHost, probe_script
from overhaul.errors import ConfigError, HostUnreachable, StepFailed
from overhaul.inventory import Inventory
from overhaul.plan import Plan, build_plan
from overhaul.runbook import LoadedRunbook, Runbook
from overhaul.secrets import Redactor
from overhaul.step import Registry, Step
from overhaul.transport import CommandResult, HostPool, durable_command

__all__ = ["Answer", "FakeRemote", "FakeTransport", "fake_host", "fake_inventory", "fake_plan", "in_turn"]


@dataclass(frozen=True)
class Answer:
    """What the fake host answers to a command: its exit code and output."""

    stdout: str = ""
    exited: int = 0
    stderr: str = ""


Reply = Answer | Callable[[str], Answer]  # an answer, or one made from the command's text (it may raise)
Table = Mapping[str | re.Pattern[str], Reply] | Iterable[tuple[str | re.Pattern[str], Reply]]


def in_turn(*replies: Reply | BaseException) -> Callable[[str], Answer]:
    """A reply that answers with `replies` one per call, in order; the last answers every later call. An exception
    is raised instead (`HostUnreachable`: the connection dropped during the command). Thread-safe.

    A command that fails twice, then succeeds: `in_turn(Answer(exited=1), Answer(exited=1), Answer())`."""
    if not replies:
        raise ValueError("in_turn needs at least one reply")
    left = list(replies)
    lock = threading.Lock()

    def reply(text: str) -> Answer:
        with lock:
            current = left.pop(0) if len(left) > 1 else left[0]
        if isinstance(current, BaseException):
            raise current
        return current(text) if callable(current) else current

    return reply


def _table(answers: Table) -> list[tuple[str | re.Pattern[str], Reply]]:
    return list(answers.items()) if isinstance(answers, Mapping) else list(answers)


# The engine's framings, as its own functions write them (HOLE marks where a command goes).
_HOLE = "\x00"
_PROBE_HEAD, _PROBE_TAIL = probe_script([Command.script(_HOLE)]).text.split(_HOLE)
_THEN = re.compile(r"\A\{ (?P<body>.*)\n\}; rc=\$\?; (?P<probes>.*); exit \$rc\Z", re.DOTALL)
_DURABLE = re.compile(r"\Amkdir -p \S+ && \{ flock -o -n \S+ true \|\| echo .*? >&2; \} && "
                      r"flock -o -w \S+ \S+ sh -c (?P<body>'.*')\Z", re.DOTALL)
_DURABLE_HEAD, _DURABLE_TAIL = shlex.split(
    durable_command(Command.script(_HOLE), "lock", 1.0).text.rsplit(" sh -c ", 1)[1])[0].split(_HOLE)


def _probes_of(text: str) -> list[str] | None:
    """The commands of a `probe_script`, or None when `text` is not one."""
    if not text:
        return []
    if not (text.startswith(_PROBE_HEAD) and text.endswith(_PROBE_TAIL)):
        return None
    return text[len(_PROBE_HEAD):len(text) - len(_PROBE_TAIL)].split(f"{_PROBE_TAIL}; {_PROBE_HEAD}")


def _undurable(text: str) -> str:
    """The command inside a `durable_command` (or `text` itself, when it is none)."""
    match = _DURABLE.match(text)
    if match is None:
        return text
    words = shlex.split(match["body"])
    body = words[0] if len(words) == 1 else ""
    if body.startswith(_DURABLE_HEAD) and body.endswith(_DURABLE_TAIL):
        return body[len(_DURABLE_HEAD):len(body) - len(_DURABLE_TAIL)]
    return text


@dataclass
class FakeRemote:
    """The connection a fake host runs its commands on: the table's answers, and a record of each command.

    It stands in for `overhaul.transport.RemoteHost`: `connect` fails while `unreachable` attempts are left
    (`math.inf`: always), and commands sent framed by the engine (probes read in one round trip, `run_then_read`,
    durable commands) are answered one by one from the table (see the module)."""

    answers: list[tuple[str | re.Pattern[str], Reply]]
    name: str = "host1"
    roles: list[str] = field(default_factory=list)
    vars: dict[str, Any] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    user: str = "root"
    inventory: Any = None  # fake_host: no inventory (a step that reads one is not unit-tested there)
    redactor: Redactor = field(default_factory=Redactor)
    commands: list[str] = field(default_factory=list)  # each command as the step wrote it, unframed
    stdins: list[str | None] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)  # each round trip's text, as the engine framed it
    unreachable: float = 0  # connection attempts still to fail
    connected: bool = False
    heard: Callable[[str, str], None] | None = None  # told (host, command) of each command (FakeTransport's log)
    _cut: bool = False

    def connect(self) -> FakeRemote:
        """Open the connection (`HostUnreachable` while `unreachable` attempts are left, or once cut)."""
        if self._cut:
            raise HostUnreachable(f"{self.name}: not connecting: the run's connections were cut (Ctrl-C)")
        if self.connected:
            return self
        if self.unreachable > 0:
            self.unreachable -= 1
            raise HostUnreachable(f"{self.name}: connection refused (unreachable on the fake transport)")
        self.connected = True
        return self

    def close(self, now: bool = False) -> None:
        self.connected = False

    def cut(self) -> None:
        self._cut = True
        self.close(now=True)

    def run(self, command: Command | str, *, sudo: bool | None = None, stdin: str | None = None,
            timeout: float | None = None, durable: str | None = None) -> CommandResult:
        text = as_command(command).text
        self.connect()  # as a real host: a command connects first (unless connected)
        self.sent.append(text)
        try:
            exited, stdout, stderr = self._framed(text, stdin)
        except HostUnreachable:
            self.connected = False  # as the real transport: a connection lost during a command is dropped
            raise
        return CommandResult(text, exited, self.redactor(stdout), self.redactor(stderr), 0.0)

    def _framed(self, text: str, stdin: str | None) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) of `text`, each command in the engine's framing answered on its own."""
        probes = _probes_of(text)
        if probes is not None:  # StepHost.prefetch: every probe in one command
            return 0, self._sections(probes), ""
        then = _THEN.match(text)
        if then is not None:  # StepHost.run_then_read: a command, then probes read after it
            probes = _probes_of(then["probes"])
            if probes is not None:
                answer = self._answer(_undurable(then["body"]), stdin)
                return answer.exited, answer.stdout + self._sections(probes), answer.stderr
        answer = self._answer(_undurable(text), stdin)
        return answer.exited, answer.stdout, answer.stderr

    def _sections(self, probes: list[str]) -> str:
        out = []
        for probe in probes:
            answer = self._answer(probe, None)
            out.append(f"{MARK}\n{answer.stdout}{answer.stderr}\n{MARK}{answer.exited}\n")  # (stderr merged: 2>&1)
        return "".join(out)

    def _answer(self, text: str, stdin: str | None) -> Answer:
        self.commands.append(text)
        self.stdins.append(stdin)
        if self.heard is not None:
            self.heard(self.name, text)
        for key, reply in self.answers:
            if (key.search(text) if isinstance(key, re.Pattern) else key in text):
                return reply(text) if callable(reply) else reply
        raise AssertionError(f"the fake host {self.name} has no answer for: {text}")

    def secret(self, name: str) -> str:
        if name not in self.secrets:
            raise StepFailed(f"no secret named {name!r} in the inventory (secrets: {', '.join(sorted(self.secrets))})")
        return self.redactor.add(self.secrets[name])

    def download(self, remote_path: str, local_path: Path) -> None:
        raise AssertionError(f"the fake host {self.name} has no files to download ({remote_path})")


class FakeStepHost(StepHost):
    """A `StepHost` whose probes are read one command each (see the module)."""

    remote: FakeRemote  # type: ignore[assignment]  # (duck-typed: the remote's members a StepHost uses)

    def prefetch(self, probes: Iterable[Probe[Any]]) -> None:
        for probe in probes:
            self.read(probe)

    def run_then_read(self, command: Command | str, probes: list[Probe[Any]], *, stdin: str | None = None,
                      durable: str | None = None, label: str | None = None) -> CommandResult:
        result = self.run(command, stdin=stdin, durable=durable, label=label)
        self.forget()
        for probe in probes:
            self.read(probe)
        return result


def fake_host(answers: Table, *, name: str = "host1", roles: Iterable[str] = (), vars: Mapping[str, Any] | None = None,
              secrets: Mapping[str, str] | None = None, run_id: str = "20261207T000000-000000",
              timeout: float = 60.0) -> FakeStepHost:
    """A `StepHost` answering commands from `answers` (see the module); `host.remote.commands` records them."""
    remote = FakeRemote(_table(answers), name, list(roles), dict(vars or {}), dict(secrets or {}))
    return FakeStepHost(remote, timeout=timeout, run_id=run_id, facts=Facts())  # type: ignore[arg-type]


class FakeTransport(HostPool):
    """The connections of one run, faked: each host of `inventory` answers from its table (see the module).

    `answers`: the table every host answers from; `hosts`: a host's own table, asked first. `unreachable`: hosts
    that cannot be connected to, for good (names) or for their first N attempts ({name: N}). It has what the
    engine uses of `overhaul.transport.Transport`: `host`, `connect`, `hold`, `release`, `park`, `parks`,
    `max_workers`, `redactor`, `close`, `cut`; `commands` records (host, command) across hosts in order, and
    `unanswered` the commands no table answered."""

    def __init__(self, inventory: Inventory, answers: Table = (), *, hosts: Mapping[str, Table] | None = None,
                 unreachable: Iterable[str] | Mapping[str, int] = (), redactor: Redactor | None = None,
                 max_workers: int | None = None):
        super().__init__()
        self.inventory = inventory
        self.redactor = redactor or Redactor()
        self.max_workers = max_workers or max(1, min(inventory.ssh.forks, len(inventory.hosts)))
        self.commands: list[tuple[str, str]] = []
        self.unanswered: list[tuple[str, str]] = []
        self._common = _table(answers)
        self._own = {name: _table(table) for name, table in (hosts or {}).items()}
        down = unreachable if isinstance(unreachable, Mapping) else dict.fromkeys(unreachable, float("inf"))
        self._unreachable: dict[str, float] = dict(down)
        for name in [*self._own, *self._unreachable]:
            inventory.host(name)  # a name the inventory does not have is the test's mistake: KeyError now
        self._hosts: dict[str, FakeRemote] = {}

    def host(self, name: str) -> FakeRemote:
        with self._lock:
            if name not in self._hosts:
                host = self.inventory.host(name)
                remote = FakeRemote([*self._own.get(name, []), *self._common], name, host.roles,
                                    self.inventory.host_vars(host), user=host.user or self.inventory.ssh.user,
                                    inventory=self.inventory, redactor=self.redactor,
                                    unreachable=self._unreachable.get(name, 0), heard=self._heard)
                remote.answers.append((re.compile(""), self._no_answer(name)))
                remote._cut = self._cut
                self._hosts[name] = remote
            return self._hosts[name]

    def _heard(self, host: str, command: str) -> None:
        with self._lock:
            self.commands.append((host, command))

    def _no_answer(self, host: str) -> Callable[[str], Answer]:
        def fail(text: str) -> Answer:
            with self._lock:
                self.unanswered.append((host, text))
            raise AssertionError(f"the fake host {host} has no answer for: {text}")

        return fail

    def connected(self) -> list[str]:
        """The hosts whose (fake) connection is open now."""
        with self._lock:
            return [name for name, host in self._hosts.items() if host.connected]


def fake_inventory(hosts: Mapping[str, Iterable[str] | Mapping[str, Any]], environment: str = "fake",
                   **fields: Any) -> Inventory:
    """An inventory of `hosts` (name -> roles, or name -> the host's fields: roles, vars, user...), validated as a
    file's would be; `fields`: the inventory's other fields (vars, role_vars, ssh, secrets, policy). Each host gets
    an address of its own (never connected to)."""
    listed = []
    for index, (name, given) in enumerate(hosts.items()):
        entry = dict(given) if isinstance(given, Mapping) else {"roles": list(given)}
        listed.append({"name": name, "address": str(ipaddress.IPv4Address("10.0.0.0") + index + 1), **entry})
    inventory = Inventory.model_validate({"environment": environment, "hosts": listed, **fields})
    problems = [message for _, message in inventory.conflicts()]
    if problems:
        raise ConfigError(problems)
    return inventory


def fake_plan(runbook: Mapping[str, Any] | str, inventory: Inventory, steps: Iterable[type[Step[Any]]] = (),
              params: Mapping[str, Any] | None = None, limit: str = "") -> Plan:
    """The plan of `runbook` (a runbook's fields, or its YAML text) on `inventory`, as `build_plan` makes it from
    files: `steps` are registered besides the installed ones; `params` are the run's parameters."""
    data = yaml.safe_load(runbook) if isinstance(runbook, str) else dict(runbook)
    name = data.get("name") if isinstance(data, dict) else None
    document = Document(Path(f"<runbook {name or '?'}>"), data, {})
    loaded = LoadedRunbook(document.validate(Runbook), document)
    problems = [message for _, message in loaded.runbook.conflicts()]
    if problems:
        raise ConfigError(problems)
    registry = Registry(local_dirs=[])
    for step in steps:
        registry.add(step)
    return build_plan(loaded, inventory, registry, dict(params or {}), limit=limit)
