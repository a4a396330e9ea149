"""A test kit for step authors: a fake host that answers commands from a table, with no SSH and no root.

A step's parsing and decisions (what `check` concludes from a command's output, what `apply` runs, what it
remembers for an undo) are tested on it in milliseconds::

    from overhaul.testing import Answer, fake_host

    host = fake_host({"df -P": Answer(stdout=DF_AT_85_PERCENT)})
    assert not DiskUsage(DiskUsage.Params(threshold=80)).check(host).done
    assert host.remote.commands == ["df -P -- /opt/scalr-server"]

Each command the step runs is matched against the table's keys in order: a key that the command's text
contains answers it (a compiled `re.Pattern` is searched instead). A command nothing answers fails the test
at once, naming the command: the table is the whole of what the host knows. What the step ran is in
`host.remote.commands`, in order, each as its text (`Command.text`), and what it sent on standard input in
`host.remote.stdins`.

The fake is a `StepHost` over a fake connection: facts are cached as in a run, and probes are read one command
each (a real host gets them in one round trip: that framing is the engine's, tested on the lab). Whether a step
survives a real host (SSH, a crash, a resume) is tested on the lab (see "Writing a step").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from overhaul.command import Command, as_command
from overhaul.context import Facts, Probe, StepHost
from overhaul.errors import StepFailed
from overhaul.secrets import Redactor
from overhaul.transport import CommandResult

__all__ = ["Answer", "FakeRemote", "fake_host"]


@dataclass(frozen=True)
class Answer:
    """What the fake host answers to a command: its exit code and output."""

    stdout: str = ""
    exited: int = 0
    stderr: str = ""


Reply = Answer | Callable[[str], Answer]  # an answer, or one made from the command's text
Table = Mapping[str | re.Pattern[str], Reply] | Iterable[tuple[str | re.Pattern[str], Reply]]


@dataclass
class FakeRemote:
    """The connection a fake `StepHost` runs its commands on: the table's answers, and a record of each command."""

    answers: list[tuple[str | re.Pattern[str], Reply]]
    name: str = "host1"
    roles: list[str] = field(default_factory=list)
    vars: dict[str, Any] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    user: str = "root"
    inventory: Any = None  # no inventory: a step that reads one is not unit-tested here
    redactor: Redactor = field(default_factory=Redactor)
    commands: list[str] = field(default_factory=list)
    stdins: list[str | None] = field(default_factory=list)

    def run(self, command: Command | str, *, sudo: bool | None = None, stdin: str | None = None,
            timeout: float | None = None, durable: str | None = None) -> CommandResult:
        text = as_command(command).text
        self.commands.append(text)
        self.stdins.append(stdin)
        for key, reply in self.answers:
            if (key.search(text) if isinstance(key, re.Pattern) else key in text):
                answer = reply(text) if callable(reply) else reply
                return CommandResult(text, answer.exited, self.redactor(answer.stdout), self.redactor(answer.stderr),
                                     0.0)
        raise AssertionError(f"the fake host {self.name} has no answer for: {text}")

    def secret(self, name: str) -> str:
        if name not in self.secrets:
            raise StepFailed(f"no secret named {name!r} in the inventory (secrets: {', '.join(sorted(self.secrets))})")
        return self.redactor.add(self.secrets[name])

    def download(self, remote_path: str, local_path: Path) -> None:
        raise AssertionError(f"the fake host {self.name} has no files to download ({remote_path})")


class FakeStepHost(StepHost):
    """A `StepHost` whose probes are read one command each (see the module)."""

    remote: FakeRemote

    def prefetch(self, probes: Iterable[Probe]) -> None:
        for probe in probes:
            self.read(probe)

    def run_then_read(self, command: Command | str, probes: list[Probe], *, stdin: str | None = None,
                      durable: str | None = None) -> CommandResult:
        result = self.run(command, stdin=stdin, durable=durable)
        self.forget()
        for probe in probes:
            self.read(probe)
        return result


def fake_host(answers: Table, *, name: str = "host1", roles: Iterable[str] = (), vars: Mapping[str, Any] | None = None,
              secrets: Mapping[str, str] | None = None, run_id: str = "20261207T000000-000000",
              timeout: float = 60.0) -> FakeStepHost:
    """A `StepHost` answering commands from `answers` (see the module); `host.remote.commands` records them."""
    table = list(answers.items()) if isinstance(answers, Mapping) else list(answers)
    remote = FakeRemote(table, name, list(roles), dict(vars or {}), dict(secrets or {}))
    return FakeStepHost(remote, timeout=timeout, run_id=run_id, facts=Facts())  # type: ignore[arg-type]
