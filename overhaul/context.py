"""What a step sees of a host during one (stage, host) pair: `StepHost`.

The runner gives each pair its own view of the host's pooled connection instead of changing the
connection's settings stage by stage: the stage's command timeout, the run's id (steps name their
artefacts with it), and the commands this pair ran (its output for the journal and the host log).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from overhaul.inventory import Inventory
from overhaul.secrets import Redactor
from overhaul.transport import CommandResult, RemoteHost


class StepHost:
    """One host, for one step: run commands on it, read its vars and secrets."""

    def __init__(self, remote: RemoteHost, *, timeout: float, run_id: str):
        self.remote = remote
        self.timeout = timeout
        self.run_id = run_id
        self.history: list[CommandResult] = []  # every command of this pair, redacted

    @property
    def name(self) -> str:
        return self.remote.name

    @property
    def roles(self) -> list[str]:
        return self.remote.roles

    @property
    def user(self) -> str:
        return self.remote.user

    @property
    def vars(self) -> dict[str, Any]:
        return self.remote.vars

    @property
    def inventory(self) -> Inventory:
        return self.remote.inventory

    @property
    def redactor(self) -> Redactor:
        return self.remote.redactor

    def __repr__(self) -> str:
        return f"<StepHost {self.name} run {self.run_id}>"

    def run(self, command: str, *, sudo: bool | None = None, stdin: str | None = None, timeout: float | None = None,
            durable: str | None = None) -> CommandResult:
        """Run `command` with sh on the host (see `RemoteHost.run`); the stage's timeout unless given."""
        result = self.remote.run(command, sudo=sudo, stdin=stdin, timeout=timeout or self.timeout, durable=durable)
        self.history.append(result)
        return result

    def write_file(self, path: str, content: str, mode: int = 0o600, sudo: bool | None = None) -> CommandResult:
        """Create `path` with `mode` from the start (no window where others can read it); content on stdin."""
        quoted = shlex.quote(path)
        return self.run(f"umask 077 && cat > {quoted} && chmod {mode:o} {quoted}", stdin=content, sudo=sudo)

    def download(self, remote_path: str, local_path: Path) -> None:
        self.remote.download(remote_path, local_path)

    def secret(self, name: str) -> str:
        """The value of an inventory secret; from now on it is redacted from every output."""
        return self.remote.secret(name)
