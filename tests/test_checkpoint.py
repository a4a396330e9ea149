"""Checkpointing on real hosts: kill the controller anywhere, resume without redoing work; locks; history."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import overhaul_cli

from overhaul.state.sql import KILL_AFTER_WRITES

# Journal writes of a whole upgrade of a 3-host lab (db1, worker1, app1): the run's start and the preflight's table
# (an event, for the run's page); then each pair that changes its host writes its start ("running", before its
# step applies) and its end; the pairs that change nothing (stage 7's, whose programs the reconfigures started, and
# the read-only stages 8 and 9) are written together, one write per stage, when the next stage starts or the run
# ends; then the run's end. (Pairs' writes may share a transaction: each still counts as one write.)
STAGE_HOSTS = [1, 3, 3, 1, 1, 1, 3, 3, 3]
CHANGING = [1, 3, 3, 1, 1, 1, 0, 0, 0]  # the pairs of each stage that change their host
STAGE_WRITES = [2 * changing if changing else 1 for changing in CHANGING]
BEFORE_PAIRS = 2
TOTAL_WRITES = BEFORE_PAIRS + sum(STAGE_WRITES) + 1
BOUNDARIES = [BEFORE_PAIRS + sum(STAGE_WRITES[: i + 1]) for i in range(len(STAGE_WRITES))]  # after each stage's last
# CI runs this spread: the run's start, writes mid-stage (stage 1's start of its backup, which its apply follows;
# stage 2's second and stage 3's third write; stage 4's start), and the boundaries; `pytest -m full_sweep` runs every
# other kill point (see README), the preflight's event among them. Left to the sweep, for make test's time budget:
# the boundaries between the last three stages, which only read.
MID_STAGE = [BEFORE_PAIRS + 1, BOUNDARIES[0] + 2, BOUNDARIES[1] + 3, BOUNDARIES[2] + 1]
SAMPLE = sorted({1, *MID_STAGE, *BOUNDARIES} - {TOTAL_WRITES, BOUNDARIES[6], BOUNDARIES[7]})


def cli(lab, cwd: Path, backend, *args: str, kill_after: int | None = None) -> subprocess.CompletedProcess:
    kill = {KILL_AFTER_WRITES: str(kill_after) if kill_after is not None else ""}
    return overhaul_cli(cwd, *args, "--hosts-dir", str(lab.inventory.parent), env={**backend.env, **kill})


def upgrade_args() -> tuple[str, ...]:
    return ("upgrade", "--env", "lab", "--version", "1.1.0", "--yes")


def count(lab, host: str, command: str) -> int:
    return int(lab.host(host).exec(command, check=False).stdout.strip() or 0)


def assert_upgraded_exactly_once(lab) -> None:
    for host in ("db1", "worker1", "app1"):
        assert lab.host(host).exec("dpkg-query -W -f '${Version}' scalr-server").stdout == "1.1.0"
        states = {line.split()[1] for line in lab.host(host).exec("scalr-server-manage status").stdout.splitlines()}
        assert states == {"RUNNING"}, host
        assert count(lab, host, "grep -c ' reconfigure 1.1.0 ' /opt/scalr-server/var/log/reconfigure.log") == 1, host
        assert count(lab, host, "grep -c 'upgrade scalr-server:all 1.0.0 1.1.0' /var/log/dpkg.log") == 1, host
    assert count(lab, "db1", "ls /var/backups/overhaul/*.sql.gz | wc -l") == 1


def kill_then_resume(fresh_lab, tmp_path: Path, backend, kill_after: int) -> None:
    lab = fresh_lab(3)
    killed = cli(lab, tmp_path, backend, *upgrade_args(), kill_after=kill_after)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    state = backend.open()
    [run] = state.runs("lab")
    assert run.status == "running"  # the journal shows the crash as an unfinished run
    resumed = cli(lab, tmp_path, backend, "resume", "--env", "lab")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "took over the lock" in resumed.stderr
    assert [(r.id, r.status) for r in state.runs("lab")] == [(run.id, "succeeded")]
    assert_upgraded_exactly_once(lab)


def test_a_whole_upgrade_makes_the_expected_number_of_journal_writes(fresh_lab, tmp_path, backend):
    lab = fresh_lab(3)
    done = cli(lab, tmp_path, backend, *upgrade_args(), kill_after=TOTAL_WRITES)
    assert done.returncode == -signal.SIGKILL  # killed by the very last write: the run's end
    [run] = backend.open().runs("lab")
    assert run.status == "succeeded"
    assert len(backend.open().results(run.id)) == sum(STAGE_HOSTS)


# The embedded journal is killed at every point of SAMPLE; PostgreSQL, which shares its SQL core, at a
# spread of them (first write, mid-stage, boundaries), to keep `make test` within its time budget.
PG_SAMPLE = [1, MID_STAGE[1], MID_STAGE[2], BOUNDARIES[3], BOUNDARIES[8]]
assert set(PG_SAMPLE) <= set(SAMPLE)


@pytest.mark.parametrize(("backend", "kill_after"), [("sqlite", k) for k in SAMPLE] + [("postgresql", k) for k in PG_SAMPLE],
                         indirect=["backend"])
def test_kill_anywhere_then_resume_finishes_and_repeats_nothing(fresh_lab, tmp_path, backend, kill_after):
    kill_then_resume(fresh_lab, tmp_path, backend, kill_after)


@pytest.mark.full_sweep
@pytest.mark.parametrize("kill_after", [k for k in range(1, TOTAL_WRITES) if k not in SAMPLE])
def test_kill_at_every_other_write_then_resume(fresh_lab, tmp_path, backend, kill_after):
    kill_then_resume(fresh_lab, tmp_path, backend, kill_after)


def test_a_step_that_drifted_while_paused_is_applied_again(fresh_lab, tmp_path, backend):
    lab = fresh_lab(3)
    after_reconfigure_db = BOUNDARIES[3]
    assert cli(lab, tmp_path, backend, *upgrade_args(), kill_after=after_reconfigure_db).returncode == -signal.SIGKILL
    lab.host("db1").exec("scalr-server-manage stop scalr-crond")  # someone, by hand, while the run is paused
    resumed = cli(lab, tmp_path, backend, "resume", "--env", "lab")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    lines = [line.split() for line in resumed.stdout.splitlines() if line.startswith("   ")]
    by_host = {}
    for fields in lines:
        by_host.setdefault(fields[0], []).append(" ".join(fields[1:]))
    assert any(m.startswith("changed reconfigured for scalr-server 1.1.0") for m in by_host["db1"])
    assert any(m.startswith("changed (done before resume) backup") for m in by_host["db1"])
    assert count(lab, "db1", "grep -c ' reconfigure 1.1.0 ' /opt/scalr-server/var/log/reconfigure.log") == 2
    assert count(lab, "db1", "ls /var/backups/overhaul/*.sql.gz | wc -l") == 1


def test_a_second_upgrade_fails_at_once_naming_the_holder(lab, tmp_path, backend, tag):
    slow = tmp_path / "runbooks" / "slow.yaml"
    slow.parent.mkdir()
    # The first run holds the lock until the test lets it go (at most 2 minutes), however slow the machine is.
    go = f"/tmp/go-{tag}"
    wait = f"for i in $(seq 1200); do [ -e {go} ] && break; sleep 0.1; done; rm -f {go}"
    slow.write_text(f"name: slow\nstages:\n  - {{name: wait, step: shell, hosts: [db1], params: {{command: '{wait}'}}}}\n")
    env = dict(os.environ, **backend.env)
    first = subprocess.Popen(
        [sys.executable, "-m", "overhaul", "run", "slow", "--env", "lab", "--hosts-dir", str(lab.inventory.parent),
         "--runbooks-dir", str(slow.parent)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True,
    )
    state = backend.open()
    deadline = time.monotonic() + 60
    while state.lock("lab") is None:
        assert time.monotonic() < deadline, "the first run never took the lock"
        time.sleep(0.05)
    second = cli(lab, tmp_path, backend, *upgrade_args())
    assert second.returncode == 3  # refused before any change
    assert f"environment 'lab' is locked by {state.lock('lab').holder} (pid {first.pid}" in second.stderr
    lab.host("db1").exec(f"touch {go}")
    assert first.wait(timeout=60) == 0
    assert state.lock("lab") is None  # released at the end of the run


def test_unlock_needs_force_and_is_journaled(lab, tmp_path, backend):
    state = backend.open()
    state.acquire("lab", "run-of-a-live-process", "someone@elsewhere")  # this test process: alive
    refused = cli(lab, tmp_path, backend, *upgrade_args())
    assert refused.returncode == 3 and "locked by someone@elsewhere" in refused.stderr
    unforced = overhaul_cli(tmp_path, "unlock", "--env", "lab", env=backend.env)
    assert unforced.returncode == 2 and "add --force" in unforced.stderr
    no_reason = overhaul_cli(tmp_path, "unlock", "--env", "lab", "--force", env=backend.env)
    assert no_reason.returncode == 2 and "needs --reason" in no_reason.stderr and state.lock("lab") is not None
    forced = overhaul_cli(tmp_path, "unlock", "--env", "lab", "--force", "--reason", "the holder is gone", env=backend.env)
    assert forced.returncode == 0
    assert state.lock("lab") is None
    [(_, run_id, kind, detail)] = state.events("lab")
    assert (run_id, kind) == ("run-of-a-live-process", "force-unlock")
    assert "removed the lock of someone@elsewhere" in detail and detail.endswith(": the holder is gone")
    assert "@" in detail.split(" removed")[0]  # who removed it


def test_an_unfinished_run_blocks_a_new_upgrade_until_resumed_or_abandoned(fresh_lab, tmp_path, backend):
    lab = fresh_lab(3)
    assert cli(lab, tmp_path, backend, *upgrade_args(), kill_after=BOUNDARIES[1]).returncode == -signal.SIGKILL
    blocked = cli(lab, tmp_path, backend, *upgrade_args())
    assert blocked.returncode == 3 and "is unfinished" in blocked.stderr and "overhaul resume --env lab" in blocked.stderr
    other_version = cli(lab, tmp_path, backend, "resume", "--env", "lab", "--version", "1.2.0")
    assert other_version.returncode == 2 and "a resumed run keeps its parameters" in other_version.stderr
    [run] = backend.open().runs("lab")
    abandoned = overhaul_cli(tmp_path, "abandon", "--run", run.id, env=backend.env)
    assert abandoned.returncode == 0, abandoned.stderr
    fresh = cli(lab, tmp_path, backend, *upgrade_args())
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(fresh_lab, tmp_path, backend):
    lab = fresh_lab(3)
    env = dict(os.environ, **backend.env)
    proc = subprocess.Popen([sys.executable, "-m", "overhaul", *upgrade_args(), "--hosts-dir", str(lab.inventory.parent)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = backend.open()
    deadline = time.monotonic() + 60
    while not any(r.stage == "upgrade package" for run in state.runs("lab") for r in state.results(run.id)):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "resume with: overhaul resume --env lab" in out
    [run] = state.runs("lab")
    assert run.status == "interrupted"
    assert "running" not in {r.outcome for r in state.results(run.id)}  # every started pair was finished
    assert state.lock("lab") is None
    resumed = cli(lab, tmp_path, backend, "resume", "--env", "lab")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_upgraded_exactly_once(lab)


def test_history_and_show_tell_the_run_and_no_secret_is_journaled(fresh_lab, tmp_path, backend):
    lab = fresh_lab(3)
    assert cli(lab, tmp_path, backend, *upgrade_args()).returncode == 0
    history = overhaul_cli(tmp_path, "history", "--env", "lab", env=backend.env).stdout
    [run] = backend.open().runs("lab")
    assert run.id in history and "succeeded" in history and "upgrade" in history
    shown = overhaul_cli(tmp_path, "show", run.id, env=backend.env).stdout
    assert '"sha256": ' in shown and "/var/backups/overhaul/pre-upgrade-1.1.0-" in shown
    logs = list((tmp_path / "runs" / run.id).glob("*.log"))
    assert logs and "output: " + str(logs[0]) in shown
    password = lab.secret_file("mysql-backup").read_text().strip()
    for path in [*tmp_path.glob("journal.sqlite*"), *logs]:
        assert password.encode() not in path.read_bytes(), path
    assert password not in json.dumps(list(backend.open().export()))  # the journal, whichever backend holds it
