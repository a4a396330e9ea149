"""The preflight gate: before a mutating run changes anything, prove every stage could succeed on every host.

For every host the run will touch (in parallel, bounded): the host is reachable over strict SSH, sudo
works when the inventory asks for it, and each of its stages' `preflight` passes. Any failure refuses
the whole run before its first change. An unreachable host is decided here, once; a runbook (or
`--skip-unreachable`) may allow it, and then the host is left out of the whole run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from overhaul.context import Facts, StepHost
from overhaul.errors import HostUnreachable, StepFailed
from overhaul.plan import Plan, PlannedStage
from overhaul.step import Check
from overhaul.transport import Transport

PREFLIGHT_TIMEOUT = 120.0  # per command: a preflight reads state, it never waits on work
HOST_COLUMN = -1  # the (stage index) of the host-level checks: reachable, sudo


@dataclass
class PreflightReport:
    """Every (stage, host) preflight outcome, and the hosts left out as unreachable by policy."""

    stages: list[PlannedStage]
    checks: dict[tuple[int, str], Check] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)  # host -> why (unreachable, allowed by policy)

    @property
    def refusals(self) -> list[str]:
        """One line per problem: "host: reason" for a host, "host: stage N name: reason" for a stage."""
        names = {planned.index: f"stage {planned.index + 1} {planned.stage.name}: " for planned in self.stages}
        return [f"{host}: {names.get(index, '')}{check.message}"
                for (index, host), check in self.checks.items() if not check.done and host not in self.excluded]

    @property
    def ok(self) -> bool:
        return not self.refusals

    def hosts(self) -> list[str]:
        return list(dict.fromkeys(host for _, host in self.checks))


def run_preflight(plan: Plan, transport: Transport, run_id: str, *, skip_unreachable: bool = False,
                  facts: Facts | None = None, progress: Callable[[int, int], None] | None = None) -> PreflightReport:
    """Run every stage's preflight on every host it targets; never changes a host. `progress` is told (hosts
    checked, hosts in all) before the first host and as each host's checks end, from the host's worker."""
    report = PreflightReport(plan.stages)
    hosts = plan.hosts
    told = progress or (lambda checked, total: None)
    checked = 0
    counting = threading.Lock()

    def one(host: str) -> None:
        nonlocal checked
        try:
            check(host)
        finally:
            with counting:
                checked += 1
                told(checked, len(hosts))

    def check(host: str) -> None:
        # run_id: a step finds what this run made (a backup, on a resume) by it.
        view = StepHost(transport.host(host), timeout=PREFLIGHT_TIMEOUT, run_id=run_id, facts=facts)
        mine = [planned for planned in plan.stages if host in planned.params]
        try:
            report.checks[(HOST_COLUMN, host)] = _host_ready(view)
            view.prefetch(probe for planned in mine for probe in planned.step(planned.params[host]).probes())
        except (StepFailed, HostUnreachable) as exc:  # a host that stops answering is refused, like one unreachable
            report.checks[(HOST_COLUMN, host)] = Check(False, str(exc))
            return
        for planned in mine:
            report.checks[(planned.index, host)] = _stage_ready(planned, view)

    # Each host is checked by the worker that connected it (and, on a farm larger than the pool, let go after).
    told(0, len(hosts))
    unreachable = transport.connect(hosts, then=one)
    if unreachable:
        told(len(hosts), len(hosts))  # (the hosts that could not be reached are checked too: refused)
    skip = skip_unreachable or plan.runbook.runbook.preflight.unreachable == "skip"
    position = {host: index for index, host in enumerate(hosts)}
    for host, error in sorted(unreachable.items(), key=lambda item: position[item[0]]):
        report.checks[(HOST_COLUMN, host)] = Check(False, f"unreachable: {_reason(host, error)}")
        if skip:
            report.excluded[host] = f"unreachable: {_reason(host, error)}"
    report.checks = dict(sorted(report.checks.items(), key=lambda item: (position[item[0][1]], item[0][0])))
    return report


def _reason(host: str, error: HostUnreachable) -> str:
    """The transport's message without the host's name in front (the report names the host)."""
    text = str(error)
    return text.split(": ", 1)[1] if text.startswith(host) and ": " in text else text


def _host_ready(host: StepHost) -> Check:
    if host.inventory.ssh.sudo and host.user != "root":
        probe = host.run("true", sudo=True)
        if not probe.ok:
            return Check(False, f"sudo does not work for {host.user}: {probe.tail()}")
        return Check(True, "reachable, sudo works")
    return Check(True, "reachable")


def _stage_ready(planned: PlannedStage, host: StepHost) -> Check:
    step = planned.step(planned.params[host.name])
    try:
        return step.preflight(host)
    except (StepFailed, HostUnreachable) as exc:
        return Check(False, str(exc))
    except Exception as exc:  # a bug in a step's preflight refuses the run, it does not crash it
        return Check(False, f"preflight of {planned.stage.step!r} raised {type(exc).__name__}: {exc}")
