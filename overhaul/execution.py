"""One run of a plan, made durable: the environment lock, the journal, captured output, Ctrl-C, resume.

Order of a mutating run: take the environment's lock (or refuse, naming its holder); refuse if an
earlier run of the environment is unfinished (resume or abandon it first); journal the run; pass the
gate (every preflight on every host, then the reviewed plan and the operator's yes where asked), or
end `refused` having changed nothing; run the plan, journaling every (stage, host) as it starts and
as it ends; mark the run succeeded, failed or interrupted; release the lock. A Ctrl-C or SIGTERM
lets running commands finish (up to a grace period), leaves the journal consistent and says how to
resume.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from overhaul.alerts import RunInfo, RunNotifier
from overhaul.config import MAX_BYTES
from overhaul.errors import FAILED_EXIT, INTERRUPTED_EXIT, REFUSED_EXIT, Refused
from overhaul.files import append_private, private_dir, read_regular
from overhaul.plan import Plan, PlannedStage
from overhaul.planfile import SecretParam, by_reference
from overhaul.preflight import print_report, run_preflight
from overhaul.report import console_report, describe_changes, summary
from overhaul.runner import HostResult, Runner, RunResult
from overhaul.settings import open_state, outputs_dir
from overhaul.state import CommandRecord, LockInfo, LockLost, ResultRecord, RunRecord, State, StateError
from overhaul.state.records import EXCLUDED_EVENT, LIMIT_EVENT
from overhaul.state.sql import machine_identity
from overhaul.step import Outcome
from overhaul.transport import CommandResult, Transport

if TYPE_CHECKING:
    from overhaul.planfile import SavedPlan

SOURCE_HOSTS = "source-hosts"  # journal event: the hosts an inventory source found for a run
LIMIT = LIMIT_EVENT  # journal event: the run was kept to some hosts (--limit)
UNDO = "undo"  # journal event: the run is being taken back (`overhaul undo`): a resume continues the undo


@dataclass
class Gate:
    """What must hold before a run's first change, besides every stage's preflight on every host."""

    skip_unreachable: bool = False  # leave unreachable hosts out of the run instead of refusing it
    reviewed: SavedPlan | None = None  # `apply`: the plan that was reviewed; any drift from it refuses
    approve: Callable[[str], bool] | None = None  # shown what would change, says yes (a protected environment)


def operator() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + os.urandom(3).hex()


def file_sha256(path: Path) -> str:
    """The SHA-256 of a runbook or inventory file (a regular file within the size cap: a saved plan may name any
    path, /dev/zero included)."""
    return hashlib.sha256(read_regular(path, MAX_BYTES, "an inventory or runbook")).hexdigest()


class JournalRecorder:
    """A runner listener that journals each (stage, host) when it starts and when it ends.

    The controller's own disk can fail (full, read-only): then the run must not go on unrecorded. The
    first failed write stops the run (no new pair starts; it ends interrupted, resumable) and is kept
    in `error` to be told.

    A pair that changes nothing in a run that changes nothing (unfenced: a verify) is journaled once, when it
    ends, and its end waits to be written with others in one transaction (`BATCH` ends, or those of the last
    `BATCH_AGE` seconds, or at `flush`): each transaction is a disk sync that every worker would otherwise wait
    for in turn (4 ms each here: at 1,000 hosts, half of every worker's time).
    """

    BATCH = 100
    BATCH_AGE = 1.0  # seconds

    def __init__(self, state: State, run_id: str, outputs: Path, fence: LockInfo | None = None):
        self.state = state
        self.run_id = run_id
        self.outputs = outputs
        with suppress(OSError):  # (if it cannot be made, the first log written says so, and stops the run)
            private_dir(outputs.parent, tighten_existing=True)  # the runs' logs: the operator's only
            private_dir(outputs)
        self.fence = fence  # a mutating run's lease: each pair starts, and ends, only while it still holds
        # The fence each write carries (none unfenced: a State of an older signature still journals a verify).
        self.fenced = {"fence": (fence.environment, fence.token)} if fence is not None else {}
        self.machine = machine_identity()
        self._commands: dict[tuple[int, str], list[CommandRecord]] = {}  # per pair, journaled with its end
        self._pair: dict[str, int] = {}  # host -> the stage it runs now (a host-by-host run may tell a pair's
        # end after the host's next pair began)
        self._ends_only: set[int] = set()  # stages whose pairs are journaled once, when they end (see above)
        self._waiting: list[tuple[ResultRecord, list[CommandRecord]]] = []  # their ends, not yet written
        self._waiting_since = 0.0
        self.error = ""
        self.lease_lost = False
        self.on_error: Callable[[], None] = lambda: None

    def _ends_only_for(self, planned: PlannedStage) -> bool:
        """Whether `planned`'s pairs are journaled once, when they end: nothing of them to resume or undo."""
        return planned.step.read_only and self.fence is None

    def stage_started(self, planned: PlannedStage, hosts: list[str]) -> None:
        if self._ends_only_for(planned):
            self._ends_only.add(planned.index)

    def host_started(self, planned: PlannedStage, host: str) -> bool:
        """Journal the pair's start (unless it is journaled only when it ends); False (the pair must not run)
        when it could not be journaled."""
        self._pair[host] = planned.index
        if self._ends_only_for(planned):  # (host by host, a pair may start before its stage is announced)
            if self._due():
                self.flush()  # (ends wait at most about BATCH_AGE, even while few pairs end)
            return not self.error
        self.flush()  # (the journal keeps the order things happened in)
        started = ResultRecord(self.run_id, planned.index, planned.stage.name, host, "running", started=time.time())
        if self.fence is None:
            return self._safely("the journal", lambda: self.state.record(started))
        fence = self.fence
        return self._safely("the journal", lambda: self.state.start_pair(started, fence.environment, fence.token))

    def command_done(self, host: str, result: CommandResult) -> None:
        self._commands.setdefault((self._pair.get(host, -1), host), []).append(CommandRecord(
            self.run_id, -1, host, time.time() - result.duration, result.command, result.exited, result.duration,
            "", self.machine))

    def host_finished(self, result: HostResult) -> None:
        path = self.outputs / f"{result.stage_index:02d}-{result.host}.log"  # its commands: written as they ran
        if result.traceback:
            self._safely(f"the run log {path}", lambda: _append_traceback(path, result))
        now = time.time()
        commands = [replace(command, stage_index=result.stage_index, log_path=str(path))
                    for command in self._commands.pop((result.stage_index, result.host), [])]
        ended = ResultRecord(self.run_id, result.stage_index, result.stage, result.host, result.outcome.value,
                             result.attempts, now - result.duration, now, result.message,
                             str(path) if path.exists() else "", result.facts)
        if result.stage_index not in self._ends_only:
            self.flush()
            self._safely("the journal", lambda: self.state.record(ended, commands, **self.fenced))
            return
        if not self._waiting:
            self._waiting_since = time.monotonic()
        self._waiting.append((ended, commands))
        if self._due():
            self.flush()

    def _due(self) -> bool:
        """Whether the waiting ends are to be written now: BATCH of them, or the oldest BATCH_AGE old."""
        return bool(self._waiting) and (len(self._waiting) >= self.BATCH
                                        or time.monotonic() - self._waiting_since >= self.BATCH_AGE)

    def flush(self) -> None:
        """Write the ends still waiting (see the class); the run calls it when it ends. Ends that could not be
        written stay waiting (the next flush tries them again) and stop the run, as any failed journal write."""
        waiting = self._waiting
        if waiting and self._safely("the journal", lambda: self.state.record_ends(waiting, **self.fenced)):
            self._waiting = []

    def report(self, problem: str) -> None:
        """A write of the run's own failed (a host log): stop the run as for a journal write."""
        if not self.error:
            self.error = problem
            self.on_error()

    def _safely(self, what: str, write: Callable[[], object]) -> bool:
        try:
            write()
            return True
        except LockLost as exc:
            self.lease_lost = True
            self.report(str(exc))
        except (StateError, OSError) as exc:
            self.report(f"cannot write {what}: {exc}")
        return False


def _append_traceback(path: Path, result: HostResult) -> None:
    append_private(path, f"! {result.message}\n{result.traceback}")


class LockKeeper:
    """Holds an environment's lease and renews it from a background thread (every sixth of the lease).

    `lost` is set once the lease is known to be someone else's: the run then starts no further pair
    (the journal's fence refuses them anyway) and leaves the run's status to its new holder.
    """

    def __init__(self, state: State, environment: str, run_id: str):
        self.state, self.environment, self.run_id = state, environment, run_id
        self.interval = max(getattr(state, "lease", 60.0) / 6, 0.2)
        self.lease: LockInfo | None = None
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self.on_lost: Callable[[], None] | None = None

    def __enter__(self) -> LockKeeper:
        self.lease, previous = self.state.acquire(self.environment, self.run_id, operator())
        if previous is not None:
            why = "its lease had expired" if not previous.live else "that process is gone"
            print(f"warning: took over the lock of {previous.holder} (pid {previous.pid}, run "
                  f"{previous.run_id}): {why}", file=sys.stderr)
            self.state.event(self.environment, "lock-takeover", f"{operator()} took over the lock of {previous.holder} "
                             f"(pid {previous.pid}, run {previous.run_id}): {why}", self.run_id)
        self._thread.start()
        return self

    @property
    def fence(self) -> tuple[str, str] | None:
        """(environment, token): what the run's journal writes carry, so that none is made once the lease is lost."""
        return (self.lease.environment, self.lease.token) if self.lease is not None else None

    def _beat(self) -> None:
        assert self.lease is not None
        while not self._done.wait(self.interval):
            try:
                ours = self.state.heartbeat(self.lease)
            except StateError as exc:  # keep beating: an unreachable journal is not a lost lease
                print(f"warning: lock heartbeat failed: {exc}", file=sys.stderr)
                continue
            if not ours:
                self.lost.set()
                print(f"error: the lock of {self.environment!r} was taken from this run (its lease expired, or "
                      "unlock --force): stopping after the running steps", file=sys.stderr, flush=True)
                if self.on_lost is not None:
                    self.on_lost()
                return

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        if self.lease is None or self.lost.is_set():
            return
        try:
            self.state.release(self.lease)
        except StateError as error:  # the next run takes the lock over: this process will be gone
            print(f"warning: the lock of {self.environment!r} could not be released ({error}); the next run "
                  "takes it over once this process has ended", file=sys.stderr)


@contextmanager
def graceful_stop(runner: Runner, transport: Transport, grace: float) -> Iterator[None]:
    """Ctrl-C / SIGTERM: start nothing new; after `grace` seconds (or a second signal) cut the connections."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in signals}
    timer: list[threading.Timer] = []

    def handler(signum: int, frame: object) -> None:
        if runner._stopping.is_set():
            transport.cut()
            return
        print(f"\nstopping: no new step starts; running commands get {grace:g} s to finish "
              "(signal again to cut them now)", file=sys.stderr, flush=True)
        runner.request_stop()
        timer.append(threading.Timer(grace, transport.cut))
        timer[0].daemon = True
        timer[0].start()

    for sig in signals:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        for t in timer:
            t.cancel()


def run_plan(
    plan: Plan,
    *,
    mutating: bool = True,
    check_only: bool = False,
    confirm: Callable[[PlannedStage], bool] | None = None,
    resume: RunRecord | None = None,
    state: State | None = None,
    stream: TextIO = sys.stdout,
    grace: float = 30.0,
    show_summary: bool = True,
    gate: Gate | None = None,
    verbosity: int = 0,
    undo_only: bool = False,
    version_from: str | None = None,
    transport: Transport | None = None,
) -> RunResult:
    """Run (or only check) a plan with a live report and a summary; see `exit_code` for what it means.

    `transport`: the caller's connections, which the caller closes (verify shares them with its checks).

    `undo_only` (with `resume`): take back what the journaled run changed instead of going on with it.
    `version_from`: the version the environment runs now, as far as the journal knows (for notifications).

    A mutating run, and a check-only one (a plan), pass the gate first; only a read-only run (verify)
    goes without it.
    """
    gate = gate or Gate()
    if check_only:
        return _execute(plan, None, None, check_only=True, confirm=confirm, stream=stream, grace=grace,
                        show_summary=show_summary, gate=gate, verbosity=verbosity)
    state = state or open_state()
    environment = plan.inventory.environment
    run_id = resume.id if resume else new_run_id()
    notifier = RunNotifier.for_inventory(plan.inventory, redactor=plan.redactor,  # a bad webhook secret: exit 2, now
                                         on_problem=lambda problem: state.event(environment, "notify", problem, run_id))
    version = plan.run_params.get("version")
    notify = (notifier, RunInfo(environment, plan.runbook.runbook.name, run_id, resume.operator if resume else operator(),
                                version_from=version_from, version_to=str(version) if version else None,
                                limit=plan.limit or None))
    if not mutating:
        return _execute(plan, state, _journal_new_run(state, plan, run_id, mutating=False), confirm=confirm,
                        stream=stream, grace=grace, show_summary=show_summary, verbosity=verbosity, notify=notify,
                        transport=transport)
    with ExitStack() as held:
        try:
            keeper = held.enter_context(LockKeeper(state, environment, run_id))
            record = _journal_start(state, plan, run_id, resume, undo_only, keeper.fence)
        except Refused as refusal:  # the lock is held, or an unfinished run is in the way: nothing started
            notifier.ended(notify[1], "refused", 0.0, reasons=[str(refusal)])
            raise
        return _execute(plan, state, record, confirm=confirm, stream=stream, grace=grace, resumed=resume is not None,
                        show_summary=show_summary, keeper=keeper, gate=gate, verbosity=verbosity, notify=notify,
                        undo_only=undo_only)


def _journal_start(state: State, plan: Plan, run_id: str, resume: RunRecord | None, undo_only: bool,
                   fence: tuple[str, str] | None = None) -> RunRecord:
    """Under the lock: journal the run's start, or its resumption (refused while another run is unfinished)."""
    environment = plan.inventory.environment
    if resume is not None:
        state.set_status(run_id, "running", fence=fence)
        doing = UNDO if undo_only else "resume"
        state.event(environment, doing, f"{operator()} {'undid' if undo_only else 'resumed'} the run", run_id)
        return resume
    unfinished = [run for run in state.unfinished(environment) if run.id != run_id]
    if unfinished:
        raise Refused(
            f"run {unfinished[0].id} ({unfinished[0].runbook}) of {environment!r} is unfinished "
            f"({unfinished[0].status}): resume it with `overhaul resume --env {environment}` or abandon it "
            f"with `overhaul abandon --run {unfinished[0].id}`"
        )
    return _journal_new_run(state, plan, run_id)


def _journal_new_run(state: State, plan: Plan, run_id: str, mutating: bool = True) -> RunRecord:
    # A --param equal to an inventory secret is journaled by the secret's name ({"secret": NAME}, read again by
    # resume and undo), and redacted from everything the run prints; any other is redacted in its values.
    params = {name: value.model_dump() if isinstance(value, SecretParam) else value
              for name, value in by_reference(plan.run_params, plan.inventory, plan.redactor).items()}
    record = RunRecord(
        id=run_id, runbook=plan.runbook.runbook.name, runbook_path=str(plan.runbook.path.resolve()),
        runbook_sha256=file_sha256(plan.runbook.path), environment=plan.inventory.environment,
        params=plan.redactor.walk(json.loads(json.dumps(params))),  # in values, never in JSON text
        operator=operator(), started=time.time(),
        mutating=mutating,
    )
    state.start_run(record)
    if plan.limit:
        state.event(record.environment, LIMIT, plan.limit, run_id)
    if plan.inventory.source is not None:  # what the source found now is what a resume works on
        found = [host.model_dump(mode="json") for host in plan.inventory.found]
        state.event(record.environment, SOURCE_HOSTS, json.dumps(found), run_id)
    return record


def recorded_hosts(state: State, record: RunRecord) -> list[dict] | None:
    """The hosts an inventory source found when the run started (None: the inventory has no source)."""
    found = state.run_event(record.id, SOURCE_HOSTS)
    return json.loads(found) if found is not None else None


def _execute(plan: Plan, state: State | None, record: RunRecord | None, *, check_only: bool = False,
             confirm: Callable[[PlannedStage], bool] | None, stream: TextIO, grace: float,
             resumed: bool = False, show_summary: bool = True, keeper: LockKeeper | None = None,
             gate: Gate | None = None, verbosity: int = 0, notify: tuple[RunNotifier, RunInfo] | None = None,
             undo_only: bool = False, transport: Transport | None = None) -> RunResult:
    owned = transport is None
    transport = Transport(plan.inventory, plan.redactor) if transport is None else transport
    console = console_report(stream, check_only, verbosity)
    listeners: list = [console]
    previous: dict[tuple[int, str], HostResult] = {}
    recorder = None
    started = time.monotonic()
    if state is not None and record is not None:
        recorder = JournalRecorder(state, record.id, outputs_dir() / record.id, keeper.lease if keeper else None)
        listeners.append(recorder)
        version = f", version {plan.run_params['version']}" if plan.run_params.get("version") else ""
        version += f", limited to {plan.limit}" if plan.limit else ""
        print(f"run {record.id}: {record.runbook} on {record.environment}{version}, {len(plan.hosts)} hosts, "
              f"logs in {recorder.outputs}", file=stream, flush=True)
        if notify is not None:
            notify[0].started(notify[1])
        if resumed:
            previous = journaled_results(state, record.id)
        if resumed and not undo_only:
            print(f"resuming run {record.id}: {sum(1 for r in previous.values() if r.outcome in (Outcome.OK, Outcome.CHANGED))} "
                  "(stage, host) pairs were done; each is skipped once its check confirms it still holds", file=stream)
    runner = Runner(plan, transport, check_only=check_only, confirm=confirm, listeners=listeners,
                    run_id=record.id if record else None, previous=previous,
                    log_dir=recorder.outputs if recorder else None, on_log_error=recorder.report if recorder else None)
    if keeper is not None:
        keeper.on_lost = runner.request_stop  # someone took the lock: start nothing more
    if recorder is not None:
        recorder.on_error = runner.request_stop  # the controller cannot record: start nothing more
    result: RunResult | None = None
    stages = list(plan.stages)  # for the summary: the run's own, then those of its undo if any
    undoing = [undo_only]  # an undo began taking the run back: its own lines say the way on
    try:
        with graceful_stop(runner, transport, grace):
            if undo_only:
                result = _undo(runner, RunResult([]), previous, stages, stream)
            elif gate is None:
                if not runner.host_by_host and not transport.parks(plan.hosts):
                    # Every host's connection opened at once in parallel; one that fails now is retried (and
                    # reported) by its first stage. (Host by host, or on a farm larger than the pool, each
                    # worker connects to its host when it takes it.)
                    transport.connect(plan.hosts)
                result = runner.run()
            else:
                def undo_started() -> None:  # from then on, the way on is the undo, not a resume
                    undoing[0] = True
                    if state is not None and record is not None:
                        state.event(record.environment, UNDO, "the run failed: on_failure undo", record.id)

                result = _after_failure(runner, _gated(runner, transport, gate, stream), previous, stages, stream,
                                        undo_started)
    finally:
        console.close()
        if recorder is not None:
            recorder.flush()
            if recorder.error and result is not None:
                result.interrupted = True  # its last ends could not be journaled: as any failed journal write
        if owned:
            transport.close()
        lease_lost = (keeper is not None and keeper.lost.is_set()) or (recorder is not None and recorder.lease_lost)
        if not lease_lost and state is not None and record is not None:
            if result is not None:
                result.partial = _left_out_half_done(state, record, result)
            try:
                _journal_end(state, record, result, resumed, keeper.fence if keeper is not None else None)
            except LockLost:  # taken over since the last pair: the run's end is its new holder's to write
                lease_lost = True
            except StateError as exc:
                print(f"error: cannot write the run's end to the journal: {exc}", file=sys.stderr)
        if lease_lost:
            if result is not None:
                result.lease_lost = result.interrupted = True
            print("error: this run lost its lease on the environment (another controller took it over): it started "
                  "nothing more and wrote nothing more of the run; the run's status is the lease's new holder's",
                  file=sys.stderr, flush=True)
        if notify is not None and not lease_lost:
            failed = [r for r in (result.results if result else []) if r.outcome is Outcome.FAILED]
            notify[0].ended(notify[1], run_status(result), time.monotonic() - started, failed_hosts=[r.host for r in failed],
                            failed_pairs=len(failed), reasons=_reasons(result))
    if recorder is not None and recorder.error and not lease_lost:
        print(f"error: {recorder.error}: the run stopped after the running steps (no step ran unrecorded); "
              f"fix the controller's disk, then: overhaul resume --env {plan.inventory.environment}",
              file=sys.stderr, flush=True)
    if result.refused:
        print(f"refused before any change ({len(result.refused)} problem{'s' if len(result.refused) != 1 else ''}): "
              "nothing was changed on any host", file=stream)
        return result
    result.run_id = record.id if record is not None else ""
    if show_summary:
        print(summary(result, stages), file=stream)
    environment = plan.inventory.environment
    if record is not None and lease_lost:
        print(f"run {record.id}: this controller lost its lease after {time.monotonic() - started:.1f} s and wrote "
              f"nothing more; see the run as its new holder leaves it: overhaul show {record.id}", file=stream)
        return result
    if record is not None:
        counts = {outcome: sum(r.outcome is outcome for r in result.results) for outcome in Outcome}
        status = run_status(result)
        print(f"run {record.id} {status} in {time.monotonic() - started:.1f} s: "
              + ", ".join(f"{count} {outcome.value}" for outcome, count in counts.items())
              + f"; details: overhaul show {record.id}", file=stream)
    if result.interrupted:
        print(f"resume with: overhaul resume --env {environment}", file=stream)
    elif result.rolled_back:
        print("rolled back: every change this run made was taken back; the farm is as the run found it", file=stream)
    elif result.failed and record is not None and record.mutating:
        left = {} if undoing[0] else left_part_way(plan, previous, result.results)
        if left:
            from overhaul.history import rollback_way

            way = rollback_way(state, record.environment, record) if state is not None else None
            print(ways_on(plan, record.id, left, [*previous.values(), *result.results], way), file=stream)
        else:
            print(f"after repairing the cause, continue with: overhaul resume --env {environment} "
                  f"(or give the run up: overhaul abandon --run {record.id})", file=stream)
    if result.partial and not result.interrupted:
        print(f"left half-done: {', '.join(result.partial)}: excluded from this run as unreachable, after an earlier "
              f"attempt of it had changed {'it' if len(result.partial) == 1 else 'them'}", file=stream)
        print(f"once {'it answers' if len(result.partial) == 1 else 'they answer'}, finish the run with: "
              f"overhaul resume --env {environment}", file=stream)
    return result


def _reasons(result: RunResult | None) -> list[str] | None:
    """What the end's notification says besides the failed hosts: why it was refused, or the hosts left half-done."""
    if result is None:
        return None
    return result.refused or [f"not finished on {host}: left out as unreachable after the run had changed it"
                              for host in result.partial]


def _left_out_half_done(state: State, record: RunRecord, result: RunResult) -> list[str]:
    """The hosts the preflight left out (unreachable, --skip-unreachable) on which this run had journaled a pair that
    changed, failed or was running (in an earlier attempt): the run has unfinished work there, it is not a success."""
    excluded = result.preflight.excluded if result.preflight is not None else {}
    if not excluded or result.refused:
        return []
    try:
        touched = {r.host for r in state.results(record.id) if r.outcome in ("changed", "failed", "running")}
    except StateError:
        return list(excluded)  # not known: not called a success (partial is resumable)
    return [host for host in excluded if host in touched]


def left_part_way(plan: Plan, previous: dict[tuple[int, str], HostResult],
                  results: list[HostResult]) -> dict[str, tuple[list[str], list[str]]]:
    """The hosts a failed run changed and did not finish: host -> (the stages that changed it, the later stages
    it did not finish there), in inventory order.

    The rule: a pair of the host ended `changed`, and a later stage of the runbook that targets the host did not
    finish there: it changes hosts and did not end ok or changed (it failed, or never ran), or it failed (an
    assertion that found the host not back). Whatever the run stopped on such a host (services, say) may still be
    stopped. Pairs of earlier attempts count (a resumed run); read-only stages that never ran do not (they change
    nothing).
    """
    last = dict(previous)
    for result in results:  # this attempt's outcome, where it ran the pair
        if result.outcome is not Outcome.SKIPPED or (result.stage_index, result.host) not in last:
            last[(result.stage_index, result.host)] = result

    def outcome(planned: PlannedStage, host: str) -> Outcome | None:
        pair = last.get((planned.index, host))
        return pair.outcome if pair is not None else None

    changed = {(r.stage_index, r.host) for r in [*previous.values(), *results] if r.outcome is Outcome.CHANGED}
    left: dict[str, tuple[list[str], list[str]]] = {}
    for host in plan.hosts:
        by = [planned for planned in plan.stages if (planned.index, host) in changed]
        if not by:
            continue
        undone = [planned for planned in plan.stages if planned.index > by[0].index and host in planned.hosts
                  and (outcome(planned, host) is Outcome.FAILED or (
                      not planned.step.read_only and outcome(planned, host) not in (Outcome.OK, Outcome.CHANGED)))]
        if undone:
            left[host] = ([planned.stage.name for planned in by],
                          [planned.stage.name + (" (failed)" if outcome(planned, host) is Outcome.FAILED else "")
                           for planned in undone])
    return left


def ways_on(plan: Plan, run_id: str, left: dict[str, tuple[list[str], list[str]]], results: list[HostResult],
            rollback: str | None) -> str:
    """The last lines of a failed run that left hosts part-way: which, why, and each way on that applies to it."""
    from overhaul.undo import undo_plan

    environment = plan.inventory.environment
    lines = [f"left part-way by this run (what it stopped there may still be down): {', '.join(left)}"]
    for host, (by, undone) in left.items():
        more = f" and {len(undone) - 3} more" if len(undone) > 3 else ""
        lines.append(f"  {host}: changed by {', '.join(by)}; not done: {', '.join(undone[:3])}{more}")
    lines.append(f"the ways on (run {run_id}):")
    lines.append(f"  repair the cause, then finish the run: overhaul resume --env {environment}")
    position = {host: n for n, host in enumerate(plan.hosts)}  # (hosts named in inventory order)
    blocked = undo_plan(plan, sorted(results, key=lambda r: (r.stage_index, position.get(r.host, 0)))).blocked
    if blocked:
        lines.append(f"  (not `overhaul undo`: {'; '.join(blocked)})")
    else:
        lines.append(f"  or take back every change it made: overhaul undo --run {run_id}")
    if rollback:  # (only a command that takes back this very run: never an older upgrade's backup)
        lines.append(f"  or go back to the version and data from before the upgrade (its backup): {rollback}")
    return "\n".join(lines)


def _gated(runner: Runner, transport: Transport, gate: Gate, stream: TextIO) -> RunResult:
    """Preflight every stage on every host, then the reviewed plan and the yes; run only if all hold."""
    plan = runner.plan
    report = run_preflight(plan, transport, runner.run_id, skip_unreachable=gate.skip_unreachable, facts=runner.facts)
    print_report(report, stream)
    refusals = report.refusals
    if not refusals and report.excluded:
        runner.plan = plan.without(set(report.excluded))
        left_out = ", ".join(report.excluded)
        refusals = [f"stage {p.index + 1} {p.stage.name}: no host left without {left_out}"
                    for p, before in zip(runner.plan.stages, plan.stages, strict=True) if before.hosts and not p.hosts]
    if not refusals and (gate.reviewed is not None or gate.approve is not None):
        preview = Runner(runner.plan, transport, check_only=True, run_id=runner.run_id, facts=runner.facts).run()
        if gate.reviewed is not None:
            from overhaul.planfile import drift

            refusals = [f"drift: {line}" for line in drift(gate.reviewed, runner.plan, preview)]
            for line in refusals:
                print(f"refused: {line}", file=stream)
        if not refusals and gate.approve is not None and not gate.approve(describe_changes(preview, runner.plan.stages)):
            refusals = ["not confirmed"]
        for host in runner.plan.hosts:  # time passed (a review, a question): the run reads every host afresh
            runner.facts.forget(host)
    if runner._stopping.is_set():
        return RunResult([], interrupted=True, refused=["interrupted before any change"], preflight=report)
    if refusals:
        refusals = [transport.redactor(line) for line in refusals]  # a step's error text may hold a secret
        return RunResult([], check_only=runner.check_only, refused=refusals, preflight=report)
    result = runner.run()
    result.preflight = report
    return result


def _after_failure(runner: Runner, result: RunResult, previous: dict[tuple[int, str], HostResult],
                   stages: list[PlannedStage], stream: TextIO, undo_started: Callable[[], object]) -> RunResult:
    """A run that failed (not interrupted, not refused): its undo if the runbook says on_failure: undo, then its
    hooks.on_failure."""
    ran = runner.plan
    if not result.failed or result.interrupted or result.refused:
        return result
    if ran.runbook.runbook.on_failure == "undo":
        result = _undo(runner, result, previous, stages, stream, on_start=undo_started)
    if ran.on_failure and not result.interrupted:
        print(f"the run failed: {len(ran.on_failure)} hooks.on_failure stage(s)", file=stream, flush=True)
        result = _then(runner, result, ran.on_failure, stages, previous)
    return result


def _undo(runner: Runner, forward: RunResult, previous: dict[tuple[int, str], HostResult],
          stages: list[PlannedStage], stream: TextIO, on_start: Callable[[], object] = lambda: None) -> RunResult:
    """Take back what a failed run changed, latest stage first (see overhaul.undo); say what it could not.

    `on_start` is told once the undo starts changing hosts (from then on, the way on is the undo, not a resume).
    """
    from overhaul.undo import undo_plan

    done = {(r.stage_index, r.host): r for r in [*previous.values(), *forward.results]}
    undo = undo_plan(runner.plan, list(done.values()))
    if undo.blocked:
        print("not undone (nothing was taken back; a half-undone farm is worse than a stopped one):", file=stream)
        for line in undo.blocked:
            print(f"  {line}", file=stream)
        return forward  # (the run's last lines say the ways on, a rollback among them when there is one)
    print(f"undoing: {len(undo.plan.stages)} stage(s) to take back, latest first", file=stream, flush=True)
    on_start()
    undone = _then(runner, forward, undo.plan.stages, stages, previous)
    indices = {planned.index for planned in undo.plan.stages}
    clean = not undone.interrupted and not any(r.outcome is Outcome.FAILED and r.stage_index in indices
                                               for r in undone.results)
    return replace(undone, rolled_back=clean, stopped_at=forward.stopped_at or (None if clean else "undo"))


def _then(runner: Runner, result: RunResult, more: list[PlannedStage], stages: list[PlannedStage],
          previous: dict[tuple[int, str], HostResult]) -> RunResult:
    """Run `more` stages after `result` on the same runner (journal, connections, Ctrl-C); every result kept."""
    runner.plan, runner.previous = replace(runner.plan, stages=more, on_failure=[]), previous
    stages += more
    after = runner.run()
    return replace(result, results=after.results, interrupted=after.interrupted)


def _journal_end(state: State, record: RunRecord, result: RunResult | None, resumed: bool,
                 fence: tuple[str, str] | None = None) -> None:
    """The run's final status; a refused run also keeps its reasons (a refused resume stays resumable).

    With a `fence` (the run's lease) the status is written only while the lease is still this run's (else LockLost,
    nothing written); its events follow it, so that a run that lost its lease writes none of them either."""
    environment = record.environment
    events = [(EXCLUDED_EVENT, f"{host}: {why}") for host, why in (result.preflight.excluded.items()
                                                              if result is not None and result.preflight else ())]
    if result is not None and result.refused and not result.interrupted:  # Ctrl-C at the gate: interrupted (130)
        if resumed:  # as before this attempt: still resumable
            state.set_status(record.id, record.status, record.ended, fence=fence)
        else:
            state.set_status(record.id, "refused", time.time(), fence=fence)
        events += [("refused", line) for line in result.refused]
    else:
        status = run_status(result)
        state.set_status(record.id, status, None if status == "interrupted" else time.time(), fence=fence)
    for kind, detail in events:
        state.event(environment, kind, detail, record.id)


def run_status(result: RunResult | None) -> str:
    """How a run ended: refused, interrupted, rolled back, failed, partial (a host it had changed was left out as
    unreachable) or succeeded (the journal's status, the notification's event)."""
    if result is not None and result.refused and not result.interrupted:
        return "refused"
    if result is not None and result.rolled_back:
        return "rolled back"
    if result is None or result.interrupted:
        return "interrupted"
    if result.failed:
        return "failed"
    return "partial" if result.partial else "succeeded"


def exit_code(result: RunResult) -> int:
    """0 success, 1 some host failed (or the run stopped, or left a host it had changed half-done), 3 refused before
    any change, 130 interrupted."""
    if result.interrupted:
        return INTERRUPTED_EXIT
    if result.refused:
        return REFUSED_EXIT
    return FAILED_EXIT if result.failed or result.partial else 0


def journaled_results(state: State, run_id: str) -> dict[tuple[int, str], HostResult]:
    return host_results(state.results(run_id))


def host_results(results: list[ResultRecord]) -> dict[tuple[int, str], HostResult]:
    """The journaled pairs that ended, as the runner's results, by (stage index, host)."""
    return {
        (r.stage_index, r.host): HostResult(r.stage, r.host, Outcome(r.outcome), r.message, r.attempts, 0.0, r.facts,
                                            r.stage_index)
        for r in results if r.outcome != "running"
    }
