"""Every journal write of a run that holds the environment's lease is fenced by its token: once another controller
took the lease over, the old holder writes nothing more of the run (no pair's end, no status), and says so."""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest
from helpers import overhaul_cli
from test_team_state import controller, runbook, wait_for

from overhaul.state import CommandRecord, LockLost, ResultRecord, RunRecord, SQLiteState


def test_a_stale_token_writes_no_pair_end_and_no_status(tmp_path):
    state = SQLiteState(tmp_path / "journal.sqlite", lease=0.2)
    old, _ = state.acquire("lab", "r1", "laptop")
    state.start_run(RunRecord("r1", "upgrade", "", "", "lab", {}, "laptop", time.time()))
    state.start_pair(ResultRecord("r1", 0, "reconfigure db", "db1", "running", started=time.time()), "lab", old.token)
    time.sleep(0.4)  # the laptop is suspended past its lease; the CI runner takes the run over and finishes it
    new, previous = state.acquire("lab", "r1", "ci-runner")
    assert previous is not None and previous.token == old.token
    newer = ResultRecord("r1", 0, "reconfigure db", "db1", "changed", 1, 10.0, 20.0, "reconfigured by the CI runner")
    state.record(newer, fence=("lab", new.token))
    state.set_status("r1", "succeeded", 30.0, fence=("lab", new.token))
    rows, commands = state.results("r1"), state.commands("r1")

    stale = ("lab", old.token)  # the laptop wakes
    late = ResultRecord("r1", 0, "reconfigure db", "db1", "changed", 1, 1.0, 2.0, "reconfigured by the laptop")
    command = CommandRecord("r1", 0, "db1", 1.0, "scalr-server-ctl reconfigure", 0, 1.0, "/log", "laptop")
    with pytest.raises(LockLost, match="no longer holds the lease of 'lab'"):
        state.record(late, [command], fence=stale)
    with pytest.raises(LockLost):
        state.record_ends([(late, [command])], fence=stale)
    with pytest.raises(LockLost):
        state.set_status("r1", "interrupted", None, fence=stale)
    with pytest.raises(LockLost):
        state.start_pair(ResultRecord("r1", 1, "reconfigure app", "app1", "running"), *stale)
    assert state.results("r1") == rows and state.commands("r1") == commands  # nothing of the laptop's was written
    assert state.run("r1").status == "succeeded" and state.run("r1").ended == 30.0

    # A lease that merely expired (the state database was away longer than the lease) is still the run's until
    # someone takes it: the ends of what it did are written, but no new pair starts on it.
    state.release(new)
    expired, _ = state.acquire("lab", "r2", "laptop")
    state.start_run(RunRecord("r2", "upgrade", "", "", "lab", {}, "laptop", time.time()))
    time.sleep(0.4)
    state.record(ResultRecord("r2", 0, "stop services", "app1", "changed", 1, 1.0, 2.0, "stopped"),
                 fence=("lab", expired.token))
    state.set_status("r2", "failed", 40.0, fence=("lab", expired.token))
    assert state.run("r2").status == "failed" and [r.outcome for r in state.results("r2")] == ["changed"]
    with pytest.raises(LockLost):
        state.start_pair(ResultRecord("r2", 1, "upgrade package", "app1", "running"), "lab", expired.token)
    state.acquire("lab", "r3", "ci-runner")  # taken over: from now on, nothing of the laptop's is written
    with pytest.raises(LockLost):
        state.set_status("r2", "interrupted", None, fence=("lab", expired.token))
    assert state.run("r2").status == "failed" and state.run("r1").status == "succeeded"
    state.record(late)  # unfenced (a verify holds no lease): written as before
    assert [r.message for r in state.results("r1")] == ["reconfigured by the laptop"]


def test_a_controller_frozen_past_its_lease_writes_nothing_after_another_finished_the_run(lab, tmp_path, backend):
    folder = f"/tmp/overhaul-fenced-{uuid.uuid4().hex[:8]}"
    lab.host("db1").exec(f"mkdir -p {folder}")
    books = tmp_path / "runbooks"
    runbook(books, "two", f"  - {{name: first, step: shell, hosts: [db1], params: {{command: 'sleep 2 && touch "
                          f"{folder}/first', creates: {folder}/first}}}}\n"
                          f"  - {{name: second, step: shell, hosts: [db1], params: {{command: 'touch {folder}/second', "
                          f"creates: {folder}/second}}}}\n")
    common = ("--env", "lab", "--hosts-dir", str(lab.inventory.parent))
    state = backend.open()
    laptop = controller(tmp_path / "laptop", backend, "laptop", "run", "two", *common, "--runbooks-dir", str(books),
                        OVERHAUL_LOCK_LEASE="3")
    try:
        wait_for("the first pair to start", lambda: any(r.outcome == "running" for run in state.runs("lab")
                                                        for r in state.results(run.id)))
        os.kill(laptop.pid, signal.SIGSTOP)  # a suspended laptop, in the middle of stage 1
        [run] = state.runs("lab")
        wait_for("the lease to expire", lambda: not state.lock("lab").live, timeout=30)
        (tmp_path / "ci").mkdir()
        resumed = overhaul_cli(tmp_path / "ci", "resume", *common, env={**backend.env, "OVERHAUL_MACHINE_ID": "ci-runner"})
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert "took over the lock" in resumed.stderr
        assert state.run(run.id).status == "succeeded"
        rows = state.results(run.id)
        assert [r.stage for r in rows] == ["first", "second"] and {r.outcome for r in rows} <= {"ok", "changed"}
        os.kill(laptop.pid, signal.SIGCONT)  # the laptop wakes: its stage 1 command has long ended
        out, err = laptop.communicate(timeout=120)
    finally:
        if laptop.poll() is None:
            os.kill(laptop.pid, signal.SIGCONT)
            laptop.wait(timeout=60)
        lab.host("db1").exec(f"rm -rf {folder}")
    assert state.results(run.id) == rows, out + err  # not one row of the CI runner's was overwritten
    assert state.run(run.id).status == "succeeded"
    assert laptop.returncode == 130, out + err
    assert "this run lost its lease" in err and "wrote nothing more" in err
    assert f"run {run.id}: this controller lost its lease" in out
    assert "run interrupted" not in out and "resume with" not in out  # the run is not the laptop's to call
