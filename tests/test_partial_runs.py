"""A run that did not finish says so: a host it had changed and then left out (unreachable) makes it `partial`, and a
run that failed after it changed hosts names the hosts it left part-way, and the ways on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from helpers import installed_version, overhaul_cli, program_states, write

from overhaul.lab import faults
from overhaul.state import SQLiteState


def cli(lab, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return overhaul_cli(cwd, *args, "--hosts-dir", str(lab.inventory.parent))




def test_resume_skipping_a_host_the_run_stopped_ends_partial_and_a_later_resume_finishes_it(fresh_lab, tmp_path):
    lab = fresh_lab(4)
    proc = subprocess.Popen([sys.executable, "-m", "overhaul", "upgrade", "--env", "lab", "--version", "1.1.0", "--yes",
                             "--hosts-dir", str(lab.inventory.parent)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OVERHAUL_JOURNAL": str(tmp_path / "journal.sqlite")})
    state = SQLiteState(tmp_path / "journal.sqlite")
    deadline = time.monotonic() + 120
    while not any(r.stage == "upgrade package" for run in state.runs("lab") for r in state.results(run.id)):
        assert time.monotonic() < deadline and proc.poll() is None, "the upgrade never reached its package stage"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # every host is stopped by now
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    [run] = state.runs("lab")
    assert program_states(lab, "app2") == {"STOPPED"}

    faults.stop_sshd(lab.host("app2"))  # app2 stops answering while the run is paused
    try:
        partial = cli(lab, tmp_path, "resume", "--env", "lab", "--skip-unreachable")
    finally:
        faults.start_sshd(lab.host("app2"))
    assert partial.returncode == 1, partial.stdout + partial.stderr
    assert "excluded from this run: app2: unreachable" in partial.stdout
    assert f"run {run.id} partial in " in partial.stdout and "run succeeded" not in partial.stdout
    assert partial.stdout.rstrip().splitlines()[-2:] == [
        "left half-done: app2: excluded from this run as unreachable, after an earlier attempt of it had changed it",
        "once it answers, finish the run with: overhaul resume --env lab"]
    assert state.run(run.id).status == "partial"
    assert state.resumable("lab").id == run.id
    assert program_states(lab, "app2") == {"STOPPED"}  # indeed left half-done: stopped, not reconfigured
    for host in ("db1", "worker1", "app1"):
        assert installed_version(lab, host) == "1.1.0" and program_states(lab, host) == {"RUNNING"}, host

    finished = cli(lab, tmp_path, "resume", "--env", "lab")  # app2 answers again
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert f"run {run.id} succeeded in " in finished.stdout
    assert [(r.id, r.status) for r in state.runs("lab")] == [(run.id, "succeeded")]
    for host in ("db1", "worker1", "app1", "app2"):
        assert installed_version(lab, host) == "1.1.0" and program_states(lab, host) == {"RUNNING"}, host
    upgrades = lab.host("app2").exec("grep -c 'upgrade scalr-server:all 1.0.0 1.1.0' /var/log/dpkg.log").stdout
    assert upgrades.strip() == "1"


def test_an_upgrade_that_fails_after_stopping_services_names_the_hosts_down_and_the_ways_on(fresh_lab, tmp_path):
    lab = fresh_lab(3)
    faults.publish_broken_package(lab.repo, "1.1.1")  # its post-install fails on every host, after the stop
    failed = cli(lab, tmp_path, "upgrade", "--env", "lab", "--version", "1.1.1", "--yes")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    [run] = SQLiteState(tmp_path / "journal.sqlite").runs("lab")
    tail = failed.stdout.rstrip().splitlines()
    start = tail.index("left part-way by this run (what it stopped there may still be down): db1, worker1, app1")
    assert tail[start + 1:] == [
        "  db1: changed by backup database, stop services; not done: upgrade package (failed), reconfigure db",
        "  worker1: changed by stop services; not done: upgrade package (failed), reconfigure worker",
        "  app1: changed by stop services; not done: upgrade package (failed), reconfigure app",
        f"the ways on (run {run.id}):",
        "  repair the cause, then finish the run: overhaul resume --env lab",
        f"  or take back every change it made: overhaul undo --run {run.id}",
        f"  or go back to the version and data from before the upgrade (its backup): overhaul rollback --run {run.id}"]
    for host in ("db1", "worker1", "app1"):  # what it says is so: every one of them is down
        assert program_states(lab, host) == {"STOPPED"}, host


def test_a_failed_run_names_only_the_hosts_a_later_stage_left_unfinished_and_no_undo_it_cannot_do(lab, tmp_path):
    mark = f"/tmp/overhaul-partway-{uuid.uuid4().hex[:8]}"
    write(tmp_path / "runbooks" / "halfway.yaml", f"""
        name: halfway
        stages:
          - {{name: mark, step: shell, hosts: [db1, worker1, app1], params: {{command: "touch {mark}", creates: {mark}}}}}
          - {{name: break, step: shell, hosts: [app1], params: {{command: "false"}}}}
          - {{name: finish, step: shell, hosts: [db1, app1], params: {{command: "rm -f {mark}"}}}}
    """)
    try:
        failed = cli(lab, tmp_path, "run", "halfway", "--env", "lab", "--runbooks-dir", str(tmp_path / "runbooks"))
    finally:
        for host in ("db1", "worker1", "app1"):
            lab.host(host).exec(f"rm -f {mark}")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    [run] = SQLiteState(tmp_path / "journal.sqlite").runs("lab")
    tail = failed.stdout.rstrip().splitlines()
    start = tail.index("left part-way by this run (what it stopped there may still be down): db1, app1")
    assert tail[start + 1:] == [  # worker1: no later stage targets it, so the run finished with it
        "  db1: changed by mark; not done: finish",
        "  app1: changed by mark; not done: break (failed), finish",
        f"the ways on (run {run.id}):",
        "  repair the cause, then finish the run: overhaul resume --env lab",
        "  (not `overhaul undo`: stage 2 break (shell) changed app1 and cannot be undone: a shell command's effect is "
        "unknown to Overhaul; stage 1 mark (shell) changed db1, worker1, app1 and cannot be undone: a shell "
        "command's effect is unknown to Overhaul)"]  # and no backup was taken: no rollback offered


SLEEPER = """
    name: sleeper
    stages:
      - name: wait
        step: shell
        hosts: [app1]
        params: {command: "sleep 30"}
"""


def test_a_second_ctrl_c_is_journaled_as_the_operators_cut_not_a_lost_connection(lab, tmp_path):
    write(tmp_path / "runbooks/sleeper.yaml", SLEEPER)
    environ = dict(os.environ, OVERHAUL_JOURNAL=str(tmp_path / "journal.sqlite"))
    proc = subprocess.Popen([sys.executable, "-m", "overhaul", "run", "sleeper", "--env", "lab", "--yes",
                             "--hosts-dir", str(lab.inventory.parent), "--runbooks-dir", str(tmp_path / "runbooks")],
                            cwd=tmp_path, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    journal = SQLiteState(tmp_path / "journal.sqlite")
    deadline = time.monotonic() + 60
    while lab.host("app1").exec("pgrep -f '[s]leep 30'", check=False).returncode != 0:
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)  # cut now
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    [run] = journal.runs("lab")
    [pair] = [r for r in journal.results(run.id) if r.stage == "wait"]
    assert "the operator cut the connection during a command" in pair.message, pair.message
    assert "connection lost" not in pair.message
    lab.host("app1").exec("pkill -f '[s]leep 30'", check=False)
