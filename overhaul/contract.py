"""The step contract, proven on real hosts: any step, built-in or a plug-in's, through the whole of it.

`StepContract(lab, workdir).check(step, params, hosts=[...])` writes a one-stage runbook that uses the step and
drives the real `overhaul` command (subprocesses, each with the contract's own journal) through:

1. **preflight honest**: `overhaul plan` passes on a host where the step can work;
2. **idempotent**: a run changes the host (a read-only step: reports `ok`), and a second run changes nothing;
3. **crash-safe**: for every journal write k of a whole run, the host is put back as it was before, a run is
   SIGKILLed right after its k-th write, and `overhaul resume` finishes it: a pair whose end was journaled
   before the kill is not applied again, and the host ends done (a further run changes nothing);
4. **undo round trip**: a step that says it can be undone (`reversible = True`) is taken back by
   `overhaul undo` (its check then finds the work to do again, unless its change is one harmless to keep);
   one that cannot (`reversible = False`) or does not say (`None`) makes the undo refuse, naming it.

Between kill points the host is put back by the step's own undo when it has one, else by the `reset` the
caller gives. Why subprocesses: a SIGKILL must kill a controller, not the test, and the contract is about what
an operator's `overhaul` does. Each failure is a `ContractBroken` naming the step, the part and the kill point.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from overhaul.errors import REFUSED_EXIT
from overhaul.lab import Lab
from overhaul.state import SQLiteState
from overhaul.state.records import ResultRecord, RunRecord
from overhaul.state.sql import KILL_AFTER_WRITES
from overhaul.step import Registry, Step

RUNBOOK = "contract"  # the one-stage runbook the contract writes
STAGE = "contract"
DONE_BEFORE = "(done before resume)"  # how a resumed run reports a pair it kept instead of applying again
MAX_WRITES = 500  # a sweep that has not reached the run's end by then is a step (or kit) bug, not a long run


class ContractBroken(AssertionError):
    """The step broke its contract: the message names the step, the part of the contract and the kill point."""


@dataclass
class ContractReport:
    """What `StepContract.check` proved about one step."""

    step: str
    writes: int = 0  # journal writes of a whole run (its start, the gate's table, each changing pair's start and
    # end, the ends of those that changed nothing, its end)
    kill_points: list[int] = field(default_factory=list)  # the writes it was killed after, then resumed
    undo: str = ""  # "taken back", "kept (harmless)", "refused" or "read-only"


class StepContract:
    """Runs steps through their whole contract on the hosts of `lab`, working (journal, runbook, logs) in `workdir`.

    `steps_dir`: a folder of local steps (`--steps-dir`), for a step not installed as an entry point.
    `timeout`: seconds any one `overhaul` command may take.
    """

    def __init__(self, lab: Lab, workdir: Path, *, steps_dir: Path | None = None, timeout: float = 300) -> None:
        self.lab = lab
        self.workdir = Path(workdir)
        self.steps_dir = steps_dir
        self.timeout = timeout
        self._checks = 0

    def check(self, step: str, params: dict[str, Any] | None = None, *, hosts: Sequence[str] = (),
              roles: Sequence[str] = (), reset: Callable[[], None] | None = None,
              kill_points: Iterable[int] | None = None) -> ContractReport:
        """Prove `step`'s contract with `params` on `hosts` (or the hosts having `roles`; neither: every host).

        The hosts must be where the step has work to do (or `reset` puts them there: it is called first, and
        between kill points when the step has no undo of its own). `kill_points`: the journal writes to kill at
        (default: every one of a whole run). Raises ContractBroken; returns what was proven.
        """
        self._checks += 1
        run = _Session(self, step, self.workdir / f"{self._checks:02d}-{step}", params or {}, hosts, roles)
        return run.prove(reset, kill_points)


class _Session:
    """One `check`: its runbook, its journal and the `overhaul` commands it runs."""

    def __init__(self, contract: StepContract, step: str, home: Path, params: dict[str, Any], hosts: Sequence[str],
                 roles: Sequence[str]) -> None:
        self.contract = contract
        self.name = step
        self.home = home
        home.mkdir(mode=0o700, parents=True)
        self.journal = home / "journal.sqlite"
        registry = Registry([contract.steps_dir] if contract.steps_dir else [])
        self.step: type[Step[Any]] = registry.get(step)
        stage: dict[str, Any] = {"name": STAGE, "step": step, "params": params}
        if hosts:
            stage["hosts"] = list(hosts)
        if roles:
            stage["roles"] = list(roles)
        runbooks = home / "runbooks"
        runbooks.mkdir(mode=0o700)
        document = {"name": RUNBOOK, "description": f"The contract of step {step}.", "stages": [stage]}
        (runbooks / f"{RUNBOOK}.yaml").write_text(yaml.safe_dump(document, sort_keys=False))

    # -- the parts of the contract --------------------------------------------------------------------------------
    def prove(self, reset: Callable[[], None] | None, kill_points: Iterable[int] | None) -> ContractReport:
        report = ContractReport(self.name)
        changes = not self.step.read_only
        if changes and reset is None and not self.has_undo:
            raise ContractBroken(f"step {self.name}: it changes hosts and has no undo of its own: give a reset that "
                                 "puts the hosts back as they were before it (between kill points)")
        if reset is not None:
            reset()
        self.preflight_honest(changes)
        first = self.run_changes(changes)
        self.run_again_changes_nothing("a second run")
        report.undo = self.undo_round_trip(first, reset)
        self.sweep(report, reset, kill_points)
        return report

    @property
    def has_undo(self) -> bool:
        """The step takes its change back itself (reversible, with an `undone` of its own, not Step's default)."""
        return bool(self.step.reversible) and self.step.undone is not Step.undone

    def preflight_honest(self, changes: bool) -> None:
        planned = self.plan("preflight honest")
        outcomes = {host: said["outcome"] for stage in planned["stages"] for host, said in stage["hosts"].items()}
        if not outcomes:
            raise ContractBroken(f"step {self.name}: the stage selects no host of the lab")
        if changes and "changed" not in outcomes.values():
            raise ContractBroken(f"step {self.name}: plan says nothing would change ({outcomes}): start from hosts "
                                 "where the work is not done (or give a reset that puts them there)")

    def run_changes(self, changes: bool) -> RunRecord:
        record, pairs = self.run("the first run")
        outcomes = {pair.host: pair.outcome for pair in pairs}
        wanted = {"changed", "ok"} if changes else {"ok"}
        if not set(outcomes.values()) <= wanted or (changes and "changed" not in outcomes.values()):
            raise ContractBroken(f"step {self.name}: the first run's pairs are {outcomes}; expected "
                                 + ("at least one changed, none failed" if changes else "every one ok (a read-only step)")
                                 + self.said(pairs))
        return record

    def run_again_changes_nothing(self, what: str) -> None:
        _, pairs = self.run(what)
        if any(pair.outcome != "ok" for pair in pairs):
            raise ContractBroken(f"step {self.name}: {what} must change nothing (every pair ok), got "
                                 f"{ {pair.host: pair.outcome for pair in pairs} }: its check does not find its own "
                                 f"work done (not idempotent){self.said(pairs)}")

    def undo_round_trip(self, record: RunRecord, reset: Callable[[], None] | None) -> str:
        """`overhaul undo` of the first run: taken back, kept, or refused naming the step; the hosts left as before it."""
        if self.step.read_only:
            return "read-only"
        undo = self.undo(record)
        if not self.step.reversible:
            said = undo.stdout + undo.stderr
            if undo.returncode != REFUSED_EXIT or f"({self.name})" not in said:
                raise ContractBroken(f"step {self.name} (reversible={self.step.reversible}): `overhaul undo` must refuse "
                                     f"(exit {REFUSED_EXIT}) naming the step; it exited {undo.returncode}:\n{said}")
            if reset is not None:
                reset()
            return "refused"
        self.expect(undo, 0, "the undo round trip: `overhaul undo`")
        if not self.has_undo:  # a change harmless to keep (a backup): the undo takes nothing back
            if reset is not None:
                reset()
            return "kept (harmless)"
        planned = self.plan("after the undo")
        changed = {pair.host for pair in self.pairs(record.id) if pair.outcome == "changed"}
        again = {host for stage in planned["stages"] for host, said in stage["hosts"].items() if said["outcome"] == "changed"}
        if not changed <= again:
            raise ContractBroken(f"step {self.name}: after `overhaul undo`, its check still finds the work done on "
                                 f"{', '.join(sorted(changed - again))}: the undo did not take the change back")
        return "taken back"

    def sweep(self, report: ContractReport, reset: Callable[[], None] | None, kill_points: Iterable[int] | None) -> None:
        """Kill a run right after each of its journal writes in turn, resume it, and check what the resume did."""
        wanted = sorted(set(kill_points)) if kill_points is not None else None
        points = iter(wanted) if wanted is not None else iter(range(1, MAX_WRITES))
        for k in points:
            if report.kill_points or report.writes:  # the hosts are done: put them back as before the step
                self.put_back(reset, f"before kill point {k}")
            killed = self.overhaul("run", RUNBOOK, "--yes", *self.common, kill_after=k)
            if killed.returncode != -signal.SIGKILL:
                if wanted is None and killed.returncode == 0:  # fewer writes than k (never when counted below)
                    break
                raise ContractBroken(f"step {self.name}, kill point {k}: a run told to die after journal write {k} "
                                     f"exited {killed.returncode} instead of being killed:\n{killed.stdout}{killed.stderr}")
            record = self.last_run()
            if record.status == "succeeded":  # killed by the run's last write, its end: nothing left to resume
                report.writes = k
                self.run_again_changes_nothing(f"kill point {k} (the run's end): a further run")
                break
            before = {(p.stage_index, p.host): p for p in self.pairs(record.id) if p.outcome in ("ok", "changed")}
            resumed = self.overhaul("resume", "--env", self.contract.lab.environment, *self.dirs, "--yes")
            self.expect(resumed, 0, f"kill point {k}: `overhaul resume`")
            after = self.pairs(record.id)
            status = self.contract_run(record.id).status
            if status != "succeeded":
                raise ContractBroken(f"step {self.name}, kill point {k}: the resumed run is {status}{self.said(after)}")
            for pair in after:
                kept = before.get((pair.stage_index, pair.host))
                if kept is not None and not (pair.outcome == kept.outcome and pair.message.startswith(DONE_BEFORE)):
                    raise ContractBroken(f"step {self.name}, kill point {k}: {pair.host}'s pair ended {kept.outcome} "
                                         f"before the kill, and the resume did it again ({pair.outcome}: {pair.message})")
            if not self.step.read_only and "changed" not in {pair.outcome for pair in after}:
                raise ContractBroken(f"step {self.name}, kill point {k}: the killed and resumed run changed nothing: "
                                     "the reset did not put the hosts back as they were before the step")
            self.run_again_changes_nothing(f"kill point {k}: a further run after the resume")
            report.kill_points.append(k)
        if wanted is None and not report.writes:
            raise ContractBroken(f"step {self.name}: a run made more than {MAX_WRITES} journal writes")
        self.put_back(reset, "at the end")  # the hosts as the check found them: the next check starts from there

    def put_back(self, reset: Callable[[], None] | None, when: str) -> None:
        """The hosts as before the step: its own undo of the newest run that changed them, else the caller's reset."""
        if self.step.read_only:
            return
        if self.has_undo:
            changed = [run for run in self.runs() if any(p.outcome == "changed" for p in self.pairs(run.id))]
            undo = self.undo(changed[0])
            self.expect(undo, 0, f"{when}: `overhaul undo` (putting the hosts back)")
        else:
            assert reset is not None  # checked in prove()
            reset()

    # -- the `overhaul` command and the journal -------------------------------------------------------------------
    @property
    def dirs(self) -> tuple[str, ...]:
        """Where the inventory is, and the local steps folder if the contract has one."""
        steps = ("--steps-dir", str(self.contract.steps_dir)) if self.contract.steps_dir else ()
        return ("--hosts-dir", str(self.contract.lab.inventory.parent), *steps)

    @property
    def common(self) -> tuple[str, ...]:
        return ("--env", self.contract.lab.environment, *self.dirs, "--runbooks-dir", str(self.home / "runbooks"))

    def overhaul(self, *args: str, kill_after: int | None = None) -> subprocess.CompletedProcess[str]:
        """The `overhaul` command, in this check's folder with its journal, no standard input."""
        env = {**os.environ, "OVERHAUL_JOURNAL": str(self.journal), KILL_AFTER_WRITES: str(kill_after or "")}
        return subprocess.run([sys.executable, "-m", "overhaul", *args], cwd=self.home, env=env, capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, timeout=self.contract.timeout)

    def expect(self, done: subprocess.CompletedProcess[str], code: int, what: str) -> None:
        if done.returncode != code:
            raise ContractBroken(f"step {self.name}: {what} exited {done.returncode} (expected {code}):\n"
                                 f"{done.stdout}{done.stderr}")

    def plan(self, what: str) -> dict[str, Any]:
        out = self.home / "plan.json"
        planned = self.overhaul("plan", RUNBOOK, *self.common, "--out", str(out))
        self.expect(planned, 0, f"{what}: `overhaul plan` (preflight, then check)")
        saved: dict[str, Any] = json.loads(out.read_text())
        return saved

    def run(self, what: str) -> tuple[RunRecord, list[ResultRecord]]:
        done = self.overhaul("run", RUNBOOK, "--yes", *self.common)
        self.expect(done, 0, f"{what}: `overhaul run`")
        record = self.last_run()
        return record, self.pairs(record.id)

    def undo(self, record: RunRecord) -> subprocess.CompletedProcess[str]:
        """`overhaul undo --run ID --yes` of `record`. Undo takes back only a run that did not succeed (an operator
        would not undo a finished upgrade, but roll it back): the contract marks its own journal's finished run
        abandoned first, as `overhaul abandon` marks an unfinished one."""
        with closing(SQLiteState(self.journal)) as journal:
            if journal.run(record.id).status == "succeeded":
                journal.set_status(record.id, "abandoned", time.time())
        return self.overhaul("undo", "--run", record.id, "--yes", *self.dirs)

    def runs(self) -> list[RunRecord]:
        """The runs of this check's journal, newest first."""
        with closing(SQLiteState(self.journal)) as journal:
            return journal.runs(self.contract.lab.environment, limit=MAX_WRITES)

    def last_run(self) -> RunRecord:
        return self.runs()[0]

    def contract_run(self, run_id: str) -> RunRecord:
        with closing(SQLiteState(self.journal)) as journal:
            return journal.run(run_id)

    def pairs(self, run_id: str) -> list[ResultRecord]:
        """The run's own pairs (those of an undo of it, journaled after them, left out)."""
        with closing(SQLiteState(self.journal)) as journal:
            return [pair for pair in journal.results(run_id) if pair.stage == STAGE]

    def said(self, pairs: list[ResultRecord]) -> str:
        return "".join(f"\n  {pair.host}: {pair.outcome}: {pair.message}" for pair in pairs)
