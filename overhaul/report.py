"""What the operator sees: a line per (stage, host) as results arrive, and a summary at the end."""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, TextIO

from overhaul.events import (
    Asking,
    BatchStarted,
    CommandDone,
    Event,
    Notice,
    PairFinished,
    PairStarted,
    PreflightChecked,
    RunEnded,
    RunStarted,
    StageStarted,
    WaysOn,
)
from overhaul.plan import PlannedStage
from overhaul.preflight import HOST_COLUMN, PreflightReport
from overhaul.runner import HostResult, RunResult
from overhaul.step import Outcome
from overhaul.transport import CommandResult
from overhaul.undo import irreversible
from overhaul.verification import Case

MARKS = {Outcome.OK: "ok", Outcome.CHANGED: "changed", Outcome.FAILED: "FAILED", Outcome.SKIPPED: "skipped"}


HEARTBEAT = float(os.environ.get("OVERHAUL_HEARTBEAT_SECONDS", "30"))  # off a terminal: "still running" lines


class ConsoleReport:
    """Progress as plain lines, one per event (a Listener for the runner): for CI, pipes, NO_COLOR, TERM=dumb.

    During a stage, a "still running: app1 (30s), app2 (30s)" line every HEARTBEAT seconds says what is
    being waited on. `verbosity` 1 (-v) adds each command and its exit code as it completes; -1 (-q)
    prints only failures (the summary comes after).
    """

    def __init__(self, stream: TextIO = sys.stdout, check_only: bool = False, verbosity: int = 0,
                 heartbeat: float = HEARTBEAT):
        self.stream = stream
        self.check_only = check_only
        self.verbosity = verbosity
        self.heartbeat = heartbeat
        self._stage = -1  # the stage whose header was printed last
        self._told_skipped: set[int] = set()
        self._running: dict[str, float] = {}  # host -> when its pair started
        self._lock = threading.Lock()
        self._beat: threading.Event | None = None

    def _say(self, text: str) -> None:
        with self._lock:
            print(text, file=self.stream, flush=True)

    def stage_started(self, planned: PlannedStage, hosts: list[str]) -> None:
        self._stage = planned.index
        verb = "plan" if self.check_only else "stage"
        if self.verbosity >= 0:
            self._say(f"\n== {verb} {planned.index + 1}: {planned.stage.name} ({planned.stage.step} on {len(hosts)} "
                      f"host{'s' if len(hosts) != 1 else ''}, {planned.stage.strategy})")
            if self.check_only and planned.step.reversible is not True and not planned.step.read_only:
                self._say(f"   {undo_warning(planned)}")
        self._start_heartbeat()

    def batch_started(self, planned: PlannedStage, number: int, total: int, hosts: list[str]) -> None:
        if self.verbosity >= 0:
            self._say(f"   -- batch {number}/{total}: {', '.join(hosts)}")

    def host_started(self, planned: PlannedStage, host: str) -> None:
        with self._lock:
            self._running[host] = time.monotonic()

    def command_done(self, host: str, result: CommandResult) -> None:
        if self.verbosity >= 1:
            self._say(f"   {host:<14} $ {result.command.splitlines()[0][:100]}  [exit {result.exited}, "
                      f"{result.duration * 1000:.0f} ms]")

    def host_finished(self, result: HostResult) -> None:
        with self._lock:
            self._running.pop(result.host, None)
        if result.stage_index != self._stage:  # a stage that never started (the run stopped): one line of its own
            if result.stage_index not in self._told_skipped and self.verbosity >= 0:
                self._told_skipped.add(result.stage_index)
                self._say(f"\n== stage {result.stage_index + 1} {result.stage}: skipped, {result.message}")
            return
        if self.verbosity < 0 and result.outcome is not Outcome.FAILED:
            return
        mark = "would change" if self.check_only and result.outcome is Outcome.CHANGED else MARKS[result.outcome]
        tries = f" [{result.attempts} attempts]" if result.attempts > 1 else ""
        message = result.message.replace("\n", "\n" + " " * 31)  # a multi-line message stays in its column
        self._say(f"   {result.host:<14} {mark:<12} {message}{tries}")

    def pause(self) -> None:
        """A question is about to be asked on the terminal: plain lines leave it free already."""

    def close(self) -> None:
        if self._beat is not None:
            self._beat.set()

    def _start_heartbeat(self) -> None:
        self.close()
        done = self._beat = threading.Event()

        def beat() -> None:
            while not done.wait(self.heartbeat):
                with self._lock:
                    now = time.monotonic()
                    waiting = ", ".join(f"{host} ({now - since:.0f}s)" for host, since in sorted(self._running.items()))
                if waiting and self.verbosity >= 0:
                    self._say(f"   still running: {waiting}")

        threading.Thread(target=beat, daemon=True).start()


class LiveReport(ConsoleReport):
    """On a terminal: a live view of the stage (rich), hosts done/total, failed, running, elapsed and an
    estimate, and for each running host its last command; finished hosts scroll above it as lines."""

    def __init__(self, stream: TextIO, check_only: bool = False, verbosity: int = 0):
        super().__init__(stream, check_only, verbosity, heartbeat=3600)
        from rich.console import Console
        from rich.live import Live

        self._planned: PlannedStage | None = None
        self._stage_started = time.monotonic()
        self._done = self._failed = 0
        self._last: dict[str, str] = {}
        self._console = Console(file=stream)
        self._live = Live(console=self._console, refresh_per_second=4, transient=True, get_renderable=self._view)

    def _say(self, text: str) -> None:
        self._console.print(text, markup=False, highlight=False)

    def stage_started(self, planned: PlannedStage, hosts: list[str]) -> None:
        self._planned, self._stage_started, self._done, self._failed = planned, time.monotonic(), 0, 0
        super().stage_started(planned, hosts)
        if not self._live.is_started:
            self._live.start()

    def command_done(self, host: str, result: CommandResult) -> None:
        said = f" -> {result.tail(60)}" if result.stdout or result.stderr else ""
        self._last[host] = result.command.splitlines()[0][:60] + said
        super().command_done(host, result)

    def host_finished(self, result: HostResult) -> None:
        if self._planned is not None and result.stage_index == self._planned.index:
            self._done += 1
            self._failed += result.outcome is Outcome.FAILED
        super().host_finished(result)

    def pause(self) -> None:
        """Stop drawing (a question is about to be asked on the terminal); the next stage starts it again."""
        if self._live.is_started:
            self._live.stop()

    def close(self) -> None:
        super().close()
        self.pause()

    def _view(self) -> Any:
        from rich.table import Table

        table = Table.grid(padding=(0, 2))
        if self._planned is None:
            return table
        total = len(self._planned.hosts)
        elapsed = time.monotonic() - self._stage_started
        estimate = f", about {elapsed / self._done * (total - self._done):.0f}s left" if self._done else ""
        with self._lock:
            running = dict(self._running)
        table.add_row(f"stage {self._planned.index + 1} {self._planned.stage.name}: {self._done}/{total} done, "
                      f"{self._failed} failed, {len(running)} running, {elapsed:.0f}s{estimate}")
        for host in sorted(running)[:20]:
            table.add_row(f"  {host:<14} {time.monotonic() - running[host]:>4.0f}s  {self._last.get(host, '')}")
        return table


def console_report(stream: TextIO, check_only: bool = False, verbosity: int = 0) -> ConsoleReport:
    """The live view on a terminal; plain lines in CI, in a pipe, with NO_COLOR or TERM=dumb."""
    plain = not stream.isatty() or os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb"
    return ConsoleReport(stream, check_only, verbosity) if plain else LiveReport(stream, check_only, verbosity)


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
    if run.lease_lost:
        lines.append("run stopped: this controller lost its lease (another took the run over); it wrote nothing more")
    elif run.interrupted:
        lines.append("run interrupted: the finished work is journaled")
    elif run.check_only:
        lines.append("plan only: nothing was changed")
    elif run.partial:
        lines.append(f"run partial: not finished on {', '.join(run.partial)} (left out as unreachable after the run "
                     "had changed it)")
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
        if changing and planned.step.reversible is not True:
            lines.append(f"      {undo_warning(planned)}")
    return "\n".join(lines)


def undo_warning(planned: PlannedStage) -> str:
    """What a plan says of a changing stage an undo cannot take back, or of one whose step does not say."""
    if planned.step.reversible is None:
        return (f"undo unknown: {planned.step.name} does not say whether its change can be undone "
                f"(an undo of this run would refuse)")
    return f"cannot be undone: {irreversible(planned)}"


class ConsoleView:
    """The command line's view of a run: a subscriber (overhaul.events) that prints what the run publishes.

    Progress goes to `stream` (the live view on a terminal, plain lines elsewhere: see `console_report`);
    warnings and errors to `errors` (by default standard error as it is when they are told: the live view's,
    while it draws). `show_summary`: the table of outcomes at the end (verify prints its own). Used as a context
    manager, the live view stops however the run ends (an exception included)::

        with api.ConsoleView() as view:
            api.run(planned, yes=True, subscribers=[view])
    """

    def __init__(self, stream: TextIO | None = None, *, errors: TextIO | None = None, check_only: bool = False,
                 verbosity: int = 0, show_summary: bool = True):
        self.stream, self._errors, self.show_summary = stream or sys.stdout, errors, show_summary
        self.progress = console_report(self.stream, check_only, verbosity)

    def __enter__(self) -> ConsoleView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def errors(self) -> TextIO:
        return self._errors or sys.stderr

    def __call__(self, event: Event) -> None:
        match event:
            case StageStarted(planned, hosts):
                self.progress.stage_started(planned, hosts)
            case BatchStarted(planned, number, total, hosts):
                self.progress.batch_started(planned, number, total, hosts)
            case PairStarted(planned, host):
                self.progress.host_started(planned, host)
            case CommandDone(host, result):
                self.progress.command_done(host, result)
            case PairFinished(result):
                self.progress.host_finished(result)
            case Asking():
                self.progress.pause()
            case Notice(text, level):
                print(text, file=self.stream if level == "info" else self.errors, flush=True)
            case RunStarted():
                self._started(event)
            case PreflightChecked(report):
                print_preflight(report, self.stream)
            case RunEnded():
                self.close()
                if event.journal_error and not event.result.lease_lost:
                    print(f"error: {event.journal_error}: the run stopped after the running steps (no step ran "
                          f"unrecorded); fix the controller's disk, then: overhaul resume --env {event.environment}",
                          file=self.errors, flush=True)
                print(ending(event, self.show_summary), file=self.stream, flush=True)

    def _started(self, event: RunStarted) -> None:
        version = f", version {event.version}" if event.version else ""
        version += f", limited to {event.limit}" if event.limit else ""
        print(f"run {event.run_id}: {event.runbook} on {event.environment}{version}, {plural(event.hosts, 'host')}, "
              f"logs in {event.logs}", file=self.stream, flush=True)
        if event.resuming is not None and not event.undoing:
            print(f"resuming run {event.run_id}: {event.resuming} (stage, host) pairs were done; each is skipped "
                  "once its check confirms it still holds", file=self.stream)

    def close(self) -> None:
        """Stop the live view and its heartbeat (the run ended, or the command stopped on an error)."""
        self.progress.close()


def plural(count: int, noun: str) -> str:
    """`1 host`, `2 hosts`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def ending(event: RunEnded, show_summary: bool = True) -> str:
    """What a run's last lines say: a refusal; else the summary, the status, and the way on."""
    result, record, environment = event.result, event.run, event.environment
    lines: list[str] = []
    if result.refused:
        problems = len(result.refused)
        lines.append(f"refused before any change ({problems} problem{'s' if problems != 1 else ''}): nothing was "
                     "changed on any host")
        return "\n".join(lines)
    if show_summary:
        lines.append(summary(result, event.stages))
    if record is not None and result.lease_lost:
        lines.append(f"run {record.id}: this controller lost its lease after {event.elapsed:.1f} s and wrote nothing "
                     f"more; see the run as its new holder leaves it: overhaul show {record.id}")
        return "\n".join(lines)
    if record is not None:
        counts = {outcome: sum(r.outcome is outcome for r in result.results) for outcome in Outcome}
        lines.append(f"run {record.id} {event.status} in {event.elapsed:.1f} s: "
                     + ", ".join(f"{count} {outcome.value}" for outcome, count in counts.items())
                     + f"; details: overhaul show {record.id}")
    if result.interrupted:
        lines.append(f"resume with: overhaul resume --env {environment}")
    elif result.rolled_back:
        lines.append("rolled back: every change this run made was taken back; the farm is as the run found it")
    elif event.ways_on is not None and record is not None:
        if event.ways_on.left:
            lines.append(ways_on(environment, record.id, event.ways_on))
        else:
            lines.append(f"after repairing the cause, continue with: overhaul resume --env {environment} "
                         f"(or give the run up: overhaul abandon --run {record.id})")
    if result.partial and not result.interrupted:
        one = len(result.partial) == 1
        lines.append(f"left half-done: {', '.join(result.partial)}: excluded from this run as unreachable, after an "
                     f"earlier attempt of it had changed {'it' if one else 'them'}")
        lines.append(f"once {'it answers' if one else 'they answer'}, finish the run with: "
                     f"overhaul resume --env {environment}")
    return "\n".join(lines)


def ways_on(environment: str, run_id: str, ways: WaysOn) -> str:
    """The last lines of a failed run that left hosts part-way: which, why, and each way on that applies to it."""
    lines = [f"left part-way by this run (what it stopped there may still be down): {', '.join(ways.left)}"]
    for host, (by, undone) in ways.left.items():
        more = f" and {len(undone) - 3} more" if len(undone) > 3 else ""
        lines.append(f"  {host}: changed by {', '.join(by)}; not done: {', '.join(undone[:3])}{more}")
    lines.append(f"the ways on (run {run_id}):")
    lines.append(f"  repair the cause, then finish the run: overhaul resume --env {environment}")
    if ways.undo_blocked:
        lines.append(f"  (not `overhaul undo`: {'; '.join(ways.undo_blocked)})")
    else:
        lines.append(f"  or take back every change it made: overhaul undo --run {run_id}")
    if ways.rollback:  # (only a command that takes back this very run: never an older upgrade's backup)
        lines.append(f"  or go back to the version and data from before the upgrade (its backup): {ways.rollback}")
    return "\n".join(lines)


def print_preflight(report: PreflightReport, stream: TextIO = sys.stdout) -> None:
    """One table, host x stage: ok or the reason; then each refusal on a line of its own."""
    from rich.console import Console  # only a run that reaches the gate pays for rich
    from rich.table import Table
    from rich.text import Text

    console = Console(file=stream, width=None if stream.isatty() else 200, highlight=False, soft_wrap=False)
    table = Table(title="preflight", title_justify="left", show_lines=False)
    hosts = report.hosts()
    host_width = max([len(host) for host in hosts] + [len(f"({len(hosts)} more)")])
    table.add_column("host", min_width=host_width, no_wrap=True)
    # A cell holds the start of a reason; the lines below the table hold all of it.
    cell_width = max(8, (console.width - host_width - 4) // (len(report.stages) + 1) - 3)
    for title in ["ssh", *(f"{p.index + 1} {p.stage.name}" for p in report.stages)]:
        table.add_column(title, max_width=cell_width, overflow="ellipsis")
    quiet = 0
    for host in hosts:
        cells = [_cell(report, index, host) for index in (HOST_COLUMN, *(p.index for p in report.stages))]
        if len(report.checks) > 40 and all(cell in ("ok", "-") for cell in cells):
            quiet += 1  # a big farm: only the hosts with something to say get a row
            continue
        table.add_row(Text(host), *(Text(cell, no_wrap=True, overflow="ellipsis") for cell in cells))
    if quiet:
        table.add_row(f"({quiet} more)", *["ok"] * (len(report.stages) + 1))
    console.print(table)
    for host, why in report.excluded.items():
        console.print(f"excluded from this run: {host}: {why}")
    for line in report.refusals:
        console.print(f"refused: {line}", markup=False)


def _cell(report: PreflightReport, index: int, host: str) -> str:
    check = report.checks.get((index, host))
    if check is None:
        return "-"
    if host in report.excluded:
        return "excluded"
    return "ok" if check.done else check.message


def print_checks(cases: list[Case], stream: TextIO = sys.stdout) -> None:
    """What verify found: each testinfra check on each host, then the counts and every failure."""
    checks = [c for c in cases if c.source != "runbook"]
    if checks:
        print(f"\n== checks ({len({c.check for c in checks})} checks x {len({c.host for c in checks})} hosts)",
              file=stream)
        for case in checks:
            print(f"   {case.host:<14} {case.status:<8} {case.check}{': ' + case.message if case.message else ''}",
                  file=stream)
    counts = {status: sum(1 for c in cases if c.status == status) for status in ("passed", "failed", "skipped")}
    print(f"\nverify: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
          f"({len(cases)} checks x hosts)", file=stream)
    for case in cases:
        if case.status == "failed":
            print(f"FAILED {case.check} on {case.host}: {case.message}", file=stream)
