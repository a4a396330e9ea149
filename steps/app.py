"""`app.reconfigure`: the application's convergent configuration run (`scalr-server-ctl reconfigure`).

Reconfigure is safe to repeat but not free, so check asks: was this host reconfigured for the package
version installed now, and is everything RUNNING? The answer to the first half is a marker Overhaul
writes on the host after each successful reconfigure.
"""

from __future__ import annotations

from overhaul.steps.package import PACKAGE, installed_probe, installed_version
from overhaul.steps.services import missing_probe, not_all_running, states_probe, supervisor_ready
from pydantic import Field

from overhaul.command import sh
from overhaul.context import Probe, StepHost, file_probe
from overhaul.errors import StepFailed
from overhaul.step import Check, Params, Step


class ReconfigureParams(Params):
    ctl_command: str = "scalr-server-ctl"
    """The command whose `reconfigure` applies the configuration."""
    manage_command: str = "scalr-server-manage"
    """The command whose `status` lists the supervised programs and their states."""
    package: str = Field("scalr-server", pattern=PACKAGE)
    """The package whose installed version the host is reconfigured for."""
    state_dir: str = Field("/var/lib/overhaul", pattern=r"^/[^\n]*$")
    """Folder on the host for the marker saying which version it was last reconfigured for."""


class AppReconfigure(Step[ReconfigureParams]):
    name = "app.reconfigure"
    reversible = False
    irreversible = ("on the database host it migrates the schema forward, and an older package refuses a newer schema: "
                    "the way back is `overhaul rollback` (the backup restored)")

    @property
    def marker(self) -> str:
        return f"{self.params.state_dir}/reconfigured-{self.params.package}"

    def probes(self) -> list[Probe]:
        # Not the programs' states: `<manage> status` is a program of its own (about 0.1 s of the host's CPU), and
        # check needs it only once the marker matches; after an apply it is read with the marker, in one command.
        manage, ctl = self.params.manage_command, self.params.ctl_command
        return [installed_probe(self.params.package), file_probe(self.marker), missing_probe(manage, ctl)]

    def _reconfigured_for(self, host: StepHost) -> str:
        """The version the marker says this host was last reconfigured for ("" if never)."""
        return host.read(file_probe(self.marker))

    def preflight(self, host: StepHost) -> Check:
        return supervisor_ready(host, self.params.manage_command, self.params.ctl_command)

    def check(self, host: StepHost) -> Check:
        installed = installed_version(host, self.params.package)
        done_for = self._reconfigured_for(host)
        if installed is None:
            return Check(False, f"{self.params.package} is not installed")
        if done_for != installed:
            return Check(False, f"not yet reconfigured for {self.params.package} {installed}")
        problem, _ = not_all_running(host, self.params.manage_command)
        if problem:
            return Check(False, f"reconfigured for {installed}, but {problem}")
        return Check(True, f"reconfigured for {installed}, every program RUNNING")

    def apply(self, host: StepHost) -> str:
        installed = installed_version(host, self.params.package) or ""
        seen = self._reconfigured_for(host)
        # One durable command under its host lock: the marker is written if and only if reconfigure succeeded,
        # even when the connection drops meanwhile; and if another run (say, one killed mid-command whose
        # reconfigure carried on) changed the marker since we looked, its reconfigure stands and ours is skipped.
        script = sh('[ "$(cat -- {marker} 2>/dev/null)" = {seen} ] || exit 0; '
                    "{ctl} reconfigure && echo {installed} > {new} && mv -- {new} {marker}",
                    marker=self.marker, new=f"{self.marker}.new", seen=seen, ctl=self.params.ctl_command,
                    installed=installed)
        after = [installed_probe(self.params.package), file_probe(self.marker), states_probe(self.params.manage_command)]
        result = host.run_then_read(sh("mkdir -p -- {state_dir} && sh -c {script}", state_dir=self.params.state_dir,
                                       script=script.text), after, durable=f"reconfigure-{self.params.package}",
                                   label=f"{self.params.ctl_command} reconfigure")
        if not result.ok:
            raise StepFailed(f"`{self.params.ctl_command} reconfigure` exited {result.exited}: {result.tail()}")
        return f"reconfigured for {self.params.package} {installed}"
