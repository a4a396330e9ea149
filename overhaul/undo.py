"""Undo of a half-done run: what its stages changed, taken back host by host in reverse stage order.

The undo is a plan like any other (same runner, journal, retries, logs and resume): each stage that
changed a host becomes an `undo <stage>` stage on exactly the hosts it changed, whose step's check is
`undone` and whose apply is `undo`. Its stages are journaled after the run's own, at indices N.. so a
killed undo resumes like any run. A stage that changed something and cannot be undone (or whose step
does not say whether it can: `reversible` undecided) makes the whole undo refuse (a half-undone farm is
worse than a stopped one): `overhaul rollback` is the way back then.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from overhaul.context import StepHost
from overhaul.plan import Plan, PlannedStage
from overhaul.runner import UNDO_FACTS, HostResult, not_json_in
from overhaul.secrets import redacted_in
from overhaul.step import UNDECIDED, Check, Outcome, Step


def irreversible(planned: PlannedStage) -> str:
    """What a stage's change loses for good (its step's own words)."""
    return planned.step.irreversible or f"{planned.step.name} declares no undo"


@dataclass
class UndoPlan:
    plan: Plan  # the undo stages only, indices after all of the runbook's (hooks.on_failure included)
    blocked: list[str]  # irreversible changes: when any, nothing is undone
    remembered: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)  # undo stage -> host -> facts

    def said(self, stage: PlannedStage, host: str) -> str:
        """What the run's apply remembered on `host` for `stage`'s undo (what the host had before), in words."""
        facts = self.remembered.get(stage.index, {}).get(host) or {}
        return "; ".join(f"{name} " + (", ".join(map(str, value)) if isinstance(value, list) else str(value))
                         for name, value in facts.items())

    @property
    def empty(self) -> bool:
        return not self.plan.stages


def changed_pairs(plan: Plan, results: list[HostResult]) -> dict[int, dict[str, dict[str, Any]]]:
    """stage index -> host -> remembered facts, for each pair of the run's own stages that changed its host (or
    failed after its apply began: it may have changed it half-way)."""
    found: dict[int, dict[str, dict[str, Any]]] = {}
    for result in results:
        if result.stage_index >= len(plan.stages):
            continue  # a pair of hooks.on_failure, or of an earlier undo
        remembered = result.facts.get(UNDO_FACTS)
        if result.outcome is Outcome.CHANGED or (result.outcome is Outcome.FAILED and remembered is not None):
            found.setdefault(result.stage_index, {})[result.host] = remembered or {}
    return found


def undo_plan(plan: Plan, results: list[HostResult]) -> UndoPlan:
    """The stages that take back what `results` (pairs of `plan`'s stages) changed, latest stage first."""
    changed = changed_pairs(plan, results)
    stages, blocked, remembered = [], [], {}
    for planned in reversed(plan.stages):
        hosts = changed.get(planned.index)
        if not hosts or planned.step.read_only or planned.hook:  # a hook (maintenance mode, say) is not the change
            continue
        why = cannot_undo(planned, hosts)
        if why:
            blocked.append(f"stage {planned.index + 1} {planned.stage.name} ({planned.step.name}) changed {why}")
            continue
        stage = planned.stage.model_copy(update={
            "name": f"undo {planned.stage.name}", "confirm": False, "on_failure": "stop", "max_failures": "100%",
        })  # every host is undone as far as it can be; a host that fails is left out of the earlier undo stages
        params = {host: planned.params[host] for host in planned.hosts if host in hosts}
        remembered[plan.next_index + len(stages)] = hosts
        stages.append(PlannedStage(plan.next_index + len(stages), stage, undo_step(planned.step, hosts), params))
    undo = Plan(plan.runbook, plan.inventory, plan.run_params, [] if blocked else stages, plan.redactor, plan.limit)
    return UndoPlan(undo, blocked, remembered)


def cannot_undo(planned: PlannedStage, hosts: dict[str, dict[str, Any]]) -> str | None:
    """Why the changes `planned` made on `hosts` (each with what it remembered) cannot be undone from the journal,
    as the end of "stage N NAME (STEP) changed ..."; None when they can."""
    cut = sorted(host for host, remembered in hosts.items() if redacted_in(remembered))
    if cut:
        return (f"{', '.join(cut)}, and what it remembered to take that back holds a secret's value (redacted in the "
                "journal): it cannot be undone from the journal")
    unreadable = sorted(host for host, remembered in hosts.items() if not_json_in(remembered))
    if unreadable:
        return (f"{', '.join(unreadable)}, and what it remembered to take that back was not JSON (not journaled): it "
                "cannot be undone from the journal")
    if planned.step.reversible is None:
        return f"{', '.join(hosts)}, and its step does not say whether its change can be undone ({UNDECIDED})"
    if not planned.step.reversible:
        return f"{', '.join(hosts)} and cannot be undone: {irreversible(planned)}"
    return None


def undo_step(step: type[Step], remembered: dict[str, dict[str, Any]]) -> type[Step]:
    """`step` turned around: check is `undone`, apply is `undo`, each with what its host's pair remembered."""

    class Undo(step):  # type: ignore[valid-type, misc]
        name = f"undo {step.name}"
        read_only = False

        def preflight(self, host: StepHost) -> Check:
            return Check(True, "an undo is proven by its check")

        def check(self, host: StepHost) -> Check:
            return step.undone(self, host, remembered[host.name])

        def apply(self, host: StepHost) -> str:
            return step.undo(self, host, remembered[host.name])

        def verify(self, host: StepHost) -> Check:
            return self.check(host)

    Undo.__name__ = Undo.__qualname__ = f"Undo{step.__name__}"
    return Undo
