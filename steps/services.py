"""Supervised services: `services.stop`, `services.verify` and `supervisor.up`.

States come from the STATE column of supervisorctl-style status lines; exit codes are not trusted
(they vary with the supervisor version).
"""

from __future__ import annotations

import re
from typing import Any

from overhaul.steps.package import PACKAGE, VERSION, installed_probe, installed_version, same_version
from pydantic import Field

from overhaul.command import Command, sh
from overhaul.context import Probe, StepHost
from overhaul.errors import StepFailed
from overhaul.step import AssertionStep, Check, Params, Step
from overhaul.transport import CommandResult

NOT_RUNNING = ("STOPPED", "EXITED", "FATAL")
PROGRAM = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]*$")  # a supervisord program (or group:program) name
STATES = {"STOPPED", "STARTING", "RUNNING", "BACKOFF", "STOPPING", "EXITED", "FATAL", "UNKNOWN"}


SETTLE_SECONDS = 30  # how long a start waits for programs still STARTING (a start a cut-off controller left in flight)


def settled(command: Command, manage: str) -> Command:
    """`command`, then a wait (at most SETTLE_SECONDS) while any program is STARTING, ending with the command's exit
    code: what is read after it is where the programs settled. A controller killed while it started programs leaves
    the supervisor starting one (the rest never asked); the resume's start of it is refused as "already started",
    at once, and a read right after would still find it STARTING."""
    return sh('{command}; rc=$?; i=0; while [ "$i" -lt {seconds} ] && {manage} status 2>/dev/null | '
              "grep -Eq '[[:space:]]STARTING([[:space:]]|$)'; do sleep 1; i=$((i + 1)); done; (exit $rc)",
              command=command, seconds=SETTLE_SECONDS, manage=manage)


def states_probe(manage: str) -> Probe[dict[str, str]]:
    return Probe(f"states {manage}", sh("{manage} status", manage=manage), lambda result: _states(result, manage))


def missing_probe(*commands: str) -> Probe[list[str]]:
    """Which of `commands` the host does not have."""
    wanted = sh("{commands}", commands=list(commands))
    return Probe(f"missing {wanted}", sh('for c in {wanted}; do command -v -- "$c" >/dev/null || echo "$c"; done',
                                         wanted=wanted), lambda result: result.stdout.splitlines(), stable=True)


def program_states(host: StepHost, manage: str) -> dict[str, str]:
    """program -> STATE from `<manage> status`; empty when the supervisor is not available."""
    return host.read(states_probe(manage))


def _states(result: CommandResult, manage: str) -> dict[str, str]:
    if "Not available yet!" in result.stdout:
        return {}
    states = {}
    for line in result.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[1] in STATES:
            states[fields[0]] = fields[1]
    if not states and not result.ok:
        raise StepFailed(f"`{manage} status` exited {result.exited}: {result.tail()}")
    return states


def supervisor_ready(host: StepHost, manage: str, *commands: str) -> Check:
    """Preflight of the steps that drive the supervisor: the commands exist and the supervisor answers."""
    missing = host.read(missing_probe(manage, *commands))
    if missing:
        return Check(False, f"not found on the host: {', '.join(missing)}")
    try:
        states = program_states(host, manage)
    except StepFailed as exc:
        return Check(False, str(exc))
    if not states:
        return Check(False, f"`{manage} status`: supervisor not available")
    return Check(True, f"supervisor answers ({len(states)} programs)")


def describe(states: dict[str, str], wanted: tuple[str, ...]) -> str:
    """The programs not in a wanted state, 'name STATE' each."""
    return ", ".join(f"{name} {state}" for name, state in sorted(states.items()) if state not in wanted)


def not_all_running(host: StepHost, manage: str) -> tuple[str | None, dict[str, str]]:
    """Why not every program is RUNNING (None when all are), and the states read."""
    states = program_states(host, manage)
    if not states:
        return f"`{manage} status`: supervisor not available", states
    bad = describe(states, ("RUNNING",))
    return (f"not RUNNING: {bad}" if bad else None), states


class ManageParams(Params):
    manage_command: str = "scalr-server-manage"
    """The command whose `status` lists the supervised programs (and whose `stop all` stops them)."""


class StopParams(ManageParams):
    package: str | None = Field(None, pattern=PACKAGE)
    """With `version`: nothing needs stopping when this package is already at that version."""
    version: str | None = Field(None, pattern=VERSION)
    """The target version of `package` (see there)."""
    allow_not_running: bool = False
    """true: the preflight accepts a program that is not RUNNING before the stop (FATAL, STOPPED, ...); otherwise
    such a host refuses the run before its first change (a farm already broken is not taken down further)."""


class ServicesStop(Step[StopParams]):
    """`<manage> stop all`, unless nothing runs (or the package is already at the target version).

    Its preflight proves the starting point: every program is RUNNING, so that what the run stops it can prove it
    started again. A program FATAL, EXITED or STOPPED among running ones refuses the run (unless
    `allow_not_running`), naming it and its state. A host with every program STOPPED (a resumed run that stopped
    them itself) or whose package is already at `version` is accepted: this step stops nothing more there.
    """

    name = "services.stop"
    reversible = True  # undo starts what it stopped

    def probes(self) -> list[Probe]:
        package = [installed_probe(self.params.package)] if self.params.package else []
        return [*package, states_probe(self.params.manage_command), missing_probe(self.params.manage_command)]

    def preflight(self, host: StepHost) -> Check:
        ready = supervisor_ready(host, self.params.manage_command)
        if not ready.done or self.params.allow_not_running:
            return ready
        states = program_states(host, self.params.manage_command)
        if set(states.values()) == {"STOPPED"}:
            return Check(True, f"all {len(states)} programs already STOPPED: nothing to stop")
        bad = describe(states, ("RUNNING",))
        if not bad or self._at_version(host):
            return ready
        return Check(False, f"not RUNNING before the run: {bad}: repair it first, or say allow_not_running: true "
                            "in this stage of the runbook")

    def _at_version(self, host: StepHost) -> bool:
        """The package is already at the target version: nothing needs stopping."""
        return bool(self.params.package and self.params.version
                    and same_version(installed_version(host, self.params.package), self.params.version))

    def check(self, host: StepHost) -> Check:
        if self._at_version(host):
            installed = installed_version(host, self.params.package or "")
            return Check(True, f"{self.params.package} is already {installed}: no need to stop")
        running = describe(program_states(host, self.params.manage_command), NOT_RUNNING)
        return Check(not running, f"running: {running}" if running else "nothing is running")

    def apply(self, host: StepHost) -> str:
        manage = self.params.manage_command
        running = sorted(name for name, state in program_states(host, manage).items() if state not in NOT_RUNNING)
        self.remembered.setdefault("stopped", running)  # a retry keeps the first reading: what ran before the run
        result = host.run_then_read(sh("{manage} stop all", manage=manage), [states_probe(manage)])
        if "ERROR" in result.stdout + result.stderr and not result.ok:
            raise StepFailed(f"`{self.params.manage_command} stop all` failed: {result.tail()}")
        return "stopped all services"

    def verify(self, host: StepHost) -> Check:
        states = program_states(host, self.params.manage_command)
        still = describe(states, NOT_RUNNING)
        return Check(not still, f"still running: {still}" if still else f"{len(states)} programs stopped")

    def undone(self, host: StepHost, remembered: dict[str, Any]) -> Check:
        """Every program it stopped is RUNNING again."""
        states = program_states(host, self.params.manage_command)
        down = [f"{name} {states.get(name, 'MISSING')}" for name in remembered.get("stopped", [])
                if states.get(name) != "RUNNING"]
        return Check(not down, f"not RUNNING again: {', '.join(down)}" if down else "what it stopped is RUNNING")

    def undo(self, host: StepHost, remembered: dict[str, Any]) -> str:
        """Start what it stopped (and only that)."""
        manage, programs = self.params.manage_command, remembered.get("stopped", [])
        if not (isinstance(programs, list) and all(isinstance(name, str) and PROGRAM.match(name) for name in programs)):
            raise StepFailed(f"the journal's list of programs this step stopped is not a list of program names: "
                             f"{programs!r}: start them by hand")
        command = sh("{manage} start {programs}", manage=manage, programs=list(programs))
        result = host.run_then_read(settled(command, manage), [states_probe(manage)], label=command.text)
        if not result.ok:
            raise StepFailed(f"`{manage} start` exited {result.exited}: {result.tail()}")
        return f"started {', '.join(programs)}"


class ServicesVerify(AssertionStep):
    """Every program of `<manage> status` is RUNNING; names each one that is not, with its state."""

    name = "services.verify"
    Params = ManageParams

    def probes(self) -> list[Probe]:
        return [states_probe(self.params.manage_command)]

    def check(self, host: StepHost) -> Check:
        problem, states = not_all_running(host, self.params.manage_command)
        return Check(problem is None, problem or f"{len(states)} programs RUNNING")


class SupervisorParams(Params):
    service: str = "scalr"
    """The service whose `service NAME status` must say it is running."""


class SupervisorUp(AssertionStep):
    """`service <name> status` says the supervisor is running."""

    name = "supervisor.up"
    Params = SupervisorParams

    def probes(self) -> list[Probe]:
        return [Probe(f"service {self.params.service}", sh("service {name} status", name=self.params.service),
                      lambda result: (result.ok, result.stdout.strip() or result.stderr.strip(), result.exited))]

    def check(self, host: StepHost) -> Check:
        ok, said, exited = host.read(self.probes()[0])
        return Check(ok and said.endswith("is running"), said or f"exit {exited}")
