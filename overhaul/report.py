"""What the operator sees: a line per (stage, host) as results arrive, and a summary at the end."""

from __future__ import annotations

import sys
from typing import TextIO

from overhaul.plan import PlannedStage
from overhaul.runner import HostResult, RunResult
from overhaul.step import Outcome

MARKS = {Outcome.OK: "ok", Outcome.CHANGED: "changed", Outcome.FAILED: "FAILED", Outcome.SKIPPED: "skipped"}


class ConsoleReport:
    """Live progress on a stream (a Listener for the runner)."""

    def __init__(self, stream: TextIO = sys.stdout, check_only: bool = False):
        self.stream = stream
        self.check_only = check_only
        self._stage = -1  # the stage whose header was printed last
        self._told_skipped: set[int] = set()

    def stage_started(self, planned: PlannedStage, hosts: list[str]) -> None:
        self._stage = planned.index
        verb = "plan" if self.check_only else "stage"
        print(f"\n== {verb} {planned.index + 1}: {planned.stage.name} ({planned.stage.step} on {len(hosts)} "
              f"host{'s' if len(hosts) != 1 else ''}, {planned.stage.strategy})", file=self.stream, flush=True)

    def host_started(self, planned: PlannedStage, host: str) -> None:
        pass  # one line per host, when it finishes

    def host_finished(self, result: HostResult) -> None:
        if result.stage_index != self._stage:  # a stage that never started (the run stopped): one line of its own
            if result.stage_index not in self._told_skipped:
                self._told_skipped.add(result.stage_index)
                print(f"\n== stage {result.stage_index + 1} {result.stage}: skipped, {result.message}", file=self.stream,
                      flush=True)
            return
        mark = "would change" if self.check_only and result.outcome is Outcome.CHANGED else MARKS[result.outcome]
        tries = f" [{result.attempts} attempts]" if result.attempts > 1 else ""
        message = result.message.replace("\n", "\n" + " " * 31)  # a multi-line message stays in its column
        print(f"   {result.host:<14} {mark:<12} {message}{tries}", file=self.stream, flush=True)


def summary(run: RunResult, stages: list[PlannedStage]) -> str:
    """A table of outcome counts per stage, then every failure with its host and reason."""
    changed = "would change" if run.check_only else "changed"
    lines = [f"\n{'STAGE':<32} {'ok':>4} {changed:>12} {'failed':>7} {'skipped':>8}"]
    for planned in stages:
        counts = run.counts(planned.stage.name)
        lines.append(
            f"{planned.stage.name[:32]:<32} {counts[Outcome.OK]:>4} {counts[Outcome.CHANGED]:>12} "
            f"{counts[Outcome.FAILED]:>7} {counts[Outcome.SKIPPED]:>8}"
        )
    failures = [r for r in run.results if r.outcome is Outcome.FAILED]
    for result in failures:
        lines.append(f"FAILED {result.stage} on {result.host}: {result.message}")
    if run.stopped_at:
        lines.append(f"run stopped at stage {run.stopped_at!r}: {run.stop_reason}")
    if run.interrupted:
        lines.append("run interrupted: the finished work is journaled")
    elif run.check_only:
        lines.append("plan only: nothing was changed")
    elif not run.failed:
        lines.append("run succeeded")
    return "\n".join(lines)


def describe_changes(preview: RunResult, stages: list[PlannedStage]) -> str:
    """What a check-only pass says each stage would do, hosts grouped by finding (shown before a yes)."""
    lines = ["what this run would change:"]
    for planned in stages:
        label = f"  {planned.index + 1} {planned.stage.name}"
        found = {r.host: r for r in preview.results if r.stage_index == planned.index and r.outcome is Outcome.CHANGED}
        changing: dict[str, list[str]] = {}
        for host in planned.hosts:  # in inventory order, hosts with the same finding on one line
            if host in found:
                changing.setdefault(found[host].message, []).append(host)
        if not changing:
            lines.append(f"{label}: nothing to do ({len(planned.hosts)} hosts)")
        for message, hosts in changing.items():
            lines.append(f"{label}: {', '.join(hosts)}: {message}")
    return "\n".join(lines)
