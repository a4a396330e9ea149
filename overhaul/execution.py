"""One run of a plan, made durable: the environment lock, the journal, captured output, Ctrl-C, resume.

Order of a mutating run: take the environment's lock (or refuse, naming its holder); refuse if an
earlier run of the environment is unfinished (resume or abandon it first); journal the run; pass the
gate (every preflight on every host, then the reviewed plan and the operator's yes where asked), or
end `refused` having changed nothing; run the plan, journaling every (stage, host) as it begins to
change its host and as it ends; mark the run succeeded, failed or interrupted; release the lock. A Ctrl-C or SIGTERM
lets running commands finish (up to a grace period) and leaves the journal consistent.

Nothing here prints: what happens is published as events (overhaul.events), which views subscribe to.
"""

from __future__ import annotations

import getpass
import hashlib
import inspect
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from overhaul.alerts import RunInfo, RunNotifier
from overhaul.config import MAX_BYTES
from overhaul.errors import Refused
from overhaul.events import (
    Asking,
    BatchStarted,
    CommandDone,
    CommandStarted,
    PairFinished,
    PairStarted,
    PreflightChecked,
    PreflightProgress,
    Publisher,
    RunEnded,
    RunStarted,
    StageStarted,
    Subscriber,
    WaysOn,
)
from overhaul.files import append_private, private_dir, read_regular
from overhaul.plan import Plan, PlannedStage
from overhaul.planfile import SecretParam, by_reference
from overhaul.preflight import PreflightReport, run_preflight
from overhaul.runner import HostResult, Runner, RunResult, log_name
from overhaul.settings import open_state, outputs_dir
from overhaul.state import CommandRecord, LockInfo, LockLost, ResultRecord, RunRecord, State, StateError
from overhaul.state.records import EXCLUDED_EVENT, KIND_EVENT, LIMIT_EVENT
from overhaul.state.sql import machine_identity
from overhaul.step import Outcome
from overhaul.transport import CommandResult, Transport

if TYPE_CHECKING:
    from overhaul.planfile import SavedPlan

SOURCE_HOSTS = "source-hosts"  # journal event: the hosts an inventory source found for a run
LOCAL_STEPS = "local-steps"  # journal event: the folders of the operator's own steps a run uses (JSON list)
PREFLIGHT_EVENT = "preflight"  # journal event: the gate's table, {host: {stage number: "ok" or the reason}} (JSON)
LIMIT = LIMIT_EVENT  # journal event: the run was kept to some hosts (--limit)
UNDO = "undo"  # journal event: the run is being taken back (`overhaul undo`): a resume continues the undo
COMPOSED_EVENT = "composed-runbook"  # journal event: the text of a runbook composed in Python (overhaul.api)
COMPOSED = "# Composed in Python (overhaul.api); kept so that `overhaul resume` and `undo` find the run's runbook.\n"


@dataclass
class Gate:
    """What must hold before a run's first change, besides every stage's preflight on every host."""

    skip_unreachable: bool = False  # leave unreachable hosts out of the run instead of refusing it
    reviewed: SavedPlan | None = None  # `apply`: the plan that was reviewed; any drift from it refuses
    # Shown what the run would change (the preview, its stages), says yes (a protected environment).
    approve: Callable[[RunResult, list[PlannedStage]], bool] | None = None


def operator() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + os.urandom(3).hex()


def file_sha256(path: Path) -> str:
    """The SHA-256 of a runbook or inventory file (a regular file within the size cap: a saved plan may name any
    path, /dev/zero included)."""
    return hashlib.sha256(read_regular(path, MAX_BYTES, "an inventory or runbook")).hexdigest()


class JournalRecorder:
    """A runner listener that journals each (stage, host): when its step begins to change the host, and when it ends.

    The controller's own disk can fail (full, read-only): then the run must not go on unrecorded. The
    first failed write stops the run (no new pair starts; it ends interrupted, resumable) and is kept
    in `error` to be told.

    A pair's start is journaled ("running"), and durable, before its step's apply sends its first command: the row
    a resume and an undo go by when the controller died mid-change. A pair whose step changes nothing (its check
    found the work done, or it only reads) needs no such row: a pair cut off before its end is checked again by a
    resume. It is journaled once, when it ends, and its end waits to be written with others in one transaction:
    `BATCH` ends; before the next start, stage or question to the operator; at `flush`; in a run that changes
    nothing, also those of the last `BATCH_AGE` seconds. Each transaction is a disk sync that every worker would
    otherwise wait for in turn (4 ms each here: at 1,000 hosts, half of every worker's time). A pair that began to
    change its host has its end written at once.

    The runner tells it the workers' events at once (`concurrent`), not one at a time: each worker waits only
    until its own pair's row is durable, and the rows of the workers that write at the same time share one
    transaction (the state's group commit).
    """

    BATCH = 100
    BATCH_AGE = 1.0  # seconds
    concurrent = True  # its events may come from several workers at once (see overhaul.runner.Listener)

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
        self._changing: set[tuple[int, str]] = set()  # pairs whose start was journaled: their end is written at once
        self._waiting: list[tuple[ResultRecord, list[CommandRecord]]] = []  # the other pairs' ends, not yet written
        self._waiting_since = 0.0
        self._lock = threading.Lock()  # the fields above and `error`: told from several workers at once
        self._flushing = threading.Lock()  # one flush at a time: the ends waiting are written before the next start
        self.error = ""
        self.lease_lost = False
        self.on_error: Callable[[], None] = lambda: None

    def stage_started(self, planned: PlannedStage, hosts: list[str]) -> None:
        """A stage begins: the ends of the stages before it are written (a crash loses at most one stage's)."""
        self.flush()

    def host_started(self, planned: PlannedStage, host: str) -> bool:
        """The pair starts with its step's check, which changes nothing: journaled when it applies, or when it
        ends. False (the pair must not run) once a write of the run failed."""
        with self._lock:
            self._pair[host] = planned.index
        self._flush(due_only=True)  # (BATCH_AGE: a verify's ends wait about a second at most, even while few end)
        return not self.error

    def host_applying(self, planned: PlannedStage, host: str) -> bool:
        """The pair's step is about to change the host: journal its start, returning once it is durable; False (the
        step must not apply) when it could not be journaled, the lease no longer holds, or a write of the run failed
        (the run is stopping). A read-only step's apply changes nothing (it says why its check failed): not journaled
        before its end. A retry of a change under way goes on whatever happened meanwhile: its start is journaled,
        and its end must be too (with what its undo needs)."""
        with self._lock:
            if (planned.index, host) in self._changing:
                return True
        if planned.step.read_only:
            return not self.error
        self.flush()  # (the journal keeps the order things happened in)
        if self.error:
            return False
        started = ResultRecord(self.run_id, planned.index, planned.stage.name, host, "running", started=time.time())
        if self.fence is None:
            written = self._safely("the journal", lambda: self.state.record(started))
        else:
            fence = self.fence
            written = self._safely("the journal", lambda: self.state.start_pair(started, fence.environment, fence.token))
        if written:
            with self._lock:
                self._changing.add((planned.index, host))
        return written

    def pause(self) -> None:
        """The run asks the operator (a stage to confirm): what ended is journaled before the wait."""
        self.flush()

    def command_done(self, host: str, result: CommandResult) -> None:
        command = CommandRecord(self.run_id, -1, host, time.time() - result.duration, result.command, result.exited,
                                result.duration, "", self.machine)
        with self._lock:
            self._commands.setdefault((self._pair.get(host, -1), host), []).append(command)

    def host_finished(self, result: HostResult) -> None:
        path = self.outputs / log_name(result.stage_index, result.stage, result.host)  # its commands, as they ran
        if result.traceback:
            self._safely(f"the run log {path}", lambda: _append_traceback(path, result))
        now = time.time()
        with self._lock:
            ran = self._commands.pop((result.stage_index, result.host), [])
            changing = (result.stage_index, result.host) in self._changing
            self._changing.discard((result.stage_index, result.host))
        commands = [replace(command, stage_index=result.stage_index, log_path=str(path)) for command in ran]
        ended = ResultRecord(self.run_id, result.stage_index, result.stage, result.host, result.outcome.value,
                             result.attempts, now - result.duration, now, result.message,
                             str(path) if path.exists() else "", result.facts)
        if changing:
            self.flush()
            self._safely("the journal", lambda: self.state.record(ended, commands, **self.fenced))
            return
        with self._lock:
            if not self._waiting:
                self._waiting_since = time.monotonic()
            self._waiting.append((ended, commands))
        self._flush(due_only=True)

    def _due(self) -> bool:
        """Whether the waiting ends are to be written now (under _lock): BATCH of them; in a run that changes nothing
        (unfenced), also the oldest BATCH_AGE old. A run that changes hosts writes them at points its stages decide
        (a start, a stage, a question, its end): the same writes, in the same order, however long its pairs take."""
        if not self._waiting:
            return False
        return len(self._waiting) >= self.BATCH or (self.fence is None
                                                    and time.monotonic() - self._waiting_since >= self.BATCH_AGE)

    def flush(self) -> None:
        """Write the ends still waiting (see the class); the run calls it when it ends. Ends that could not be
        written stay waiting (the next flush tries them again) and stop the run, as any failed journal write."""
        self._flush(due_only=False)

    def _flush(self, due_only: bool) -> None:
        """`flush`; with `due_only`, only if the ends waiting are due (see `_due`). Flushes are one at a time, so a
        start written after a flush (which waits for the one under way) is never committed before those ends."""
        if due_only:
            with self._lock:
                if not self._due():
                    return
        with self._flushing:
            with self._lock:
                if due_only and not self._due():
                    return  # (another worker's flush wrote them)
                waiting, self._waiting = self._waiting, []
            if waiting and not self._safely("the journal", lambda: self.state.record_ends(waiting, **self.fenced)):
                with self._lock:
                    self._waiting[:0] = waiting  # first in line for the next flush

    def report(self, problem: str) -> None:
        """A write of the run's own failed (a host log): stop the run as for a journal write."""
        with self._lock:
            first, self.error = not self.error, self.error or problem
        if first:
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

    def __init__(self, state: State, environment: str, run_id: str,
                 notice: Callable[[str, Literal["info", "warning", "error"]], None] = lambda text, level: None):
        self.state, self.environment, self.run_id, self.notice = state, environment, run_id, notice
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
            self.notice(f"warning: took over the lock of {previous.holder} (pid {previous.pid}, run "
                        f"{previous.run_id}): {why}", "warning")
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
                self.notice(f"warning: lock heartbeat failed: {exc}", "warning")
                continue
            if not ours:
                self.lost.set()
                self.notice(f"error: the lock of {self.environment!r} was taken from this run (its lease expired, or "
                            "unlock --force): stopping after the running steps", "error")
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
            self.notice(f"warning: the lock of {self.environment!r} could not be released ({error}); the next run "
                        "takes it over once this process has ended", "warning")


@contextmanager
def graceful_stop(stop: Callable[[], None], stopping: threading.Event, cut: Callable[[], None], grace: float,
                  notice: Callable[[str, Literal["info", "warning", "error"]], None]) -> Iterator[None]:
    """Ctrl-C / SIGTERM: `stop` (start nothing new); after `grace` seconds (or a second signal) `cut` the
    connections. `stopping` tells whether a stop was asked already."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in signals}
    timer: list[threading.Timer] = []

    def handler(signum: int, frame: object) -> None:
        if stopping.is_set():
            cut()
            return
        # (told from a thread of its own: a subscriber may hold a lock the interrupted main thread holds too)
        threading.Thread(target=notice, args=(f"\nstopping: no new step starts; running commands get {grace:g} s to "
                                              "finish (signal again to cut them now)", "warning"), daemon=True).start()
        stop()
        timer.append(threading.Timer(grace, cut))
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


class Execution:
    """One run of a plan, from its lease to its end: journal, gate, stages, undo, hooks, notifications.

    Made for one run and used once: `preview()` (a plan: every preflight, then each stage's check; nothing
    journaled, nothing changed), `read()` (a read-only run, journaled, without the lease: verify), or `run()` (a
    mutating run; with `resume`, a journaled run goes on, or with `undo` too, is taken back). What happens is
    published as events (overhaul.events) to `subscribers`: nothing here prints. The result says how it ended
    (see `exit_code` and `run_status`).

    `transport`: the caller's connections, which the caller closes (verify shares them with its checks); by
    default the run opens its own and closes them.
    """

    def __init__(self, plan: Plan, *, state: State | None = None, subscribers: Iterable[Subscriber] = (),
                 confirm: Callable[[PlannedStage], bool] | None = None, gate: Gate | None = None,
                 grace: float = 30.0, transport: Transport | None = None):
        self.plan = plan
        self.state = state
        self.publish = Publisher(subscribers)
        self.confirm = confirm
        self.gate = gate or Gate()
        self.grace = grace
        self.transport = transport
        self.record: RunRecord | None = None
        self.keeper: LockKeeper | None = None
        self.recorder: JournalRecorder | None = None
        self.previous: dict[tuple[int, str], HostResult] = {}  # a resumed run's pairs that ended
        self.stages: list[PlannedStage] = list(plan.stages)  # the run's own, then those of its undo and hooks
        self.resumed = False
        self.undoing = False  # it began taking itself back: from then on, the way on is the undo, not a resume
        self.notify: tuple[RunNotifier, RunInfo] | None = None
        self.runner: Runner | None = None  # the running stages' (none yet: a stop asked before is kept for it)
        self._connections: Transport | None = None
        self.stop_asked = threading.Event()

    def stop(self) -> None:
        """Start nothing new (Ctrl-C, SIGTERM, a lost lease, a journal that cannot record): running steps finish."""
        self.stop_asked.set()
        if self.runner is not None:
            self.runner.request_stop()

    def _cut(self) -> None:
        if self._connections is not None:
            self._connections.cut()

    def _signals(self) -> AbstractContextManager[None]:
        """Ctrl-C and SIGTERM handled from before anything is journaled to the end (see `graceful_stop`)."""
        return graceful_stop(self.stop, self.stop_asked, self._cut, self.grace, self.publish.notice)

    def preview(self) -> RunResult:
        """Every preflight on every host, then what each stage would do (`would change`); nothing journaled."""
        with self._signals():
            return self._drive("preview")

    def read(self, version_from: str | None = None) -> RunResult:
        """A run that changes nothing (verify): journaled, without the environment's lease or the gate."""
        state = self._opened()
        run_id = new_run_id()
        self.notify = self._notifier(state, run_id, None, version_from)
        with self._signals():
            self.record = _journal_new_run(state, self.plan, run_id, mutating=False)
            return self._drive("read")

    def run(self, *, resume: RunRecord | None = None, undo: bool = False, version_from: str | None = None) -> RunResult:
        """A mutating run under the environment's lease, journaled, through the gate; `resume` goes on with a
        journaled run (or, with `undo`, takes back what it changed). Refused (raises) when the lease is another
        run's or an earlier run is unfinished; `version_from`: what the environment runs now, for notifications."""
        state = self._opened()
        run_id = resume.id if resume else new_run_id()
        notifier, info = self.notify = self._notifier(state, run_id, resume, version_from)
        self.resumed, self.undoing = resume is not None, undo
        with self._signals(), ExitStack() as held:
            try:
                self.keeper = held.enter_context(LockKeeper(state, self.plan.inventory.environment, run_id,
                                                            self.publish.notice))
                self.record = _journal_start(state, self.plan, run_id, resume, undo, self.keeper.fence)
            except Refused as refusal:  # the lock is held, or an unfinished run is in the way: nothing started
                notifier.ended(info, "refused", 0.0, reasons=[str(refusal)])
                raise
            return self._drive("undo" if undo else "gated")

    def _opened(self) -> State:
        if self.state is None:
            self.state = open_state()
        return self.state

    def _notifier(self, state: State, run_id: str, resume: RunRecord | None,
                  version_from: str | None) -> tuple[RunNotifier, RunInfo]:
        plan, environment = self.plan, self.plan.inventory.environment
        notifier = RunNotifier.for_inventory(plan.inventory, redactor=plan.redactor,  # a bad webhook secret: exit 2, now
                                             on_problem=lambda problem: state.event(environment, "notify", problem, run_id))
        version = plan.run_params.get("version")
        return notifier, RunInfo(environment, plan.runbook.runbook.name, run_id,
                                 resume.operator if resume else operator(), version_from=version_from,
                                 version_to=str(version) if version else None, limit=plan.limit or None)

    def _drive(self, mode: str) -> RunResult:
        """Run the stages (`mode`: preview, read, gated or undo), then journal, notify and publish the end."""
        plan, state, record = self.plan, self.state, self.record
        transport = self.transport or Transport(plan.inventory, plan.redactor)
        started = time.monotonic()
        if state is not None and record is not None:
            self.recorder = JournalRecorder(state, record.id, outputs_dir() / record.id,
                                            self.keeper.lease if self.keeper else None)
            if self.resumed:
                self.previous = journaled_results(state, record.id)
            done = sum(1 for r in self.previous.values() if r.outcome in (Outcome.OK, Outcome.CHANGED))
            version = plan.run_params.get("version")
            self.publish(RunStarted(record.id, record.runbook, record.environment, len(plan.hosts),
                                    self.recorder.outputs, str(version) if version else None, plan.limit,
                                    done if self.resumed else None, self.undoing))
            if self.notify is not None:
                self.notify[0].started(self.notify[1])
        recorder = self.recorder
        runner = Runner(plan, transport, check_only=mode == "preview", confirm=self.confirm,
                        listeners=[*([recorder] if recorder else []), Told(self.publish)],  # journaled, then told
                        run_id=record.id if record else None, previous=self.previous,
                        log_dir=recorder.outputs if recorder else None, on_log_error=recorder.report if recorder else None)
        self.runner, self._connections = runner, transport
        if self.stop_asked.is_set():  # (asked while the run was being journaled)
            runner.request_stop()
        if self.keeper is not None:
            self.keeper.on_lost = self.stop  # someone took the lock: start nothing more
        if recorder is not None:
            recorder.on_error = self.stop  # the controller cannot record: start nothing more
        result: RunResult | None = None
        try:
            result = self._stages(runner, transport, mode)
        finally:
            lease_lost = self._close(result, transport, started)
        return self._end(result, lease_lost, started)

    def _stages(self, runner: Runner, transport: Transport, mode: str) -> RunResult:
        if mode == "undo":
            return self._undo(runner, RunResult([]))
        if mode == "read":
            if not runner.host_by_host and not transport.parks(self.plan.hosts):
                # Every host's connection opened at once in parallel; one that fails now is retried (and
                # reported) by its first stage. (Host by host, or on a farm larger than the pool, each
                # worker connects to its host when it takes it.)
                transport.connect(self.plan.hosts)
            return runner.run()
        return self._after_failure(runner, self._gated(runner, transport))

    def _close(self, result: RunResult | None, transport: Transport, started: float) -> bool:
        """After the stages, whatever happened: the last journal writes, the connections, the run's end in the
        journal, the notification. True when the run lost its lease (it then writes nothing more)."""
        state, record, recorder, keeper = self.state, self.record, self.recorder, self.keeper
        if recorder is not None:
            recorder.flush()
            if recorder.error and result is not None:
                result.interrupted = True  # its last ends could not be journaled: as any failed journal write
        if self.transport is None:
            transport.close()
        lease_lost = (keeper is not None and keeper.lost.is_set()) or (recorder is not None and recorder.lease_lost)
        if not lease_lost and state is not None and record is not None:
            if result is not None:
                result.partial = _left_out_half_done(state, record, result)
            try:
                _journal_end(state, record, result, self.resumed, keeper.fence if keeper is not None else None)
            except LockLost:  # taken over since the last pair: the run's end is its new holder's to write
                lease_lost = True
            except StateError as exc:
                self.publish.notice(f"error: cannot write the run's end to the journal: {exc}", "error")
        if lease_lost:
            if result is not None:
                result.lease_lost = result.interrupted = True
            self.publish.notice("error: this run lost its lease on the environment (another controller took it "
                                "over): it started nothing more and wrote nothing more of the run; the run's status "
                                "is the lease's new holder's", "error")
        if self.notify is not None and not lease_lost:
            failed = [r for r in (result.results if result else []) if r.outcome is Outcome.FAILED]
            self.notify[0].ended(self.notify[1], run_status(result), time.monotonic() - started,
                                 failed_hosts=[r.host for r in failed], failed_pairs=len(failed),
                                 reasons=_reasons(result))
        return lease_lost

    def _end(self, result: RunResult | None, lease_lost: bool, started: float) -> RunResult:
        assert result is not None  # (an exception from the stages went up through _close)
        record = self.record
        result.run_id = record.id if record is not None else ""
        ways = None
        if (record is not None and record.mutating and result.failed and not result.interrupted
                and not result.rolled_back and not result.refused and not lease_lost):
            ways = self._ways_on(record, result)
        self.publish(RunEnded(result, run_status(result), time.monotonic() - started, self.plan.inventory.environment,
                              self.stages, record, ways, self.recorder.error if self.recorder else "", self.undoing))
        return result

    def _ways_on(self, record: RunRecord, result: RunResult) -> WaysOn:
        """What a failed run left part-way, and the ways on that apply (none: resume or abandon)."""
        from overhaul.undo import undo_plan

        left = {} if self.undoing else left_part_way(self.plan, self.previous, result.results)
        if not left:
            return WaysOn({})
        from overhaul.history import rollback_way

        position = {host: n for n, host in enumerate(self.plan.hosts)}  # (hosts named in inventory order)
        done = sorted([*self.previous.values(), *result.results], key=lambda r: (r.stage_index, position.get(r.host, 0)))
        rollback = rollback_way(self.state, record.environment, record) if self.state is not None else None
        return WaysOn(left, undo_plan(self.plan, done).blocked, rollback)

    def _gated(self, runner: Runner, transport: Transport) -> RunResult:
        """Preflight every stage on every host, then the reviewed plan and the yes; run only if all hold."""
        plan, gate = runner.plan, self.gate
        if runner._stopping.is_set():  # stopped before the gate: nothing read, nothing changed
            return RunResult([], interrupted=True, refused=["interrupted before any change"])
        report = run_preflight(plan, transport, runner.run_id, skip_unreachable=gate.skip_unreachable,
                               facts=runner.facts, progress=lambda checked, total: self.publish(
                                   PreflightProgress(checked, total)))
        self.publish(PreflightChecked(report))
        if self.state is not None and self.record is not None:  # the run's page shows the table too
            self.state.event(self.record.environment, PREFLIGHT_EVENT, transport.redactor(preflight_table(report)),
                             self.record.id)  # (a step's reason may hold a secret)
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
                    self.publish.notice(f"refused: {line}")
            if not refusals and gate.approve is not None and not gate.approve(preview, runner.plan.stages):
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

    def _after_failure(self, runner: Runner, result: RunResult) -> RunResult:
        """A run that failed (not interrupted, not refused): its undo if the runbook says on_failure: undo, then its
        hooks.on_failure."""
        ran = runner.plan
        if not result.failed or result.interrupted or result.refused:
            return result
        if ran.runbook.runbook.on_failure == "undo":
            result = self._undo(runner, result)
        if ran.on_failure and not result.interrupted:
            self.publish.notice(f"the run failed: {len(ran.on_failure)} hooks.on_failure stage(s)")
            result = self._then(runner, result, ran.on_failure)
        return result

    def _undo(self, runner: Runner, forward: RunResult) -> RunResult:
        """Take back what a failed run changed, latest stage first (see overhaul.undo); say what it could not."""
        from overhaul.undo import undo_plan

        done = {(r.stage_index, r.host): r for r in [*self.previous.values(), *forward.results]}
        undo = undo_plan(runner.plan, list(done.values()))
        if undo.blocked:
            self.publish.notice("not undone (nothing was taken back; a half-undone farm is worse than a stopped one):\n"
                                + "\n".join(f"  {line}" for line in undo.blocked))
            return forward  # (the run's last lines say the ways on, a rollback among them when there is one)
        self.publish.notice(f"undoing: {len(undo.plan.stages)} stage(s) to take back, latest first")
        if not self.undoing:  # from then on, the way on is the undo, not a resume
            self.undoing = True
            if self.state is not None and self.record is not None:
                self.state.event(self.record.environment, UNDO, "the run failed: on_failure undo", self.record.id)
        undone = self._then(runner, forward, undo.plan.stages)
        indices = {planned.index for planned in undo.plan.stages}
        clean = not undone.interrupted and not any(r.outcome is Outcome.FAILED and r.stage_index in indices
                                                   for r in undone.results)
        return replace(undone, rolled_back=clean, stopped_at=forward.stopped_at or (None if clean else "undo"))

    def _then(self, runner: Runner, result: RunResult, more: list[PlannedStage]) -> RunResult:
        """Run `more` stages after `result` on the same runner (journal, connections, Ctrl-C); every result kept."""
        runner.plan, runner.previous = replace(runner.plan, stages=more, on_failure=[]), self.previous
        self.stages += more
        after = runner.run()
        return replace(result, results=after.results, interrupted=after.interrupted)


class Told:
    """The runner's listener that publishes what it hears as events (see overhaul.events)."""

    def __init__(self, publish: Publisher):
        self.publish = publish

    def stage_started(self, planned: PlannedStage, hosts: list[str]) -> None:
        self.publish(StageStarted(planned, hosts))

    def batch_started(self, planned: PlannedStage, number: int, total: int, hosts: list[str]) -> None:
        self.publish(BatchStarted(planned, number, total, hosts))

    def host_started(self, planned: PlannedStage, host: str) -> None:
        self.publish(PairStarted(planned, host))

    def command_started(self, host: str, command: str, read: bool) -> None:
        self.publish(CommandStarted(host, command, read))

    def command_done(self, host: str, result: CommandResult) -> None:
        self.publish(CommandDone(host, result))

    def host_finished(self, result: HostResult) -> None:
        self.publish(PairFinished(result))

    def pause(self) -> None:
        self.publish(Asking())


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
    runbook = read_regular(plan.runbook.path, MAX_BYTES, "a runbook")  # read once: its hash, and a composed one's text
    record = RunRecord(
        id=run_id, runbook=plan.runbook.runbook.name, runbook_path=str(plan.runbook.path.resolve()),
        runbook_sha256=hashlib.sha256(runbook).hexdigest(), environment=plan.inventory.environment,
        params=plan.redactor.walk(json.loads(json.dumps(params))),  # in values, never in JSON text
        operator=operator(), started=time.time(),
        mutating=mutating,
    )
    state.start_run(record)
    if runbook.startswith(COMPOSED.encode()):  # another controller resuming or undoing the run finds it in the journal
        state.event(record.environment, COMPOSED_EVENT, runbook.decode(), run_id)
    if mutating and upgrades(plan):  # the environment's history reads it as an upgrade, whatever its name
        state.event(record.environment, KIND_EVENT, "upgrade", run_id)
    if plan.limit:
        state.event(record.environment, LIMIT, plan.limit, run_id)
    if folders := local_step_folders(plan):  # a resume or an undo from another folder finds the run's own steps
        state.event(record.environment, LOCAL_STEPS, json.dumps(folders), run_id)
    if plan.inventory.source is not None:  # what the source found now is what a resume works on
        found = [host.model_dump(mode="json") for host in plan.inventory.found]
        state.event(record.environment, SOURCE_HOSTS, json.dumps(found), run_id)
    return record


def preflight_table(report: PreflightReport) -> str:
    """The preflight's outcome per host and stage as JSON (a reason cut to 200 characters; it is journaled)."""
    table: dict[str, dict[str, str]] = {}
    for (index, host), check in report.checks.items():
        table.setdefault(host, {})[str(index + 1) if index >= 0 else "ssh"] = "ok" if check.done else check.message[:200]
    for host, why in report.excluded.items():
        table.setdefault(host, {})["ssh"] = f"left out: {why}"[:200]
    return json.dumps(table, sort_keys=True)


def local_step_folders(plan: Plan) -> list[str]:
    """The folders the plan's steps of the operator's own were loaded from (a steps/ folder, not a package)."""
    from overhaul.step import LOCAL_MODULES

    return sorted({str(Path(inspect.getfile(planned.step)).parent.resolve())
                   for planned in [*plan.stages, *plan.on_failure]
                   if planned.step.__module__.startswith(LOCAL_MODULES + ".")})


def upgrades(plan: Plan) -> bool:
    """Whether `plan` upgrades a package to its `version` (a runbook of another name than upgrade that does what it
    does: composed in Python, say): a stage of package.upgrade to the run's version, and not the way back."""
    version = plan.run_params.get("version")
    return version is not None and plan.runbook.runbook.name not in ("upgrade", "rollback") and any(
        planned.step.name == "package.upgrade" and str(getattr(params, "version", None)) == str(version)
        for planned in plan.stages for params in planned.params.values())


def recorded_hosts(state: State, record: RunRecord) -> list[dict] | None:
    """The hosts an inventory source found when the run started (None: the inventory has no source)."""
    found = state.run_event(record.id, SOURCE_HOSTS)
    return json.loads(found) if found is not None else None


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
    return "interrupted" if result is None else result.status


def exit_code(result: RunResult) -> int:
    """0 success, 1 some host failed (or the run stopped, or left a host it had changed half-done), 3 refused before
    any change, 130 interrupted."""
    return result.exit_code


def journaled_results(state: State, run_id: str) -> dict[tuple[int, str], HostResult]:
    return host_results(state.results(run_id))


def host_results(results: list[ResultRecord]) -> dict[tuple[int, str], HostResult]:
    """The journaled pairs that ended, as the runner's results, by (stage index, host)."""
    return {
        (r.stage_index, r.host): HostResult(r.stage, r.host, Outcome(r.outcome), r.message, r.attempts, 0.0, r.facts,
                                            r.stage_index)
        for r in results if r.outcome != "running"
    }
