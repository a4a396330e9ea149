"""Group commit: the pairs' writes of concurrent workers share a transaction, on both state backends, while each
worker returns only once its own row is durable, each write keeps its own fence, a pair's rows keep their order, and
a failed transaction fails every one of its writers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from overhaul.state import LockLost, ResultRecord, RunRecord, State, StateError

WORKERS = 20


def watched(state: Any, fail: bool = False) -> list[int]:
    """Make `state` write down how many writes each group commit's transaction held (the list returned), and hold
    its first group until every other worker's write is queued behind it (so the next group has them all, whatever
    the threads' timing). With `fail`, every group's transaction fails as a full disk would."""
    groups: list[int] = []
    write_group = state._write_group

    def counted(execute: Callable[..., Any], group: list[Any]) -> list[str]:
        if not groups:
            queued_behind(state, WORKERS - 1)
        groups.append(len(group))
        if fail:
            raise StateError("disk I/O error (database or disk is full)")
        return write_group(execute, group)

    state._write_group = counted  # (on the instance: the backend's own method still writes)
    return groups


def queued_behind(state: Any, count: int) -> None:
    """Wait until `count` writes wait for the next group commit."""
    wait_until(lambda: len(state._waiting) >= count, state)


def wait_until(condition: Callable[[], bool], state: Any) -> None:
    """Wait until `condition` holds of `state`'s queue (read under its lock): a liveness guard of 30 s, after which
    the test's own assertions fail, not a timing assertion."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with state._turn:
            if condition():
                return
        time.sleep(0.001)


def begin(state: State) -> str:
    """A run of environment `lab` under its lease; the lease's token."""
    lease, _ = state.acquire("lab", "r1", "tester")
    state.start_run(RunRecord("r1", "upgrade", "", "", "lab", {}, "tester", time.time()))
    return lease.token


def running(host: str, stage: int = 0) -> ResultRecord:
    return ResultRecord("r1", stage, "reconfigure", host, "running", started=time.time())


def at_once(state: Any, work: Callable[[int], Any], in_order: int = 0) -> list[Any]:
    """`work(i)` for each of WORKERS threads: what each returned or raised, in order. Worker 0 first, until it commits
    the first group (held by `watched`); then workers 1 to `in_order` one by one, each once the one before is queued
    behind it; then all the others together."""
    outcomes: list[Any] = [None] * WORKERS

    def one(index: int) -> None:
        try:
            outcomes[index] = work(index)
        except Exception as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=one, args=(index,)) for index in range(WORKERS)]
    threads[0].start()
    wait_until(lambda: state._committing, state)
    for index in range(1, in_order + 1):
        threads[index].start()
        queued_behind(state, index)
    for thread in threads[in_order + 1:]:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_concurrent_workers_rows_share_transactions_and_each_is_durable_when_its_write_returns(backend):
    state, reader = backend.open(), backend.open()  # the reader: another connection (another process's view)
    token = begin(state)
    groups = watched(state)

    def start(index: int) -> str:
        state.start_pair(running(f"host{index}"), "lab", token)
        [row] = [r for r in reader.results("r1") if r.host == f"host{index}"]  # read right after it returned
        return row.outcome

    assert at_once(state, start) == ["running"] * WORKERS  # each worker's row was committed before its call returned
    assert groups == [1, WORKERS - 1]  # 20 rows, 2 transactions: the first, then all that queued behind it
    assert sorted(r.host for r in reader.results("r1")) == sorted(f"host{i}" for i in range(WORKERS))


def test_a_group_size_of_one_commits_each_write_alone(backend):
    state = backend.open()
    token = begin(state)
    state.max_group = 1  # (the path before group commit; bench/journal_overhead.py measures it)
    groups = watched(state)
    at_once(state, lambda index: state.start_pair(running(f"host{index}"), "lab", token))
    assert groups == [1] * WORKERS
    assert len(state.results("r1")) == WORKERS


def test_in_one_transaction_a_stale_fence_refuses_only_its_own_write(backend):
    state = backend.open()
    token = begin(state)
    groups = watched(state)
    stale = "0" * 32  # a token that is not the lease's (a controller the lease was taken from)

    def write(index: int) -> None:
        if index == 1:
            state.start_pair(running("late"), "lab", stale)
        elif index == 2:  # an end fenced by a stale token: refused as well
            state.record(ResultRecord("r1", 0, "reconfigure", "late", "changed", 1, 1.0, 2.0), fence=("lab", stale))
        elif index == 3:  # unfenced (a run without a lease): written
            state.record(ResultRecord("r1", 1, "verify", "unfenced", "ok", 1, 1.0, 2.0))
        else:
            state.start_pair(running(f"host{index}"), "lab", token)

    outcomes = at_once(state, write)
    assert groups == [1, WORKERS - 1]  # the stale writes shared a transaction with the others
    assert isinstance(outcomes[1], LockLost) and "not starting 'reconfigure' on late" in str(outcomes[1])
    assert isinstance(outcomes[2], LockLost) and "not writing the end of 'reconfigure' on late" in str(outcomes[2])
    assert [index for index, outcome in enumerate(outcomes) if outcome is not None] == [1, 2]
    written = {r.host for r in state.results("r1")}
    assert "late" not in written
    assert written == {"unfenced"} | {f"host{i}" for i in range(WORKERS) if i not in (1, 2, 3)}


def test_a_failed_group_transaction_fails_each_of_its_writers_with_its_own_error_and_writes_nothing(backend):
    state = backend.open()
    token = begin(state)
    groups = watched(state, fail=True)
    outcomes = at_once(state, lambda index: state.start_pair(running(f"host{index}"), "lab", token))
    assert groups == [1, WORKERS - 1]
    assert all(isinstance(outcome, StateError) and "disk I/O error" in str(outcome) for outcome in outcomes)
    assert len({id(outcome) for outcome in outcomes}) == WORKERS  # each writer its own exception
    assert state.results("r1") == []
    state.start_run(RunRecord("r2", "upgrade", "", "", "other", {}, "tester", time.time()))  # the journal goes on


def test_a_pairs_start_and_end_in_one_transaction_leave_its_end(backend):
    state = backend.open()
    token = begin(state)
    groups = watched(state)

    def write(index: int) -> None:
        if index == 1:
            state.start_pair(running("db1"), "lab", token)
        elif index == 2:  # queued after db1's start, in the same group
            state.record(ResultRecord("r1", 0, "reconfigure", "db1", "changed", 1, 1.0, 2.0, "done"),
                         fence=("lab", token))
        else:
            state.start_pair(running(f"host{index}"), "lab", token)

    assert at_once(state, write, in_order=2) == [None] * WORKERS
    assert groups == [1, WORKERS - 1]
    [db1] = [r for r in state.results("r1") if r.host == "db1"]
    assert (db1.outcome, db1.message) == ("changed", "done")


def test_many_events_of_one_kind_are_written_in_one_transaction(backend):
    """A verify's check results (one event per check and host) are one write, not one fsync'd transaction each."""
    state = backend.open()
    transactions: list[int] = []
    transaction = state._transaction

    def counted(work: Callable[..., Any]) -> Any:
        transactions.append(1)
        return transaction(work)

    state._transaction = counted
    state.add_events("lab", "check", [f"check {index}" for index in range(50)], "r1")
    state.add_events("lab", "check", [], "r1")  # nothing to write: no transaction at all
    assert len(transactions) == 1
    state._transaction = transaction
    assert [(run_id, kind, detail) for _, run_id, kind, detail in state.events("lab")] == \
        [("r1", "check", f"check {index}") for index in range(50)]
