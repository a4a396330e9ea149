"""What the operator sees: a line per (stage, host) as results arrive, and a summary at the end."""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from typing import Any, TextIO

from overhaul.events import (
    Asking,
    BatchStarted,
    CommandDone,
    CommandStarted,
    Event,
    Notice,
    PairFinished,
    PairStarted,
    PreflightChecked,
    PreflightProgress,
    RunEnded,
    RunStarted,
    StageStarted,
    WaysOn,
)
from overhaul.plan import PlannedStage
from overhaul.preflight import HOST_COLUMN, PreflightReport
from overhaul.runner import HostResult, RunResult
from overhaul.settings import run_page
from overhaul.step import Outcome
from overhaul.transport import CommandResult
from overhaul.undo import irreversible
from overhaul.verification import Case

MARKS = {Outcome.OK: "ok", Outcome.CHANGED: "changed", Outcome.FAILED: "FAILED", Outcome.SKIPPED: "skipped"}


HEARTBEAT = float(os.environ.get("OVERHAUL_HEARTBEAT_SECONDS", "30"))  # off a terminal: "still running" lines


def one_line(command: str) -> str:
    """A command on one line, as -v and the views show it: its lines joined with '; '."""
    return "; ".join(line.strip() for line in command.splitlines() if line.strip())


def last_line(result: CommandResult) -> str:
    """The last line a command wrote (what a terminal shows of a line rewritten with '\r'), without control
    characters: one line of a host's latest output."""
    for line in reversed((result.stdout + result.stderr).splitlines()):
        line = re.sub(r"[\x00-\x1f\x7f]", "", line.rsplit("\r", 1)[-1]).strip()
        if line:
            return line
    return ""


def age(seconds: float) -> str:
    """`0.4s`, `12s`, `3m05s`."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


def crop(text: str, width: int) -> str:
    """`text` cut to `width` characters, an ellipsis where it was cut."""
    return text if len(text) <= width else text[:max(width - 1, 0)] + "…"[:width]


class ConsoleReport:
    """Progress as plain lines, one per event (a Listener for the runner): for CI, pipes, NO_COLOR, TERM=dumb.

    During a stage, a "still running: app1 (30s: $ the command it runs)" line every HEARTBEAT seconds says what is
    being waited on. `verbosity` 1 (-v) adds each command (as the step wrote it, reads included) and its exit code
    as it completes; -1 (-q) prints only failures (the run's last line comes after).
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
        self._commands: dict[str, tuple[str, bool, float]] = {}  # host -> its running command, a read?, since
        self._lock = threading.Lock()
        self._beat: threading.Event | None = None
        self._preflight_told = False

    def _say(self, text: str) -> None:
        with self._lock:
            print(text, file=self.stream, flush=True)

    def say(self, text: str) -> None:
        """A line beside the progress (a notice)."""
        self._say(text)

    def preflight_progress(self, checked: int, total: int) -> None:
        if not self._preflight_told and self.verbosity >= 0:
            self._preflight_told = True
            self._say(f"preflight: checking {plural(total, 'host')}")

    def preflight_done(self) -> None:
        """The preflight's table comes next (the live view stops drawing first)."""

    def stage_started(self, planned: PlannedStage, hosts: list[str]) -> None:
        self._stage = planned.index
        verb = "plan" if self.check_only else "stage"
        if self.verbosity >= 0:
            self._say(f"\n== {verb} {planned.index + 1}: {planned.stage.name} ({planned.stage.step} on "
                      f"{plural(len(hosts), 'host')}, {planned.stage.strategy})")
            if self.check_only and planned.step.reversible is not True and not planned.step.read_only:
                self._say(f"   {undo_warning(planned)}")
        self._start_heartbeat()

    def batch_started(self, planned: PlannedStage, number: int, total: int, hosts: list[str]) -> None:
        if self.verbosity >= 0:
            self._say(f"   -- batch {number}/{total}: {', '.join(hosts)}")

    def host_started(self, planned: PlannedStage, host: str) -> None:
        with self._lock:
            self._running[host] = time.monotonic()

    def command_started(self, host: str, command: str, read: bool) -> None:
        with self._lock:
            self._commands[host] = (command, read, time.monotonic())

    def command_done(self, host: str, result: CommandResult) -> None:
        with self._lock:
            self._commands.pop(host, None)
        if self.verbosity >= 1:
            self._say(f"   {host:<14} $ {one_line(result.command)}  [exit {result.exited}, "
                      f"{result.duration * 1000:.0f} ms]")

    def host_finished(self, result: HostResult) -> None:
        with self._lock:
            self._running.pop(result.host, None)
            self._commands.pop(result.host, None)
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
                    waiting = ", ".join(f"{host} ({now - since:.0f}s{self._doing(host)})"
                                        for host, since in sorted(self._running.items()))
                if waiting and self.verbosity >= 0:
                    self._say(f"   still running: {waiting}")

        threading.Thread(target=beat, daemon=True).start()

    def _doing(self, host: str) -> str:
        """What a heartbeat says `host` runs now: its command (cropped), never a read unless -v."""
        command, read, _ = self._commands.get(host, ("", False, 0.0))
        return f": $ {crop(one_line(command), 60)}" if command and (not read or self.verbosity >= 1) else ""


class LiveReport(ConsoleReport):
    """On a terminal: a live view (rich) of the preflight (hosts checked) or of the stage (hosts done/total,
    failed, running, elapsed and an estimate), and one line per running host: the command it runs now as the step
    wrote it, for how long, and the last line of its latest output. Reads of the host's state (probes) are not
    shown unless -v. Finished hosts scroll above it as lines.

    The view is drawn within the terminal, whatever its size: each line cropped to its width, the host list cut to
    its height ("... and N more running"); a taller view would leave frames in the scrollback."""

    def __init__(self, stream: TextIO, check_only: bool = False, verbosity: int = 0):
        super().__init__(stream, check_only, verbosity, heartbeat=3600)
        from rich.console import Console
        from rich.live import Live

        self._planned: PlannedStage | None = None
        self._stage_started = time.monotonic()
        self._done = self._failed = 0
        self._said: dict[str, str] = {}  # host -> the last line of its latest output
        self._preflight: tuple[int, int, float] | None = None  # (checked, total, since): while the preflight reads
        self._console = Console(file=stream)
        self._live = Live(console=self._console, refresh_per_second=4, transient=True, get_renderable=self._view,
                          vertical_overflow="crop")

    def _say(self, text: str) -> None:
        # soft_wrap: a long line (a command with -v) is left whole for the terminal to wrap, as in a pipe
        self._console.print(text, markup=False, highlight=False, soft_wrap=True)

    def preflight_progress(self, checked: int, total: int) -> None:
        since = self._preflight[2] if self._preflight is not None else time.monotonic()
        self._preflight = (checked, total, since)
        if not self._live.is_started:
            self._live.start()

    def preflight_done(self) -> None:
        self._preflight = None
        self.pause()

    def stage_started(self, planned: PlannedStage, hosts: list[str]) -> None:
        self._planned, self._stage_started, self._done, self._failed = planned, time.monotonic(), 0, 0
        self._preflight = None
        super().stage_started(planned, hosts)
        if not self._live.is_started:
            self._live.start()

    def command_done(self, host: str, result: CommandResult) -> None:
        if not result.read or self.verbosity >= 1:
            said = last_line(result)
            with self._lock:
                self._said[host] = said or self._said.get(host, "")
        super().command_done(host, result)

    def host_finished(self, result: HostResult) -> None:
        if self._planned is not None and result.stage_index == self._planned.index:
            self._done += 1
            self._failed += result.outcome is Outcome.FAILED
        with self._lock:
            self._said.pop(result.host, None)
        super().host_finished(result)

    def pause(self) -> None:
        """Stop drawing (a question is about to be asked on the terminal); the next stage starts it again."""
        if self._live.is_started:
            self._live.stop()

    def close(self) -> None:
        super().close()
        self.pause()

    def _view(self) -> Any:
        from rich.text import Text

        width, height = self._console.size
        return Text("\n".join(self.lines(width - 1, height - 1)), no_wrap=True, overflow="crop")

    def lines(self, width: int, height: int) -> list[str]:
        """The view's lines, at most `height` of them, none wider than `width`."""
        return [crop(line, width) for line in self._lines(width, height)][:max(height, 0)]

    def _lines(self, width: int, height: int) -> list[str]:
        now = time.monotonic()
        if self._preflight is not None:
            checked, total, since = self._preflight
            return [f"preflight: {checked}/{total} hosts checked, {age(now - since)}"][:height]
        if self._planned is None:
            return []
        total = len(self._planned.hosts)
        elapsed = now - self._stage_started
        estimate = f", about {elapsed / self._done * (total - self._done):.0f}s left" if self._done else ""
        with self._lock:
            running = dict(self._running)
            commands = dict(self._commands)
            said = dict(self._said)
        lines = [f"stage {self._planned.index + 1} {self._planned.stage.name}: {self._done}/{total} done, "
                 f"{self._failed} failed, {len(running)} running, {age(elapsed)}{estimate}"]
        room = height - len(lines)
        hosts = sorted(running)
        shown = hosts if len(hosts) <= room else hosts[:max(room - 1, 0)]
        for host in shown:
            command, read, since = commands.get(host, ("", False, running[host]))
            if read and self.verbosity < 1:  # (a probe: what it does is said by the command after it)
                command, since = "", running[host]
            lines.append(self._host_line(host, now - since, command, said.get(host, ""), width))
        if len(shown) < len(hosts) and room > 0:
            lines.append(f"  ... and {len(hosts) - len(shown)} more running")
        return lines[:height]

    @staticmethod
    def _host_line(host: str, elapsed: float, command: str, said: str, width: int) -> str:
        """`  db1            2.8s  $ the command  | its last output line`, the command and the output cropped to share
        `width` (the command gets the larger share)."""
        head = f"  {host:<14} {age(elapsed):>6}  "
        room = width - len(head)
        doing = f"$ {one_line(command)}" if command else ""
        if not said:
            return head + crop(doing, room)
        said_room = min(len(said), max(room // 3, room - len(doing) - 3))
        return head + crop(doing, room - said_room - 3).ljust(room - said_room - 3) + " | " + crop(said, said_room)


def console_report(stream: TextIO, check_only: bool = False, verbosity: int = 0) -> ConsoleReport:
    """The live view on a terminal; plain lines in CI, in a pipe, with NO_COLOR or TERM=dumb, and with -q (failures
    and the last line only: nothing to draw)."""
    plain = (not stream.isatty() or os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb"
             or verbosity < 0)
    return ConsoleReport(stream, check_only, verbosity) if plain else LiveReport(stream, check_only, verbosity)


def summary(run: RunResult, stages: list[PlannedStage]) -> str:
    """A table of outcome counts per stage (by number, its name cut to fit 80 columns), then every failure with
    its host and reason, and where the run stopped. The run's verdict is not here: it follows (`ending`), once."""
    changed = "would change" if run.check_only else "changed"
    lines = [f"\n{'STAGE':<43} {'ok':>4} {changed:>12} {'failed':>7} {'skipped':>8}"]
    for planned in stages:
        counts = run.counts(planned.stage.name)
        lines.append(
            f"{planned.index + 1:>2} {crop(planned.stage.name, 40):<40} {counts[Outcome.OK]:>4} "
            f"{counts[Outcome.CHANGED]:>12} {counts[Outcome.FAILED]:>7} {counts[Outcome.SKIPPED]:>8}"
        )
    failures = [r for r in run.results if r.outcome is Outcome.FAILED]
    for result in failures:
        lines.append(f"FAILED {result.stage} on {result.host}: {result.message}")
    if run.stopped_at:
        lines.append(f"run stopped at stage {run.stopped_at!r}: {run.stop_reason}")
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
        self.verbosity = verbosity
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
            case CommandStarted(host, command, read):
                self.progress.command_started(host, command, read)
            case CommandDone(host, result):
                self.progress.command_done(host, result)
            case PairFinished(result):
                self.progress.host_finished(result)
            case Asking():
                self.progress.pause()
            case Notice(text, level):
                if level == "info":
                    self.progress.say(text)  # (above the live view, which a plain print would draw over)
                else:
                    print(text, file=self.errors, flush=True)
            case RunStarted():
                if self.verbosity >= 0:
                    self._started(event)
            case PreflightProgress(checked, total):
                self.progress.preflight_progress(checked, total)
            case PreflightChecked(report):
                self.progress.preflight_done()
                print_preflight(report, self.stream, table=self.verbosity >= 0)
            case RunEnded():
                self.close()
                if event.journal_error and not event.result.lease_lost:
                    print(f"error: {event.journal_error}: the run stopped after the running steps (no step ran "
                          f"unrecorded); fix the controller's disk, then: overhaul resume --env {event.environment}",
                          file=self.errors, flush=True)
                print(ending(event, self.show_summary and self.verbosity >= 0), file=self.stream, flush=True)

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
    """What a run's last lines say: a refusal; else the summary, then the verdict, once (`run ID STATUS in N s:
    counts; details: ...`; a plan's: `plan only: nothing was changed`), then only the way on (what to type next)."""
    result, record, environment = event.result, event.run, event.environment
    lines: list[str] = []
    if result.refused:
        problems = len(result.refused)
        lines.append(f"refused before any change ({problems} problem{'s' if problems != 1 else ''}): nothing was "
                     "changed on any host")
        return "\n".join(lines)
    if show_summary:
        lines.append(summary(result, event.stages))
    if result.lease_lost:
        lines.append(f"run {record.id}: this controller lost its lease after {event.elapsed:.1f} s and wrote nothing "
                     f"more; see the run as its new holder leaves it: overhaul show {record.id}" if record is not None
                     else "run stopped: this controller lost its lease (another took the run over); it wrote nothing "
                          "more")
        return "\n".join(lines)
    if record is not None:
        counts = {outcome: sum(r.outcome is outcome for r in result.results) for outcome in Outcome}
        lines.append(f"run {record.id} {event.status} in {event.elapsed:.1f} s: "
                     + ", ".join(f"{count} {outcome.value}" for outcome, count in counts.items())
                     + f"; details: overhaul show {record.id}" + (f" or {page}" if (page := run_page(record.id)) else ""))
    elif result.check_only and not result.interrupted:
        lines.append("plan only: nothing was changed")
    else:
        lines.append(f"run {event.status}")
    if result.interrupted:
        lines.append(f"resume with: overhaul resume --env {environment}")
    elif result.rolled_back:
        lines.append("rolled back: every change this run made was taken back; the farm is as the run found it")
    elif event.ways_on is not None and record is not None:
        if event.ways_on.left:
            lines.append(ways_on(environment, record.id, event.ways_on))
        else:
            lines.append(f"after repairing the cause, continue with: overhaul resume --env {environment} "
                         "(or leave it: a failed run does not block the next one)")
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


def print_preflight(report: PreflightReport, stream: TextIO = sys.stdout, *, table: bool = True,
                    width: int | None = None) -> None:
    """One table, host x stage, the stages by number (their names in a legend below it, so it fits 80 columns):
    ok or the start of the reason; then each refusal, whole, on a line of its own. Without `table` (-q): only the
    refusals and the hosts left out."""
    from rich import box
    from rich.console import Console  # only a run that reaches the gate pays for rich
    from rich.table import Table
    from rich.text import Text

    console = Console(file=stream, width=width or (None if stream.isatty() else 200), highlight=False,
                      soft_wrap=False)
    if table:
        grid = Table(title="preflight", title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False,
                     show_edge=False)
        hosts = report.hosts()
        host_width = max([len(host) for host in hosts] + [len(f"({len(hosts)} more)")])
        grid.add_column("host", min_width=host_width, no_wrap=True)
        # A cell holds the start of a reason; the lines below the table hold all of it.
        cell_width = max(4, (console.width - host_width - 2) // (len(report.stages) + 1) - 2)
        for title in ["ssh", *(str(p.index + 1) for p in report.stages)]:
            grid.add_column(title, max_width=cell_width, overflow="ellipsis", no_wrap=True)
        quiet = 0
        for host in hosts:
            cells = [_cell(report, index, host) for index in (HOST_COLUMN, *(p.index for p in report.stages))]
            if len(report.checks) > 40 and all(cell in ("ok", "-") for cell in cells):
                quiet += 1  # a big farm: only the hosts with something to say get a row
                continue
            grid.add_row(Text(host), *(Text(cell, no_wrap=True, overflow="ellipsis") for cell in cells))
        if quiet:
            grid.add_row(f"({quiet} more)", *["ok"] * (len(report.stages) + 1))
        console.print(grid)
        for line in legend([f"{p.index + 1} {p.stage.name}" for p in report.stages], console.width):
            console.print(Text(line), soft_wrap=True)
    for host, why in report.excluded.items():
        console.print(Text(f"excluded from this run: {host}: {why}"))
    for line in report.refusals:
        console.print(Text(f"refused: {line}"))


def legend(items: list[str], width: int) -> list[str]:
    """`stages: 1 backup, 2 stop, ...` in lines of at most `width` characters, never an item cut in two."""
    lines, line = [], "stages:"
    for position, item in enumerate(items):
        item += "," if position < len(items) - 1 else ""
        if len(line) + 1 + len(item) > width and line.strip():
            lines.append(line)
            line = " "
        line += " " + item
    return [*lines, line]


def _cell(report: PreflightReport, index: int, host: str) -> str:
    check = report.checks.get((index, host))
    if check is None:
        return "-"
    if host in report.excluded:
        return "excluded"
    return "ok" if check.done else check.message


def print_checks(cases: list[Case], stream: TextIO = sys.stdout, verbosity: int = 0) -> None:
    """What verify found: each testinfra check on each host (not with -q), then the counts and every failure."""
    checks = [c for c in cases if c.source != "runbook"]
    if checks and verbosity >= 0:
        print(f"\n== checks ({len({c.check for c in checks})} checks x {len({c.host for c in checks})} hosts)",
              file=stream)
        for case in checks:
            print(f"   {case.host:<14} {case.status:<8} {case.check}{': ' + case.message if case.message else ''}",
                  file=stream)
    for case in cases:
        if case.status == "failed":
            print(f"FAILED {case.check} on {case.host}: {case.message}", file=stream)
    counts = {status: sum(1 for c in cases if c.status == status) for status in ("passed", "failed", "skipped")}
    gap = "" if verbosity < 0 else "\n"
    print(f"{gap}verify: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
          f"({len(cases)} checks x hosts)", file=stream)
