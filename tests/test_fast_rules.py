"""The runner's and the journal's rules on the fake connection (overhaul.testing.FakeTransport): failure budgets,
strategies, retries, resume, undo planning, the preflight gate and the journal's writes. No SSH, no lab, no root, no
network: each test takes milliseconds. The same rules on real hosts: test_engine.py, test_undo.py, test_checkpoint.py.

The farm is four hosts in inventory order db1 (db), worker1 (worker), app1 and app2 (app). Their files are a set each
(`Disk`): the steps here (`touch` and its kin) read and change them only through commands the fake answers.
"""

from __future__ import annotations

import shlex
import threading
import time
from typing import Any

import pytest

from overhaul.command import sh
from overhaul.errors import HostUnreachable, StepFailed
from overhaul.execution import JournalRecorder
from overhaul.plan import Plan, PlannedStage
from overhaul.preflight import HOST_COLUMN, run_preflight
from overhaul.runner import UNDO_FACTS, HostResult, Runner, RunResult
from overhaul.state import ResultRecord, RunRecord, SQLiteState, StateError
from overhaul.step import Check, Outcome, Params, Step
from overhaul.testing import Answer, FakeTransport, fake_inventory, fake_plan, in_turn
from overhaul.undo import undo_plan

HOSTS = ("db1", "worker1", "app1", "app2")
INVENTORY = {"db1": ["db"], "worker1": ["worker"], "app1": ["app"], "app2": ["app"]}
READ_ONLY = Answer(exited=1, stderr="touch: cannot touch: Read-only file system")


# -- the steps and the farm ------------------------------------------------------------------------------------------
class PathParams(Params):
    path: str
    needs: str = ""  # preflight: this file must exist first


class Touch(Step[PathParams]):
    """Creates a file; undone by removing it."""

    name = "touch"
    reversible = True

    def preflight(self, host: Any) -> Check:
        if not self.params.needs:
            return Check(True, "nothing to prove")
        found = host.run(sh("test -e -- {path}", path=self.params.needs))
        return Check(found.ok, "ready" if found.ok else f"{self.params.needs} missing")

    def check(self, host: Any) -> Check:
        found = host.run(sh("test -e -- {path}", path=self.params.path))
        return Check(found.ok, f"{self.params.path} {'present' if found.ok else 'absent'}")

    def apply(self, host: Any) -> str:
        self.remembered["created"] = self.params.path
        made = host.run(sh("touch -- {path}", path=self.params.path))
        if not made.ok:
            raise StepFailed(f"touch {self.params.path}: {made.tail()}")
        return f"created {self.params.path}"

    def undone(self, host: Any, remembered: dict[str, Any]) -> Check:
        found = host.run(sh("test -e -- {path}", path=remembered["created"]))
        return Check(not found.ok, f"{remembered['created']} {'present' if found.ok else 'absent'}")

    def undo(self, host: Any, remembered: dict[str, Any]) -> str:
        host.run(sh("rm -f -- {path}", path=remembered["created"]))
        return f"removed {remembered['created']}"


class Migrate(Touch):
    name = "migrate"
    reversible = False
    irreversible = "the schema is migrated for good"


class Undecided(Touch):
    name = "undecided"
    reversible = None


STEPS = [Touch, Migrate, Undecided]


class Disk:
    """One host's files, as the fake answers `test -e`, `touch` and `rm -f` about them."""

    def __init__(self, *present: str):
        self.files = set(present)

    def test(self, command: str) -> Answer:
        return Answer(exited=0 if shlex.split(command)[-1] in self.files else 1)

    def touch(self, command: str) -> Answer:
        self.files.add(shlex.split(command)[-1])
        return Answer()

    def remove(self, command: str) -> Answer:
        self.files.discard(shlex.split(command)[-1])
        return Answer()

    def table(self) -> list[tuple[str, Any]]:
        return [("test -e", self.test), ("touch", self.touch), ("rm -f", self.remove)]


class Farm:
    """The four hosts on a fake transport. `replies`: a host's own replies, asked before its disk (a failing touch);
    `files`: what a host's disk holds at the start."""

    def __init__(self, replies: dict[str, list[tuple[str, Any]]] | None = None, files: dict[str, set[str]] | None = None,
                 **transport: Any):
        self.inventory = fake_inventory(INVENTORY)
        self.disks = {host: Disk(*(files or {}).get(host, ())) for host in HOSTS}
        tables = {host: [*(replies or {}).get(host, []), *disk.table()] for host, disk in self.disks.items()}
        self.transport = FakeTransport(self.inventory, hosts=tables, **transport)

    def together(self, command: str) -> Farm:
        """Every host's first `command` (a `test -e` or a `touch`) waits for the other hosts' (as on real hosts, where
        a parallel stage's pairs all start before the first answer comes back); later ones are answered at once."""
        everyone = threading.Barrier(len(HOSTS), timeout=5)
        for host in HOSTS:
            disk = self.disks[host]

            def answer(text: str, disk: Disk = disk) -> Answer:
                return disk.test(text) if text.startswith("test -e") else disk.touch(text)

            def first(text: str, answer: Any = answer) -> Answer:
                everyone.wait()  # broken (an error: the pair fails) unless every host gets here within 5 s
                return answer(text)

            self.transport.host(host).answers.insert(0, (command, in_turn(first, answer)))
        return self

    def plan(self, *stages: dict[str, Any], **runbook: Any) -> Plan:
        return fake_plan({"name": "fast", "stages": list(stages), **runbook}, self.inventory, STEPS)

    def run(self, *stages: dict[str, Any], **runner: Any) -> RunResult:
        return Runner(self.plan(*stages), self.transport, sleep=lambda _: None, **runner).run()

    def ran(self, host: str, word: str) -> list[str]:
        """The commands `host` ran that start with `word` (touch, rm), in order."""
        return [command for command in self.transport.host(host).commands if command.startswith(word)]


def stage(name: str, path: str, step: str = "touch", **fields: Any) -> dict[str, Any]:
    return {"name": name, "step": step, "params": {"path": path}, **fields}


def outcomes(result: RunResult, stage_name: str) -> dict[str, str]:
    return {r.host: r.outcome.value for r in result.results if r.stage == stage_name}


def messages(result: RunResult, stage_name: str) -> dict[str, str]:
    return {r.host: r.message for r in result.results if r.stage == stage_name}


class Heard:
    """A listener writing down the run's events in order: ("stage", name), ("start", host), ("end", host),
    ("batch", number, hosts)."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def stage_started(self, planned: PlannedStage, hosts: list[str]) -> None:
        self.events.append(("stage", planned.stage.name))

    def host_started(self, planned: PlannedStage, host: str) -> None:
        self.events.append(("start", host))

    def host_finished(self, result: HostResult) -> None:
        self.events.append(("end", result.host))

    def batch_started(self, planned: PlannedStage, number: int, total: int, batch: list[str]) -> None:
        self.events.append(("batch", number, tuple(batch)))


def slow(seconds: float, then: Any) -> Any:
    """A reply that takes `seconds` before answering as `then` (room for another host's pair to overlap)."""
    def reply(command: str) -> Answer:
        time.sleep(seconds)
        return then(command)
    return reply


# -- failure budgets ------------------------------------------------------------------------------------------------
def test_one_failure_over_max_failures_0_stops_the_run_before_the_next_stage():
    farm = Farm({"app1": [("touch", READ_ONLY)]}).together("test -e -- /one")
    result = farm.run(stage("one", "/one"), stage("two", "/two"))
    assert outcomes(result, "one") == {"db1": "changed", "worker1": "changed", "app1": "failed", "app2": "changed"}
    assert outcomes(result, "two") == dict.fromkeys(HOSTS, "skipped")
    assert set(messages(result, "two").values()) == {"run stopped at stage 'one'"}
    assert result.stopped_at == "one" and result.failed
    assert result.stop_reason == "1 of 4 hosts failed (max_failures 0)"
    assert not any(farm.ran(host, "touch -- /two") for host in HOSTS)  # nothing of stage two reached a host


def test_a_failure_within_max_failures_goes_on_and_later_stages_skip_the_failed_host():
    farm = Farm({"app1": [("touch", READ_ONLY)]})
    result = farm.run(stage("one", "/one", max_failures=1), stage("two", "/two"))
    assert result.stopped_at is None and result.failed  # a host failed: the run still reports failure
    assert outcomes(result, "two") == {"db1": "changed", "worker1": "changed", "app1": "skipped", "app2": "changed"}
    assert messages(result, "two")["app1"] == "failed in an earlier stage"
    assert farm.ran("app1", "touch") == ["touch -- /one"]  # tried in stage one, never in stage two


@pytest.mark.parametrize(("max_failures", "failing", "stops"), [
    ("25%", ["app1"], False),  # 25% of 4 hosts: 1 failure tolerated
    ("25%", ["app1", "app2"], True),
    ("30%", ["app1", "app2"], True),  # 1.2 hosts, rounded down: still 1
    ("50%", ["app1", "app2"], False),
    (2, ["worker1", "app1", "app2"], True),
])
def test_max_failures_as_a_count_or_a_percentage_of_the_stages_hosts_rounded_down(max_failures, failing, stops):
    farm = Farm({host: [("touch", READ_ONLY)] for host in failing}).together("test -e -- /one")
    result = farm.run(stage("one", "/one", max_failures=max_failures), stage("two", "/two"))
    assert (result.stopped_at == "one") is stops
    assert outcomes(result, "one") == {host: "failed" if host in failing else "changed" for host in HOSTS}
    expected = "skipped" if stops else "changed"
    assert outcomes(result, "two") == {host: "skipped" if host in failing else expected for host in HOSTS}


def test_on_failure_continue_runs_every_host_and_stops_nothing_nor_benches_the_failed_hosts():
    farm = Farm({"worker1": [("touch -- /one", READ_ONLY)], "app1": [("touch -- /one", READ_ONLY)]})
    result = farm.run(stage("one", "/one", strategy="serial", on_failure="continue"), stage("two", "/two"))
    assert outcomes(result, "one") == {"db1": "changed", "worker1": "failed", "app1": "failed", "app2": "changed"}
    assert result.stopped_at is None and result.failed
    assert outcomes(result, "two") == dict.fromkeys(HOSTS, "changed")  # the failed hosts too: not benched


def test_a_spent_budget_skips_the_stages_hosts_not_yet_started():
    farm = Farm({"worker1": [("touch", READ_ONLY)]})
    result = farm.run(stage("one", "/one", strategy="serial"))
    assert outcomes(result, "one") == {"db1": "changed", "worker1": "failed", "app1": "skipped", "app2": "skipped"}
    assert messages(result, "one")["app1"] == messages(result, "one")["app2"] == "stage failure budget exceeded"
    assert farm.transport.host("app1").commands == farm.transport.host("app2").commands == []


# -- strategies -----------------------------------------------------------------------------------------------------
def test_parallel_runs_every_host_of_the_stage_at_once():
    farm = Farm().together("touch -- /one")  # each apply waits for the other three: only all at once passes
    result = farm.run(stage("one", "/one"))
    assert outcomes(result, "one") == dict.fromkeys(HOSTS, "changed"), messages(result, "one")


def test_parallel_concurrency_caps_the_hosts_at_once():
    running, peak, lock = [0], [0], threading.Lock()

    def counted(disk: Disk) -> Any:
        def reply(command: str) -> Answer:
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(0.03)
            with lock:
                running[0] -= 1
            return disk.touch(command)
        return reply

    farm = Farm()
    for host in HOSTS:
        farm.transport.host(host).answers.insert(0, ("touch", counted(farm.disks[host])))
    result = farm.run(stage("one", "/one", concurrency=2))
    assert outcomes(result, "one") == dict.fromkeys(HOSTS, "changed")
    assert peak[0] == 2


def test_serial_takes_the_hosts_one_at_a_time_in_inventory_order():
    farm = Farm({host: [("touch", slow(0.02, lambda command, host=host: farm.disks[host].touch(command)))]
                 for host in HOSTS})
    heard = Heard()
    result = farm.run(stage("one", "/one", strategy="serial"), listeners=[heard])
    assert outcomes(result, "one") == dict.fromkeys(HOSTS, "changed")
    assert heard.events == [("stage", "one"), *[event for host in HOSTS for event in (("start", host), ("end", host))]]
    hosts_in_order = [host for host, _ in farm.transport.commands]
    assert hosts_in_order == sorted(hosts_in_order, key=HOSTS.index)  # each host's commands before the next host's


@pytest.mark.parametrize(("batch", "batches"), [
    (2, [("db1", "worker1"), ("app1", "app2")]),
    ("50%", [("db1", "worker1"), ("app1", "app2")]),
    (3, [("db1", "worker1", "app1"), ("app2",)]),
    ("10%", [("db1",), ("worker1",), ("app1",), ("app2",)]),  # a batch is never empty: at least one host
])
def test_rolling_runs_batch_after_batch_in_inventory_order(batch, batches):
    farm = Farm({host: [("touch", slow(0.01, lambda command, host=host: farm.disks[host].touch(command)))]
                 for host in HOSTS})
    heard = Heard()
    result = farm.run(stage("roll", "/one", strategy="rolling", batch=batch), listeners=[heard])
    assert outcomes(result, "roll") == dict.fromkeys(HOSTS, "changed")
    assert [event[2] for event in heard.events if event[0] == "batch"] == batches
    number = {host: index for index, hosts in enumerate(batches) for host in hosts}
    current = -1
    for event in heard.events:  # a batch starts once every pair of the one before it ended
        if event[0] == "batch":
            current = event[1] - 1
        elif event[0] in ("start", "end"):
            assert number[event[1]] == current, heard.events


def test_a_rolling_batch_over_budget_stops_the_later_batches():
    farm = Farm({"worker1": [("touch", READ_ONLY)]})
    heard = Heard()
    result = farm.run(stage("roll", "/one", strategy="rolling", batch=2), stage("next", "/two"), listeners=[heard])
    assert outcomes(result, "roll") == {"db1": "changed", "worker1": "failed", "app1": "skipped", "app2": "skipped"}
    assert messages(result, "roll")["app1"] == "stage failure budget exceeded"
    assert result.stopped_at == "roll" and set(outcomes(result, "next").values()) == {"skipped"}
    assert farm.transport.host("app1").commands == farm.transport.host("app2").commands == []
    assert [event[1] for event in heard.events if event[0] == "start"] == ["db1", "worker1"]


# -- retries --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("attempts", "outcome", "tries"), [(1, "failed", 1), (2, "failed", 2), (3, "changed", 3)])
def test_a_step_failure_is_retried_as_the_stages_retry_allows_each_try_from_the_check(attempts, outcome, tries):
    farm = Farm()
    farm.transport.host("db1").answers.insert(0, ("touch", in_turn(READ_ONLY, READ_ONLY, farm.disks["db1"].touch)))
    waits: list[float] = []
    plan = farm.plan(stage("flaky", "/one", hosts=["db1"], retry={"attempts": attempts, "delay": 2, "backoff": 3}))
    result = Runner(plan, farm.transport, sleep=waits.append).run()
    [pair] = result.results
    assert (pair.outcome.value, pair.attempts) == (outcome, tries)
    assert waits == [2.0, 6.0][:tries - 1]  # delay, then delay x backoff
    assert farm.transport.host("db1").commands == ["test -e -- /one", "touch -- /one"] * tries + (
        ["test -e -- /one"] if outcome == "changed" else [])  # each try reads the host again first; verify at the end
    if outcome == "failed":
        assert pair.message == "touch /one: touch: cannot touch: Read-only file system"


def test_an_unexpected_exception_fails_the_pair_at_once_and_is_not_retried():
    farm = Farm({"app1": [("test -e", in_turn(RuntimeError("parser bug"), Answer(exited=1)))]})
    result = farm.run(stage("one", "/one", retry={"attempts": 3, "delay": 0}, max_failures=1))
    [pair] = [r for r in result.results if r.host == "app1"]
    assert (pair.outcome, pair.attempts) == (Outcome.FAILED, 1)
    assert pair.message == "step 'touch' raised RuntimeError: parser bug"
    assert "RuntimeError: parser bug" in pair.traceback
    assert farm.transport.host("app1").commands == ["test -e -- /one"]
    assert outcomes(result, "one") == {"db1": "changed", "worker1": "changed", "app1": "failed", "app2": "changed"}


@pytest.mark.parametrize("attempts", [1, 2])
def test_a_host_that_cannot_be_reached_is_retried_as_the_stage_allows(attempts):
    farm = Farm(unreachable={"app1": 1})  # its first connection attempt fails
    result = farm.run(stage("one", "/one", hosts=["app1"], retry={"attempts": attempts, "delay": 0}))
    [pair] = result.results
    if attempts == 1:
        assert (pair.outcome, pair.attempts) == (Outcome.FAILED, 1)
        assert pair.message == "app1: connection refused (unreachable on the fake transport)"
        assert farm.transport.host("app1").commands == []
    else:
        assert (pair.outcome, pair.attempts) == (Outcome.CHANGED, 2)


def test_a_connection_lost_during_the_apply_is_retried_and_the_host_read_again():
    lost = HostUnreachable("app1: connection lost during a command (its effect is unknown)")
    farm = Farm({"app1": [("touch", in_turn(lost, lambda command: farm.disks["app1"].touch(command)))]})
    result = farm.run(stage("one", "/one", hosts=["app1"], retry={"attempts": 2, "delay": 0}))
    [pair] = result.results
    assert (pair.outcome, pair.attempts) == (Outcome.CHANGED, 2)
    assert farm.transport.host("app1").commands == ["test -e -- /one", "touch -- /one"] * 2 + ["test -e -- /one"]


# -- resume ---------------------------------------------------------------------------------------------------------
def previous(stage_name: str, index: int, **pairs: tuple[Outcome, str]) -> dict[tuple[int, str], HostResult]:
    return {(index, host): HostResult(stage_name, host, outcome, message, attempts=1, stage_index=index)
            for host, (outcome, message) in pairs.items()}


def test_on_resume_a_pair_done_before_is_kept_without_applying_once_its_check_confirms_it():
    farm = Farm(files={"db1": {"/one"}, "worker1": {"/one"}})
    before = previous("one", 0, db1=(Outcome.CHANGED, "created /one"), worker1=(Outcome.OK, "/one present"),
                      app1=(Outcome.FAILED, "touch /one: no space left"))
    result = farm.run(stage("one", "/one", max_failures=4), previous=before)
    assert outcomes(result, "one") == {"db1": "changed", "worker1": "ok", "app1": "changed", "app2": "changed"}
    assert messages(result, "one") == {"db1": "(done before resume) created /one", "worker1": "(done before resume) "
                                       "/one present", "app1": "created /one", "app2": "created /one"}
    assert farm.ran("db1", "touch") == farm.ran("worker1", "touch") == []  # checked, not applied again
    assert farm.ran("app1", "touch") == farm.ran("app2", "touch") == ["touch -- /one"]  # failed before, or never ran


def test_on_resume_a_pair_done_before_whose_work_was_taken_back_since_is_applied_again():
    farm = Farm()  # /one is gone from db1 (someone removed it while the run was paused)
    result = farm.run(stage("one", "/one", hosts=["db1"]), previous=previous("one", 0, db1=(Outcome.CHANGED, "created /one")))
    assert (outcomes(result, "one"), messages(result, "one")) == ({"db1": "changed"}, {"db1": "created /one"})
    assert farm.ran("db1", "touch") == ["touch -- /one"]


def test_on_resume_what_the_interrupted_pair_remembered_for_its_undo_is_kept():
    farm = Farm()
    before = previous("one", 0, db1=(Outcome.FAILED, "touch /one: no space left"))
    before[(0, "db1")].facts = {UNDO_FACTS: {"created": "/one", "first reading": "before the run"}}
    result = farm.run(stage("one", "/one", hosts=["db1"]), previous=before)
    [pair] = result.results
    assert pair.outcome is Outcome.CHANGED
    assert pair.facts[UNDO_FACTS] == {"created": "/one", "first reading": "before the run"}


# -- undo planning --------------------------------------------------------------------------------------------------
def test_undo_takes_back_the_latest_stage_first_on_exactly_the_hosts_each_changed():
    farm = Farm({"app2": [("touch -- /two", READ_ONLY)]})
    plan = farm.plan(stage("one", "/one"), stage("two", "/two", roles=["app"], max_failures=1),
                     stage("three", "/three", roles=["db"]))
    result = Runner(plan, farm.transport, sleep=lambda _: None).run()
    assert outcomes(result, "two") == {"app1": "changed", "app2": "failed"}  # app2 failed after its apply began
    undo = undo_plan(plan, result.results)
    assert not undo.blocked
    assert [(p.stage.name, p.hosts, p.index) for p in undo.plan.stages] == [
        ("undo three", ["db1"], 3), ("undo two", ["app1", "app2"], 4), ("undo one", list(HOSTS), 5)]
    undone = Runner(undo.plan, farm.transport, sleep=lambda _: None).run()
    assert outcomes(undone, "undo two") == {"app1": "changed", "app2": "ok"}  # app2's touch never made /two
    assert all(disk.files == set() for disk in farm.disks.values())
    removed = [command for _, command in farm.transport.commands if command.startswith("rm")]
    assert removed == ["rm -f -- /three", "rm -f -- /two", *["rm -f -- /one"] * 4]  # latest stage first


def pairs(plan: Plan, *made: tuple[str, str, Outcome, bool]) -> list[HostResult]:
    """Results of `plan`'s stages: (stage, host, outcome, whether its apply began: it remembered for an undo)."""
    index = {planned.stage.name: planned.index for planned in plan.stages}
    return [HostResult(name, host, outcome, "", facts={UNDO_FACTS: {"created": "/x"}} if began else {},
                       stage_index=index[name]) for name, host, outcome, began in made]


@pytest.mark.parametrize(("step", "why"), [
    ("migrate", "stage 2 two (migrate) changed db1 and cannot be undone: the schema is migrated for good"),
    ("undecided", "stage 2 two (undecided) changed db1, and its step does not say whether its change can be undone "
                  "(set reversible = True with undone/undo, or reversible = False with irreversible)"),
])
def test_a_change_that_cannot_be_undone_blocks_the_whole_undo_naming_its_stage_and_step(step, why):
    plan = Farm().plan(stage("one", "/one"), stage("two", "/two", step=step), stage("three", "/three"))
    reversible = [("one", "db1", Outcome.CHANGED, True), ("three", "db1", Outcome.CHANGED, True)]
    assert len(undo_plan(plan, pairs(plan, *reversible)).plan.stages) == 2
    blocked = undo_plan(plan, pairs(plan, *reversible, ("two", "db1", Outcome.CHANGED, True)))
    assert blocked.blocked == [why] and blocked.empty  # nothing at all is undone, not even stages one and three
    began = undo_plan(plan, pairs(plan, *reversible, ("two", "db1", Outcome.FAILED, True)))
    assert began.blocked == [why]  # failed after its apply began: it may have changed the host half-way
    never = undo_plan(plan, pairs(plan, *reversible, ("two", "db1", Outcome.FAILED, False)))
    assert not never.blocked and [p.stage.name for p in never.plan.stages] == ["undo three", "undo one"]


# -- the preflight gate ---------------------------------------------------------------------------------------------
def test_a_preflight_refusing_on_one_host_refuses_the_run_before_any_change():
    farm = Farm(files={"app1": {"/ready"}})
    plan = farm.plan(stage("one", "/one"), {**stage("two", "/two", roles=["app"]),
                                            "params": {"path": "/two", "needs": "/ready"}})
    report = run_preflight(plan, farm.transport, "run-1")
    assert report.refusals == ["app2: stage 2 two: /ready missing"] and not report.ok
    assert set(report.checks) == {(index, host) for host in HOSTS for index in (HOST_COLUMN, 0)} | {
        (1, "app1"), (1, "app2")}  # every stage's preflight on every host it targets
    assert not any(command.startswith("touch") for _, command in farm.transport.commands)  # nothing applied
    assert all(disk.files <= {"/ready"} for disk in farm.disks.values())


@pytest.mark.parametrize("policy", ["refuse", "skip"])
def test_an_unreachable_host_refuses_the_run_unless_the_runbook_skips_it(policy):
    farm = Farm(unreachable=["app1"])
    plan = farm.plan(stage("one", "/one"), preflight={"unreachable": policy})
    report = run_preflight(plan, farm.transport, "run-1")
    assert report.checks[(HOST_COLUMN, "app1")] == Check(False, "unreachable: connection refused (unreachable on the "
                                                                "fake transport)")
    if policy == "refuse":
        assert report.refusals == ["app1: unreachable: connection refused (unreachable on the fake transport)"]
    else:
        assert report.ok and list(report.excluded) == ["app1"]
        assert plan.without(set(report.excluded)).hosts == ["db1", "worker1", "app2"]


def test_the_preflight_reads_every_probe_of_a_host_in_one_command():
    class Probed(Touch):
        name = "probed"

        def probes(self) -> list:
            from overhaul.context import file_probe
            return [file_probe("/etc/a"), file_probe("/etc/b")]

    farm = Farm()
    for host in HOSTS:
        farm.transport.host(host).answers.insert(0, ("cat --", Answer("content")))
    plan = fake_plan({"name": "fast", "stages": [stage("one", "/one", step="probed")]}, farm.inventory, [Probed])
    assert run_preflight(plan, farm.transport, "run-1").ok
    assert farm.transport.host("db1").commands == ["cat -- /etc/a 2>/dev/null", "cat -- /etc/b 2>/dev/null"]
    assert len(farm.transport.host("db1").sent) == 1  # one round trip


# -- the journal ----------------------------------------------------------------------------------------------------
class WatchedState(SQLiteState):
    """The SQLite journal, writing down each pair's writes (pair, outcome, commands the host had run by then); the
    write numbered `fail_at` (from 1) fails as a full disk would."""

    def __init__(self, path: Any, transport: FakeTransport, fail_at: int = 0):
        super().__init__(path)
        self.transport, self.fail_at = transport, fail_at
        self.writes: list[list[tuple[tuple[int, str], str, list[str]]]] = []  # each write's rows (pair, outcome,
        # the commands its host had run by then)

    def _watch(self, results: list[ResultRecord]) -> None:
        self.writes.append([((result.stage_index, result.host), result.outcome,
                             list(self.transport.host(result.host).commands)) for result in results])
        if len(self.writes) == self.fail_at:
            raise StateError("disk I/O error (database or disk is full)")

    def start_pair(self, result: ResultRecord, environment: str, token: str) -> None:
        self._watch([result])
        super().start_pair(result, environment, token)

    def record_ends(self, ends: Any, fence: tuple[str, str] | None = None) -> None:
        ends = list(ends)
        self._watch([result for result, _ in ends])
        super().record_ends(ends, fence)

    def rows(self) -> list[tuple[tuple[int, str], str, list[str]]]:
        return [row for write in self.writes for row in write]


def journaled_run(tmp_path: Any, farm: Farm, plan: Plan, fail_at: int = 0) -> tuple[RunResult, WatchedState,
                                                                                      JournalRecorder]:
    """`plan` run as a mutating run journals it: under the environment's lease, each pair fenced."""
    state = WatchedState(tmp_path / "journal.sqlite", farm.transport, fail_at)
    state.start_run(RunRecord("run-1", "fast", "<fast>", "", "fake", {}, "tester", time.time()))
    lease, _ = state.acquire("fake", "run-1", "tester")
    recorder = JournalRecorder(state, "run-1", tmp_path / "runs" / "run-1", lease)
    runner = Runner(plan, farm.transport, listeners=[recorder], run_id="run-1", sleep=lambda _: None,
                    log_dir=recorder.outputs, on_log_error=recorder.report)
    recorder.on_error = runner.request_stop
    result = runner.run()
    recorder.flush()
    return result, state, recorder


def test_a_pair_that_changes_is_journaled_running_before_its_apply_the_others_once_with_their_stage(tmp_path):
    farm = Farm({"app1": [("touch", READ_ONLY)]}, files={"app2": {"/two"}})
    plan = farm.plan(stage("one", "/one", strategy="serial", max_failures=1), stage("two", "/two", roles=["app"]))
    result, state, recorder = journaled_run(tmp_path, farm, plan)
    assert not recorder.error
    by_pair: dict[tuple[int, str], list[tuple[str, list[str]]]] = {}
    for pair, outcome, commands in state.rows():
        by_pair.setdefault(pair, []).append((outcome, commands))
    outcomes = {(r.stage, r.host): r.outcome.value for r in result.results}
    assert outcomes == {("one", "db1"): "changed", ("one", "worker1"): "changed", ("one", "app1"): "failed",
                        ("one", "app2"): "changed", ("two", "app1"): "skipped", ("two", "app2"): "ok"}
    for r in result.results:
        writes, apply = by_pair[(r.stage_index, r.host)], f"touch -- /{r.stage}"
        if r.outcome in (Outcome.SKIPPED, Outcome.OK):  # never began to change its host: only its end
            assert [outcome for outcome, _ in writes] == [r.outcome.value]
            continue
        [(first, before), (last, after)] = writes
        assert (first, last) == ("running", r.outcome.value)
        # its start was written after its check read the host and before its apply; its end after the apply
        assert before[-1] == f"test -e -- /{r.stage}" and apply not in before and apply in after
    # the ends of stage two's pairs that changed nothing (app1 skipped, app2 ok) share one write
    assert sorted(row[:2] for row in state.writes[-1]) == [((1, "app1"), "skipped"), ((1, "app2"), "ok")]
    journaled = {(r.stage_index, r.host): (r.outcome, r.attempts, r.message) for r in state.results("run-1")}
    assert journaled == {(r.stage_index, r.host): (r.outcome.value, r.attempts, r.message) for r in result.results}
    assert "touch -- /one" in (tmp_path / "runs/run-1/01-one-db1.log").read_text()  # each pair's commands in its log


def test_a_failed_journal_write_stops_the_run_and_no_change_starts_unrecorded(tmp_path):
    farm = Farm()
    plan = farm.plan(stage("one", "/one", strategy="serial"), stage("two", "/two"))
    # writes: db1 running, db1 end, worker1 running, worker1 end, app1 running <- fails
    result, state, recorder = journaled_run(tmp_path, farm, plan, fail_at=5)
    assert recorder.error == "cannot write the journal: disk I/O error (database or disk is full)"
    assert result.interrupted  # resumable: nothing ran that the journal does not know of
    assert outcomes(result, "one") == {"db1": "changed", "worker1": "changed"}
    assert farm.transport.host("app1").commands == ["test -e -- /one"]  # its check read, its apply never started
    assert farm.transport.host("app2").commands == []  # never started
    assert not any(command.endswith("/two") for _, command in farm.transport.commands)  # no later stage started
    assert {(r.host, r.outcome) for r in state.results("run-1")} == {("db1", "changed"), ("worker1", "changed")}


def test_a_journal_that_fails_on_a_pair_that_changes_nothing_stops_the_run_at_its_next_write(tmp_path):
    farm = Farm(files={host: {"/one"} for host in HOSTS})
    plan = farm.plan(stage("one", "/one"), stage("two", "/two"))
    # writes: stage one's four ends, together when stage two starts <- fails: no pair of stage two starts
    result, state, recorder = journaled_run(tmp_path, farm, plan, fail_at=1)
    assert recorder.error == "cannot write the journal: disk I/O error (database or disk is full)"
    assert result.interrupted
    assert not any(command.endswith("/two") for _, command in farm.transport.commands)
    # the ends that could not be written waited, and the run's last flush wrote them: nothing of what ran is lost
    assert {(r.stage, r.host, r.outcome) for r in state.results("run-1")} == {("one", host, "ok") for host in HOSTS}


def test_a_parallel_stages_starts_share_a_transaction_and_each_is_durable_before_its_apply(tmp_path):
    farm = Farm()
    plan = farm.plan(stage("one", "/one"))
    state = SQLiteState(tmp_path / "journal.sqlite")
    reader = SQLiteState(tmp_path / "journal.sqlite")  # a second connection: what another process would read
    state.start_run(RunRecord("run-1", "fast", "<fast>", "", "fake", {}, "tester", time.time()))
    lease, _ = state.acquire("fake", "run-1", "tester")
    groups: list[list[tuple[str, str]]] = []  # each transaction's pairs' rows (host, outcome)
    write_group = state._write_group

    def counted(execute: Any, group: list[Any]) -> list[str]:
        if not groups:  # the first start's transaction waits until the other hosts' starts queue behind it
            deadline = time.monotonic() + 30  # (a liveness guard: the assertions below fail after it)
            while time.monotonic() < deadline and len(state._waiting) < len(HOSTS) - 1:
                time.sleep(0.001)
        groups.append([(result.host, result.outcome) for write in group for result, _ in write.ends])
        return write_group(execute, group)

    state._write_group = counted
    seen: dict[str, tuple[str, int]] = {}

    class Durable:
        """Told after the journal that a pair's step is about to apply: its row as another connection reads it, and
        the commands its host ran by then."""

        def stage_started(self, planned: PlannedStage, hosts: list[str]) -> None: ...

        def host_started(self, planned: PlannedStage, host: str) -> None: ...

        def host_applying(self, planned: PlannedStage, host: str) -> None:
            rows = [r.outcome for r in reader.results("run-1") if r.host == host]
            seen[host] = (rows[0] if rows else "not journaled", list(farm.transport.host(host).commands))

        def host_finished(self, result: HostResult) -> None: ...

    recorder = JournalRecorder(state, "run-1", tmp_path / "runs" / "run-1", lease)
    runner = Runner(plan, farm.transport, listeners=[recorder, Durable()], run_id="run-1", sleep=lambda _: None,
                    log_dir=recorder.outputs, on_log_error=recorder.report)
    result = runner.run()
    assert not recorder.error and not result.failed
    # durable, and read by another connection, after its check and before its apply
    assert seen == dict.fromkeys(HOSTS, ("running", ["test -e -- /one"]))
    rows = [row for group in groups for row in group]
    assert sorted(rows) == sorted([(host, "running") for host in HOSTS] + [(host, "changed") for host in HOSTS])
    assert len(groups) < len(rows)  # 8 rows, fewer transactions
    [first] = groups[0]  # held until the other starts queued: the next transaction has them all (and maybe an end)
    assert {(host, "running") for host in HOSTS} - {first} <= set(groups[1])
    assert {(r.host, r.outcome) for r in reader.results("run-1")} == {(host, "changed") for host in HOSTS}


def test_a_retry_of_a_change_under_way_goes_on_and_is_journaled_to_its_end_once_the_run_stops(tmp_path):
    recorders: list[JournalRecorder] = []

    def second_check(command: str) -> Answer:
        recorders[0].report("cannot write the run log: disk full")  # a write of the run fails, between two tries
        return Answer(exited=1)

    answers = in_turn(Answer(exited=1), second_check, Answer())  # absent, absent (the run stops), then present
    farm = Farm({"db1": [("touch", in_turn(READ_ONLY, Answer())), ("test -e", answers)]})
    plan = farm.plan(stage("one", "/one", hosts=["db1"], retry={"attempts": 2, "delay": 0}))
    state = WatchedState(tmp_path / "journal.sqlite", farm.transport)
    state.start_run(RunRecord("run-1", "fast", "<fast>", "", "fake", {}, "tester", time.time()))
    lease, _ = state.acquire("fake", "run-1", "tester")
    recorders.append(JournalRecorder(state, "run-1", tmp_path / "runs" / "run-1", lease))
    runner = Runner(plan, farm.transport, listeners=recorders, run_id="run-1", sleep=lambda _: None)
    result = runner.run()
    recorders[0].flush()
    assert recorders[0].error == "cannot write the run log: disk full"
    assert outcomes(result, "one") == {"db1": "changed"}  # its second try applied: its first had begun the change
    [end] = state.results("run-1")
    assert (end.outcome, end.attempts, end.facts[UNDO_FACTS]) == ("changed", 2, {"created": "/one"})
    assert [row[:2] for row in state.rows()] == [((0, "db1"), "running"), ((0, "db1"), "changed")]  # one start
