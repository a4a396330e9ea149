"""`shell`: run a command, made idempotent by a `creates` path or an `unless` command."""

from __future__ import annotations

from overhaul.command import Command, sh
from overhaul.context import StepHost
from overhaul.errors import StepFailed
from overhaul.step import Check, Params, Step


class ShellParams(Params):
    command: str
    """The shell command to run; write ${q:name} to insert a value quoted for the shell."""
    creates: str | None = None
    """The work is done when this path exists on the host."""
    unless: str | None = None
    """The work is done when this command exits 0."""
    sudo: bool = False
    """true: run the command and its guards through sudo; false: without sudo, even when the inventory has ssh.sudo."""


class Shell(Step[ShellParams]):
    """Run `command` on each host unless `creates` exists or `unless` succeeds.

    Without a guard the command runs every time and always reports `changed`, like Ansible's shell.
    """

    name = "shell"
    reversible = False
    irreversible = "a shell command's effect is unknown to Overhaul"

    def check(self, host: StepHost) -> Check:
        if self.params.creates and host.run(sh("test -e {path}", path=self.params.creates), sudo=self.params.sudo).ok:
            return Check(True, f"{self.params.creates} exists")
        if self.params.unless and host.run(Command.script(self.params.unless), sudo=self.params.sudo).ok:
            return Check(True, "`unless` command succeeded")
        return Check(False, f"would run: {self.params.command}")

    def apply(self, host: StepHost) -> str:
        result = host.run(Command.script(self.params.command), sudo=self.params.sudo)
        if not result.ok:
            raise StepFailed(f"`{self.params.command}` exited {result.exited}: {result.tail()}")
        return f"ran `{self.params.command}`"

    def verify(self, host: StepHost) -> Check:
        if self.params.creates or self.params.unless:
            return self.check(host)
        return Check(True, "command exited 0")
