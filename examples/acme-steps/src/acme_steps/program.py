"""`acme.program`: a supervisord program is configured as given and RUNNING (an example third-party step).

Its configuration is one file in the supervisor's include folder (`NAME.conf`); supervisorctl `update` makes the
supervisor read it (starting a new program, restarting a changed one, stopping a removed one). An undo puts back
the file the step found (or removes the one it created) and updates again, so the program is as before the run.
"""

from __future__ import annotations

from typing import Any

from overhaul.sdk import Check, Command, Field, Params, Step, StepFailed, StepHost, sh

NAME = r"^[A-Za-z0-9_-]+$"  # a supervisord program name (and the file name of its configuration)


class ProgramParams(Params):
    name: str = Field(pattern=NAME)
    """The program's name: supervisord's `[program:NAME]`, configured in `conf_dir/NAME.conf`."""
    command: str = Field(pattern=r"^/[^\n]*$")
    """What the program runs: an absolute path and its arguments, one line (supervisord splits it, no shell)."""
    conf_dir: str = Field("/opt/scalr-server/etc/supervisor/conf.d", pattern=r"^/[^\n]*$")
    """The folder the supervisor includes program files from (`[include] files = DIR/*.conf`)."""
    manage_command: str = Field("scalr-server-manage", pattern=r"^[A-Za-z0-9_./-]+$")
    """The supervisorctl of the host's supervisor (`update`, `start`, `status`)."""


class Program(Step[ProgramParams]):
    """`conf_dir/NAME.conf` says what the params say, and the supervisor runs it (RUNNING)."""

    name = "acme.program"
    reversible = True  # undo puts back the file it found (or removes the one it created), then updates

    @property
    def path(self) -> str:
        return f"{self.params.conf_dir}/{self.params.name}.conf"

    def wanted(self) -> str:
        """The program's configuration file, as it must be."""
        return (f"# Written by the Overhaul step {self.name}.\n[program:{self.params.name}]\ncommand={self.params.command}\n"
                "autostart=true\nautorestart=true\nstartsecs=1\n")

    def preflight(self, host: StepHost) -> Check:
        # Read-only: the supervisor answers and its include folder is writable.
        manage, folder = self.params.manage_command, self.params.conf_dir
        status = host.run(sh("command -v -- {manage} >/dev/null && {manage} status", manage=manage))
        if status.exited == 127 or "Not available" in status.stdout or not (status.stdout.strip() or status.ok):
            return Check(False, f"`{manage} status`: the supervisor does not answer ({status.tail() or 'no output'})")
        if not host.run(sh("test -d {folder} && test -w {folder}", folder=folder)).ok:
            return Check(False, f"{folder} is not a writable folder")
        return Check(True, f"the supervisor answers; {folder} is writable")

    def check(self, host: StepHost) -> Check:
        # Read-only: the file is as wanted and the program RUNNING (a program stopped by hand is work to do).
        if self._found(host) != self.wanted():
            return Check(False, f"{self.path} is not as wanted")
        state = self._state(host)
        if state != "RUNNING":
            return Check(False, f"{self.params.name} is {state or 'not known to the supervisor'}")
        return Check(True, f"{self.params.name} configured and RUNNING")

    def apply(self, host: StepHost) -> str:
        # What an undo needs, before the change (a retry keeps the first reading: what was there before the run).
        self.remembered.setdefault("previous", self._found(host))
        self._put(host, self.wanted())
        start = sh("{manage} status {name} | grep -q ' RUNNING ' || {manage} start {name}",
                   manage=self.params.manage_command, name=self.params.name)
        result = host.run(start)
        if not result.ok:
            raise StepFailed(f"`{self.params.manage_command} start {self.params.name}` failed: {result.tail()}")
        return f"{self.params.name} configured ({self.path}) and started"

    def verify(self, host: StepHost) -> Check:
        # A program that starts, then dies, is not running: wait out supervisord's startsecs (up to 10 s), then check.
        wait = sh("for i in $(seq 20); do {manage} status {name} | grep -q ' RUNNING ' && exit 0; sleep 0.5; done; "
                  "exit 1", manage=self.params.manage_command, name=self.params.name)
        host.run(wait)
        return self.check(host)

    def undone(self, host: StepHost, remembered: dict[str, Any]) -> Check:
        # Read-only: the file is as the run found it (absent if it created it), and a removed program is gone.
        if "previous" not in remembered:
            return Check(True, "the run never got to change it here")
        previous = remembered["previous"]
        if self._found(host) != previous:
            return Check(False, f"{self.path} is not as the run found it")
        if previous is None and self._state(host) is not None:
            return Check(False, f"{self.params.name} is still known to the supervisor")
        return Check(True, f"{self.path} as the run found it")

    def undo(self, host: StepHost, remembered: dict[str, Any]) -> str:
        previous = remembered["previous"]
        if previous is None:
            self._update(host, sh("rm -f -- {path}", path=self.path))
            return f"removed {self.path}"
        self._put(host, str(previous))
        return f"put back {self.path}"

    # -- reading and writing the host -------------------------------------------------------------------------------
    def _found(self, host: StepHost) -> str | None:
        """The program's file on the host, or None when there is none."""
        result = host.run(sh("test -f {path} && cat -- {path}", path=self.path))
        return result.stdout if result.ok else None

    def _state(self, host: StepHost) -> str | None:
        """The program's supervisord state (RUNNING, STARTING, FATAL...), None when the supervisor does not know it."""
        status = host.run(sh("{manage} status {name}", manage=self.params.manage_command, name=self.params.name))
        fields = status.stdout.split()
        return fields[1] if len(fields) >= 2 and fields[0] == self.params.name else None

    def _put(self, host: StepHost, content: str) -> None:
        """Write the program's file (beside it first, then renamed: the supervisor never reads half a file), update."""
        staged = f"{self.path}.new"  # not *.conf: never included as it is written
        written = host.write_file(staged, content, mode=0o600)
        if not written.ok:
            raise StepFailed(f"cannot write {staged}: {written.tail()}")
        self._update(host, sh("mv -- {staged} {path}", staged=staged, path=self.path))

    def _update(self, host: StepHost, change: Command) -> None:
        """Make `change` to the include folder, then have the supervisor read it (`update`)."""
        result = host.run(sh("{change} && {manage} update", change=change, manage=self.params.manage_command))
        if not result.ok:
            raise StepFailed(f"`{self.params.manage_command} update` after changing {self.path} failed: {result.tail()}")
