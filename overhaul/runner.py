"""The runner: walks a plan stage by stage over a bounded pool, within each stage's failure budget
(a read-only plan: host by host, so a host's connection closes after its last stage; see run()).

Per (stage, host): `check`; if the work is not done, `apply` then `verify`. Every pair ends `ok`,
`changed`, `failed` or `skipped`. A host that failed is skipped by later stages. A stage whose
failures exceed its `max_failures` stops the run (unless `on_failure: continue`, which runs every
host and stops nothing): later stages are skipped, so nothing downstream of a failed safeguard runs.

A pair is retried (its stage's `retry`) only when a step reported a failure (`StepFailed`) or the host
could not be reached (`HostUnreachable`); any other exception is a bug and fails the pair at once,
its traceback in the host's log.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from overhaul.context import Facts, Probe, StepHost
from overhaul.errors import FAILED_EXIT, INTERRUPTED_EXIT, REFUSED_EXIT, HostUnreachable, StepFailed
from overhaul.plan import Plan, PlannedStage
from overhaul.runbook import resolve_count
from overhaul.step import Outcome, Step
from overhaul.transport import CommandResult, Transport

if TYPE_CHECKING:
    from overhaul.preflight import PreflightReport


@dataclass
class HostResult:
    stage: str
    host: str
    outcome: Outcome
    message: str
    attempts: int = 0
    duration: float = 0.0
    facts: dict[str, Any] = field(default_factory=dict)
    stage_index: int = 0
    output: list[CommandResult] = field(default_factory=list)  # the commands it ran, redacted
    traceback: str = ""  # a step's bug: where it raised (redacted), for the host log


@dataclass
class RunResult:
    results: list[HostResult]
    stopped_at: str | None = None  # the stage that stopped the run
    stop_reason: str = ""
    check_only: bool = False
    interrupted: bool = False  # stopped by request (Ctrl-C, SIGTERM): resumable
    refused: list[str] = field(default_factory=list)  # why the run was refused before any change
    preflight: PreflightReport | None = None
    run_id: str = ""  # the journaled run (none for a plan)
    rolled_back: bool = False  # it failed, and its undo took back every change it made
    partial: list[str] = field(default_factory=list)  # hosts left out (unreachable) that the run had already changed
    lease_lost: bool = False  # another controller took the environment's lease over: this one wrote nothing more

    @property
    def failed(self) -> bool:
        return self.stopped_at is not None or any(r.outcome is Outcome.FAILED for r in self.results)

    def counts(self, stage: str) -> Counter[Outcome]:
        return Counter(r.outcome for r in self.results if r.stage == stage)

    @property
    def status(self) -> str:
        """How the run ended, as journaled: refused, interrupted, rolled back, failed, partial (a host it had
        changed was left out as unreachable) or succeeded."""
        if self.refused and not self.interrupted:
            return "refused"
        if self.rolled_back:
            return "rolled back"
        if self.interrupted:
            return "interrupted"
        if self.failed:
            return "failed"
        return "partial" if self.partial else "succeeded"

    @property
    def exit_code(self) -> int:
        """0 success, 1 some host failed (or the run stopped, or left a host it had changed half-done), 3 refused
        before any change, 130 interrupted."""
        if self.interrupted:
            return INTERRUPTED_EXIT
        if self.refused:
            return REFUSED_EXIT
        return FAILED_EXIT if self.failed or self.partial else 0


def log_name(stage_index: int, stage: str, host: str) -> str:
    """The file name of a (stage, host) pair's log: the stage's number as printed (from 1), its name, the host:
    `04-reconfigure-db-db1.log`. The stage's name keeps letters, digits, '.' and '_' (any other run of characters
    becomes one '-'): a name may hold spaces or a '/'."""
    safe = re.sub(r"[^A-Za-z0-9_.]+", "-", stage).strip("-.")[:60] or "stage"
    return f"{stage_index + 1:02d}-{safe}-{host}.log"


UNDO_FACTS = "undo"  # the key of a pair's facts holding what its step remembered for an undo (see overhaul.undo)
FRESH = 5.0  # seconds: a fact read this recently serves a verification of a host the run has not changed


T = TypeVar("T")
R = TypeVar("R")


class _NotRetried(Exception):
    """A failed pair is not tried again because the run is stopping."""


class _Vetoed(Exception):
    """A listener vetoed the pair's apply (the journal could not record that it begins): `_run_host` returns None, as
    for a pair that never started (resume runs it)."""


class Listener(Protocol):
    """Told about the run as it goes (live report, journal). Called from worker threads, one at a time; a listener
    with a true `concurrent` attribute hears `host_started`, `host_applying` and `host_finished` from several workers
    at once, outside the others' turns (the journal: each worker waits for its own row, written with the others' in
    one transaction).
    Each listener hears a pair's events in the listeners' order (the journal first: journaled, then told)."""

    def stage_started(self, planned: PlannedStage, hosts: list[str]) -> None: ...

    def host_started(self, planned: PlannedStage, host: str) -> bool | None:
        """False vetoes the pair (the journal cannot record it): it does not run."""

    # Optional: `host_applying(planned, host) -> bool | None`, told when the pair's step is about to apply (its check
    # found work to do), before its first command; False vetoes the apply (the journal could not record that it
    # begins) and the pair ends as one that never started.

    def host_finished(self, result: HostResult) -> None: ...


class Runner:
    def __init__(
        self,
        plan: Plan,
        transport: Transport,
        *,
        check_only: bool = False,
        confirm: Callable[[PlannedStage], bool] | None = None,
        listeners: list[Listener] | None = None,
        sleep: Callable[[float], object] | None = None,
        run_id: str | None = None,
        previous: dict[tuple[int, str], HostResult] | None = None,
        facts: Facts | None = None,
        log_dir: Path | None = None,
        on_log_error: Callable[[str], None] | None = None,
    ):
        self.run_id = run_id or time.strftime("%Y%m%d%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        self.plan = plan
        self.transport = transport
        self.check_only = check_only
        self.confirm = confirm or (lambda planned: False)
        self.listeners = listeners or []
        self._stopping = threading.Event()
        self.sleep = sleep or self._stopping.wait  # a retry's wait ends early on Ctrl-C
        self.previous = previous or {}  # results of the run being resumed
        self._lock = threading.Lock()  # the run's own state: results, touched hosts, budgets
        self._listening = threading.Lock()  # listeners hear one event at a time (but `concurrent` ones: see Listener)
        self._results: list[HostResult] = []
        self.facts = facts or Facts()  # shared with the preflight and the preview of this run
        self.log_dir = log_dir  # each pair's commands go to log_dir/log_name(...) as they complete
        self.on_log_error = on_log_error
        self.touched: set[str] = set()  # hosts a step applied on (or may have): read afresh at every stage

    def request_stop(self) -> None:
        """Start no new (stage, host); let the running ones finish. The run ends interrupted."""
        self._stopping.set()

    @property
    def host_by_host(self) -> bool:
        """Whether run() takes each host through every stage in turn (a read-only run) instead of stage by stage."""
        return bool(self.plan.stages) and all(planned.step.read_only and planned.stage.strategy == "parallel"
                                              and not planned.stage.confirm for planned in self.plan.stages)

    def run(self) -> RunResult:
        if self.host_by_host:
            return self._run_host_by_host()
        # One pool of workers for every stage (each stage still runs at most its own width at once): a worker's
        # thread is started once per run, not once per stage.
        size = max([min(self._width(planned), len(planned.hosts)) for planned in self.plan.stages], default=1)
        with ThreadPoolExecutor(max_workers=max(1, size)) as pool:
            return self._run_stages(pool)

    def _width(self, planned: PlannedStage) -> int:
        """How many of the stage's pairs run at once."""
        stage = planned.stage
        if stage.strategy == "parallel":
            return stage.concurrency or self.transport.max_workers
        return 1 if stage.strategy == "serial" else resolve_count(stage.batch or 1, len(planned.hosts), 1)

    def _run_stages(self, pool: ThreadPoolExecutor) -> RunResult:
        failed_hosts: set[str] = set()
        stopped_at, reason = None, ""
        # The hosts of the last stage stay connected for what may follow on this transport (an undo, hooks): the
        # transport's owner closes them.
        last_stage = {host: planned.index for planned in self.plan.stages for host in planned.hosts}
        if not self.check_only:
            self.transport.hold(last_stage)
        for planned in self.plan.stages:
            if not self.check_only:  # a host with no stage left: its connection (and its thread) is not kept
                for host in [h for h, index in last_stage.items() if index < planned.index]:
                    self.transport.release(host)
                    del last_stage[host]
            name = planned.stage.name
            if self._stopping.is_set():
                return RunResult(self._results, None, "interrupted", self.check_only, interrupted=True)
            if stopped_at is not None:
                for host in planned.hosts:
                    message = f"run stopped at stage {stopped_at!r}"
                    self._record(HostResult(name, host, Outcome.SKIPPED, message, stage_index=planned.index))
                continue
            if planned.stage.confirm and not self.check_only and planned.hosts:
                self._tell("pause")  # the live view gives the terminal to the question
            if planned.stage.confirm and not self.check_only and planned.hosts and not self.confirm(planned):
                stopped_at, reason = name, "not confirmed"
                for host in planned.hosts:
                    self._record(HostResult(name, host, Outcome.SKIPPED, "stage not confirmed", stage_index=planned.index))
                continue
            for listener in self.listeners:
                listener.stage_started(planned, planned.hosts)
            results = self._run_stage(planned, failed_hosts, pool)
            if self._stopping.is_set():
                return RunResult(self._results, None, "interrupted", self.check_only, interrupted=True)
            failures = [r.host for r in results if r.outcome is Outcome.FAILED]
            if planned.stage.on_failure == "stop":
                failed_hosts.update(failures)  # with `continue`, a failure does not bench the host
            budget = resolve_count(planned.stage.max_failures, len(planned.hosts), 0)
            if len(failures) > budget and planned.stage.on_failure == "stop":
                stopped_at = name
                reason = f"{len(failures)} of {len(planned.hosts)} hosts failed (max_failures {planned.stage.max_failures})"
        return RunResult(self._results, stopped_at, reason, self.check_only)

    def _run_stage(self, planned: PlannedStage, failed_hosts: set[str], pool: ThreadPoolExecutor) -> list[HostResult]:
        stage = planned.stage
        total = len(planned.hosts)
        budget = resolve_count(stage.max_failures, total, 0)
        parking = self.transport.parks(self.plan.hosts)
        width = self._width(planned)
        if stage.strategy == "parallel":
            # The hosts whose connection the pool kept since their last use first: on a farm larger than the pool
            # keeps, they are those closed next (see HostPool.park), and every kept one is used before it is.
            batches = [self.transport.warm_first(planned.hosts) if parking else planned.hosts]
        else:
            batches = [planned.hosts[i : i + width] for i in range(0, total, width)]
        failures = Counter[str]()

        def one(host: str) -> HostResult | None:
            if not parking:
                return pair(host)
            self.transport.take(host)  # (before anything else: its kept connection is in use, not one to close)
            try:
                return pair(host)
            finally:  # kept open for its next stage, within the pool's bound
                self.transport.park(host, held=not self.check_only)

        def pair(host: str) -> HostResult | None:
            if self._stopping.is_set():
                return None  # never started: resume will run it
            if host in failed_hosts:
                return self._record(HostResult(stage.name, host, Outcome.SKIPPED, "failed in an earlier stage",
                                               stage_index=planned.index))
            with self._lock:
                over_budget = failures["failed"] > budget and stage.on_failure == "stop"
            if over_budget:
                return self._record(HostResult(stage.name, host, Outcome.SKIPPED, "stage failure budget exceeded",
                                               stage_index=planned.index))
            if not self._agreed("host_started", planned, host):
                return None
            ran = self._run_host(planned, host)
            if ran is None:
                return None  # vetoed before its apply: it never changed the host, resume runs it
            result = self._record(ran)
            if result.outcome is Outcome.FAILED:
                with self._lock:
                    failures["failed"] += 1
            return result

        results: list[HostResult] = []
        for number, batch in enumerate(batches, 1):
            if stage.strategy == "rolling":
                self._tell("batch_started", planned, number, len(batches), batch)
            results += [result for result in bounded_map(pool, one, batch, width) if result is not None]
        return results

    def _run_host_by_host(self) -> RunResult:
        """A read-only run (every stage an assertion, in parallel): each worker takes one host through all its
        stages, then closes that host's connection, so a 1,000-host verify keeps `forks` connections and
        threads, not one per host. Listeners still hear the stages in order (see _InStageOrder); a stage whose
        failures exceed its budget (`on_failure: stop`) starts no pair of its own or of a later stage."""
        stages = self.plan.stages
        stages_by_index = {p.index: p.stage.name for p in stages}
        hosts = list(dict.fromkeys(host for planned in stages for host in planned.hosts))
        budgets = {p.index: resolve_count(p.stage.max_failures, len(p.hosts), 0) for p in stages}
        widths = {p.index: threading.Semaphore(p.stage.concurrency) for p in stages if p.stage.concurrency}
        failures = Counter[int]()
        stopped: set[int] = set()  # stages over their failure budget
        listeners = _InStageOrder(self.listeners, stages, self._listening)
        first = len(self._results)

        def one(planned: PlannedStage, host: str, benched: bool, ahead: list[Probe],
                read_with: int | None) -> HostResult | None:
            """The pair's result, run or skipped as the stage-by-stage path would; None: it must not start."""
            if self._stopping.is_set():
                return None  # never started: resume will run it
            with self._lock:
                over = min((index for index in stopped if index <= planned.index), default=None)
            if over is not None and over < planned.index:
                message = f"run stopped at stage {stages_by_index[over]!r}"
            elif benched:
                message = "failed in an earlier stage"
            elif over is not None:
                message = "stage failure budget exceeded"
            else:
                return self._run_host(planned, host, ahead, read_with) if self._agreed("host_started", planned,
                                                                                       host) else None
            return HostResult(planned.stage.name, host, Outcome.SKIPPED, message, stage_index=planned.index)

        def walk(host: str) -> None:
            benched = False
            mine = [p for p in stages if host in p.params]  # (a dict: not a list built per call)
            try:
                read_with = None  # the stage whose command read ahead for this one
                for position, planned in enumerate(mine):
                    ahead = reads_ahead(planned, mine[position + 1:], host)
                    # A stage's own `concurrency` is held from before the pair is decided until its failure is
                    # counted, so a stop or a spent budget holds back the pairs waiting for it.
                    with widths.get(planned.index) or nullcontext():
                        result = one(planned, host, benched, ahead, read_with)
                        read_with = planned.index if ahead else read_with
                        if result is None:
                            return
                        if result.outcome is Outcome.FAILED and planned.stage.on_failure == "stop":
                            benched = True
                            with self._lock:
                                failures[planned.index] += 1
                                if failures[planned.index] > budgets[planned.index]:
                                    stopped.add(planned.index)
                    listeners.finished(self._record_quietly(result))
            finally:
                if not self.check_only:  # (a preview: the run after it works on the same connections)
                    self.transport.release(host)

        if not self.check_only:
            self.transport.hold(hosts)
        with ThreadPoolExecutor(max_workers=max(1, min(self.transport.max_workers, len(hosts)))) as pool:
            list(pool.map(walk, hosts))
        listeners.flush(every_stage=not self._stopping.is_set())
        rank = {(p.index, host): order for order, (p, host) in enumerate((p, h) for p in stages for h in p.hosts)}
        self._results[first:] = sorted(self._results[first:], key=lambda r: rank.get((r.stage_index, r.host), 0))
        if self._stopping.is_set():
            return RunResult(self._results, None, "interrupted", self.check_only, interrupted=True)
        if stopped:
            planned = next(p for p in stages if p.index == min(stopped))
            reason = (f"{failures[planned.index]} of {len(planned.hosts)} hosts failed "
                      f"(max_failures {planned.stage.max_failures})")
            return RunResult(self._results, planned.stage.name, reason, self.check_only)
        return RunResult(self._results, None, "", self.check_only)

    def _agreed(self, event: str, planned: PlannedStage, host: str) -> bool:
        """Tell the listeners that hear `event` (`host_started`: the pair starts; `host_applying`: its step is about
        to apply); False when one vetoes it (the journal cannot record it, or the lease is lost): nothing runs
        unrecorded."""
        vetoed = [self._hear(listener, event, planned, host) is False for listener in self.listeners
                  if hasattr(listener, event)]
        return not any(vetoed)

    def _hear(self, listener: Listener, event: str, *args: Any) -> Any:
        """One listener's `event`: under `_listening` (one event at a time), unless the listener is `concurrent` (the
        journal, whose workers' writes must not wait for one another to share a transaction)."""
        method = getattr(listener, event)
        if getattr(listener, "concurrent", False):
            return method(*args)
        with self._listening:
            return method(*args)

    def _tell(self, event: str, *args: Any) -> None:
        """An optional listener event (the live view's), to the listeners that want it, one at a time."""
        with self._listening:
            self._each(event, *args)

    def _each(self, event: str, *args: Any) -> None:
        for listener in self.listeners:
            method = getattr(listener, event, None)
            if method is not None:
                method(*args)

    def _run_host(self, planned: PlannedStage, name: str, ahead: list[Probe] | None = None,
                  read_with: int | None = None) -> HostResult | None:
        """Run one pair (check, then apply and verify if needed), with retries (None: a listener vetoed its apply);
        `ahead`: probes of the host's later read-only stages, read with this step's own (read-only runs: the host's
        reads are one command); `read_with`: the earlier stage whose command read ahead for this one (its log says
        so when it sent no command)."""
        stage = planned.stage
        log = self.log_dir / log_name(planned.index, stage.name, name) if self.log_dir is not None else None
        host = StepHost(self.transport.host(name), timeout=stage.timeout, run_id=self.run_id, facts=self.facts, log=log,
                        on_log_error=self.on_log_error, on_command=lambda result: self._command_done(name, result),
                        on_start=lambda command, read: self._each("command_started", name, command, read))
        step = planned.step(planned.params[name])
        started = time.monotonic()
        previous = self.previous.get((planned.index, name))
        # What an undo needs: journaled with the pair (whatever its outcome) once its apply began, in this attempt
        # or in the run being resumed (whose first reading of the host is the one to go back to).
        began = previous is not None and UNDO_FACTS in previous.facts
        if began:
            step.remembered.update(previous.facts[UNDO_FACTS])
        attempts = 0
        retrying = Retrying(
            retry=retry_if_exception_type((StepFailed, HostUnreachable)),
            stop=stop_after_attempt(stage.retry.attempts),
            wait=wait_exponential(multiplier=stage.retry.delay, exp_base=stage.retry.backoff, max=3600),
            sleep=self.sleep,  # ends early on Ctrl-C
            reraise=True,
        )

        last_error = ""

        def applying() -> None:
            nonlocal began
            if not self._agreed("host_applying", planned, name):
                raise _Vetoed(name)
            began = True

        def attempt() -> tuple[Outcome, str, dict[str, Any]]:
            nonlocal attempts, last_error
            if attempts and self._stopping.is_set():
                raise _NotRetried(f"{last_error} (not retried: the run is stopping)")
            attempts += 1
            try:
                return self._attempt(step, host, previous, applying, ahead or [])
            except (StepFailed, HostUnreachable) as exc:
                last_error = str(exc)
                self.facts.forget(name)  # a failed attempt may have changed the host: a retry reads afresh
                with self._lock:
                    self.touched.add(name)
                raise

        def result(outcome: Outcome, message: str, facts: dict[str, Any] | None = None, trace: str = "") -> HostResult:
            redact = host.redactor
            # What is journaled must be JSON: a value that is not (a datetime in `remembered`, say) fails this pair,
            # named, and is journaled marked (an undo refuses a pair whose remembered values are marked).
            facts, problems = as_json(facts or {}, "facts")
            if began:
                facts[UNDO_FACTS], more = as_json(step.remembered, "remembered")
                problems += more
            if problems:
                said = (f"step {stage.step!r} returned values that are not JSON: {'; '.join(problems)} (remembered "
                        "and facts hold strings, numbers, booleans, None, lists and string-keyed dicts only)")
                message = f"{message}; {said}" if outcome is Outcome.FAILED else said
                outcome = Outcome.FAILED
            return HostResult(stage.name, name, outcome, redact(message), attempts, time.monotonic() - started,
                              redact.walk(json.loads(json.dumps(facts))),  # in values, never in JSON text
                              planned.index, host.history, redact(trace))

        try:
            return result(*retrying(attempt))
        except (StepFailed, HostUnreachable, _NotRetried) as exc:
            return result(Outcome.FAILED, str(exc))
        except _Vetoed:
            return None
        except Exception as exc:  # a bug in a step fails this pair, not the run, and is never retried
            return result(Outcome.FAILED, f"step {stage.step!r} raised {type(exc).__name__}: {exc}",
                          trace=traceback.format_exc())
        finally:
            if read_with is not None and not host.history:
                reader = next(p.stage.name for p in self.plan.stages if p.index == read_with)
                host.note(f"read with the command of stage {read_with + 1} (see {log_name(read_with, reader, name)})")

    def _attempt(self, step: Step, host: StepHost, previous: HostResult | None, applying: Callable[[], None],
                 ahead: list[Probe]) -> tuple[Outcome, str, dict[str, Any]]:
        host.remote.connect()
        # Once the run has changed a host, each stage reads it afresh (a change by hand between two stages is
        # seen); a host the run has not changed keeps what was read of it. What the step reads goes in one command.
        # A verification (a read-only step) is there to see the host as it is now: it reads afresh anything
        # read more than FRESH seconds ago (a long run on other hosts, a resume).
        with self._lock:
            if host.name in self.touched:
                self.facts.forget(host.name)
            elif step.read_only:
                self.facts.forget(host.name, older_than=FRESH)
        host.prefetch([*step.probes(), *ahead])
        check = step.check(host)
        if check.done and previous is not None and previous.outcome in (Outcome.OK, Outcome.CHANGED):
            # Finished before the interruption, and check confirms it still holds: keep what it did.
            return previous.outcome, f"(done before resume) {previous.message}", {**previous.facts, **(check.facts or {})}
        if check.done:
            return Outcome.OK, check.message, check.facts or {}
        if self.check_only:
            return Outcome.CHANGED, check.message, {}
        with self._lock:
            self.touched.add(host.name)
        applying()
        try:
            message = step.apply(host)
        finally:
            self.facts.forget(host.name)  # nothing read before the apply is trusted after it ...
            host.keep_reported()  # ... but what the apply read after its change is
        host.prefetch(step.probes())
        verified = step.verify(host)
        if not verified.done:
            raise StepFailed(f"applied, but verify failed: {verified.message}")
        return Outcome.CHANGED, message, verified.facts or {}

    def _record(self, result: HostResult) -> HostResult:
        self._record_quietly(result)
        for listener in self.listeners:
            self._hear(listener, "host_finished", result)
        return result

    def _record_quietly(self, result: HostResult) -> HostResult:
        with self._lock:
            self._results.append(result)
        return result

    def _command_done(self, host: str, result: CommandResult) -> None:
        """Told as each command completes, from the host's worker, without waiting for the other listeners'
        events (a journal write): listeners take each host's commands from one thread at a time."""
        self._each("command_done", host, result)


NOT_JSON = "<not JSON: "  # the start of what a value that was not JSON is journaled as (see as_json)


def as_json(value: dict[str, Any], where: str) -> tuple[dict[str, Any], list[str]]:
    """`value` as JSON can hold it, and where it could not: each such place (`remembered['started'] is a datetime`)
    is named, and its value replaced by a mark (`<not JSON: datetime>`, see `not_json_in`). Tuples become lists."""
    problems: list[str] = []

    def walk(item: Any, path: str) -> Any:
        if item is None or isinstance(item, str | bool | int):
            return item
        if isinstance(item, float) and math.isfinite(item):
            return item
        if isinstance(item, dict):
            kept = {}
            for key, inner in item.items():
                if not isinstance(key, str):
                    problems.append(f"{path} has a key {key!r} ({type(key).__name__}, not a string)")
                    continue
                kept[key] = walk(inner, f"{path}[{key!r}]")
            return kept
        if isinstance(item, list | tuple):
            return [walk(inner, f"{path}[{index}]") for index, inner in enumerate(item)]
        problems.append(f"{path} is {item!r}" if isinstance(item, float) else f"{path} is a {type(item).__name__}")
        return f"{NOT_JSON}{type(item).__name__}>"

    return walk(value, where), problems


def not_json_in(value: Any) -> list[str]:
    """The marks of values that were not JSON (see `as_json`) in a journaled value: what an undo cannot read back."""
    if isinstance(value, str):
        return [value] if value.startswith(NOT_JSON) else []
    if isinstance(value, dict):
        return [found for item in value.values() for found in not_json_in(item)]
    if isinstance(value, list):
        return [found for item in value for found in not_json_in(item)]
    return []


def bounded_map(pool: ThreadPoolExecutor, work: Callable[[T], R], items: list[T], width: int) -> list[R]:
    """`work(item)` for each of `items` on `pool`, at most `width` at once; the results in the items' order."""
    slots = threading.Semaphore(max(1, width))

    def held(item: T) -> R:
        try:
            return work(item)
        finally:
            slots.release()

    futures = []
    for item in items:
        slots.acquire()
        futures.append(pool.submit(held, item))
    return [future.result() for future in futures]


def reads_ahead(planned: PlannedStage, later: list[PlannedStage], host: str) -> list[Probe]:
    """What `host`'s later read-only stages will read, to be read with `planned`'s in one command: those of the
    later stages with the same timeout (each stage's reads stay under its own limit). A step whose probes cannot
    be listed is left to read them itself (its own pair reports the error)."""
    probes: list[Probe] = []
    for stage in later:
        if stage.stage.timeout == planned.stage.timeout:
            try:
                probes += stage.step(stage.params[host]).probes()
            except Exception:
                continue
    return probes


class _InStageOrder:
    """Listeners of a host-by-host run hear it as a stage-by-stage one: `stage_started` of each stage in order,
    then its hosts' results; results of a later stage wait until every host of the stages before it has one."""

    def __init__(self, listeners: list[Listener], stages: list[PlannedStage], lock: threading.Lock):
        self.listeners, self.stages, self.lock = listeners, stages, lock
        self.position = -1  # the stage listeners are hearing
        self.waiting: dict[int, list[HostResult]] = {planned.index: [] for planned in stages}
        self.heard = Counter[int]()
        with lock:
            self._next()

    def finished(self, result: HostResult) -> None:
        with self.lock:
            if result.stage_index == self.stages[self.position].index:
                self._tell(result)
            else:
                self.waiting[result.stage_index].append(result)
            while self.position + 1 < len(self.stages) and self._complete():
                self._next()

    def flush(self, every_stage: bool) -> None:
        """The run is over: what is still waiting is told, stage by stage (an interrupted run: only the stages
        that have results, as a stage-by-stage run never starts the others)."""
        with self.lock:
            while self.position + 1 < len(self.stages):
                self._next(every_stage)

    def _complete(self) -> bool:
        planned = self.stages[self.position]
        return self.heard[planned.index] >= len(planned.params)

    def _next(self, announce: bool = True) -> None:
        self.position += 1
        planned = self.stages[self.position]
        waiting = self.waiting.pop(planned.index)
        if not waiting and not announce:
            return
        for listener in self.listeners:
            listener.stage_started(planned, planned.hosts)
        for result in waiting:
            self._tell(result)

    def _tell(self, result: HostResult) -> None:
        self.heard[result.stage_index] += 1
        for listener in self.listeners:
            listener.host_finished(result)
