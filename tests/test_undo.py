"""Undo of a half-done run on real lab hosts: `on_failure: undo` in a runbook, and `overhaul undo --run` by hand."""

from __future__ import annotations

import time
from pathlib import Path

from helpers import failed_upgrade, installed_version, lab_inventory, overhaul_cli, plan_for, program_states, states_by_program

from overhaul.execution import file_sha256
from overhaul.lab import faults
from overhaul.runbook import BUILTIN_RUNBOOKS
from overhaul.runner import UNDO_FACTS, HostResult
from overhaul.state import ResultRecord, RunRecord, SQLiteState
from overhaul.step import Outcome
from overhaul.undo import undo_plan

HOSTS = ("db1", "worker1", "app1")




def upgrade_runbook(folder: Path, on_failure: str) -> Path:
    """The built-in upgrade runbook, with `on_failure` set."""
    path = folder / "runbooks/upgrade.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((BUILTIN_RUNBOOKS / "upgrade.yaml").read_text() + f"on_failure: {on_failure}\n")
    return path


def test_a_package_broken_on_one_tier_is_undone_and_the_run_ends_rolled_back(fresh_lab, tmp_path):
    lab = fresh_lab(3)
    faults.publish_broken_package(lab.repo, "1.1.1", roles=("db",))
    runbook = upgrade_runbook(tmp_path, "undo")
    hosts_dir = ("--hosts-dir", str(lab.inventory.parent))
    ran = overhaul_cli(tmp_path, "run", str(runbook), "--env", "lab", "-p", "version=1.1.1", "--yes", *hosts_dir)
    assert ran.returncode == 1, ran.stdout + ran.stderr  # the upgrade failed: its undo does not make it a success
    assert "rolled back: every change this run made was taken back" in ran.stdout
    journal = SQLiteState(tmp_path / "journal.sqlite")
    [run] = journal.runs("lab")
    assert run.status == "rolled back"
    pairs = {(r.stage, r.host): r.outcome for r in journal.results(run.id)}
    # The tier that failed, and the tiers that had upgraded, all went back; what was stopped was started.
    assert {host: pairs[("upgrade package", host)] for host in HOSTS} == {"db1": "failed", "worker1": "changed",
                                                                          "app1": "changed"}
    assert {host: pairs[("undo upgrade package", host)] for host in HOSTS} == dict.fromkeys(HOSTS, "changed")
    assert {host: pairs[("undo stop services", host)] for host in HOSTS} == dict.fromkeys(HOSTS, "changed")
    assert ("undo backup database", "db1") in pairs  # kept: a backup is harmless to keep, nothing to take back
    for host in HOSTS:
        assert (installed_version(lab, host), program_states(lab, host)) == ("1.0.0", {"RUNNING"}), host
    verified = overhaul_cli(tmp_path, "verify", "--env", "lab", "--no-checks", *hosts_dir)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # Undone again by hand: nothing left to take back, nothing changes; and a rolled-back run is not resumed.
    again = overhaul_cli(tmp_path, "undo", "--run", run.id, "--yes", *hosts_dir)
    assert again.returncode == 0, again.stdout + again.stderr
    undo_pairs = [r for r in journal.results(run.id) if r.stage.startswith("undo ")]
    # Each undo pair's check found it still holds, so nothing was applied again (it keeps what it did the first time).
    assert all(r.message.startswith("(done before resume)") for r in undo_pairs if r.outcome == "changed"), undo_pairs
    assert "0 failed" in again.stdout and journal.run(run.id).status == "rolled back"
    resumed = overhaul_cli(tmp_path, "resume", "--run", run.id, *hosts_dir)
    assert resumed.returncode == 2 and "rolled back: there is nothing to resume" in resumed.stderr


def test_undo_by_hand_takes_back_a_failed_run_that_stopped(fresh_lab, tmp_path):
    lab = fresh_lab(3)
    run = failed_upgrade(lab, tmp_path)
    hosts_dir = ("--hosts-dir", str(lab.inventory.parent))
    journal = SQLiteState(tmp_path / "journal.sqlite")
    assert run.status == "failed"
    for host in HOSTS:  # half-installed, everything stopped: the night the issue is about
        assert program_states(lab, host) == {"STOPPED"}, host
    undone = overhaul_cli(tmp_path, "undo", "--run", run.id[:8], "--yes", *hosts_dir)
    assert undone.returncode == 0, undone.stdout + undone.stderr
    assert "undo upgrade package: db1 (previous 1.0.0), worker1 (previous 1.0.0), app1 (previous 1.0.0)" in undone.stdout
    assert journal.run(run.id).status == "rolled back"
    for host in HOSTS:
        assert (installed_version(lab, host), program_states(lab, host)) == ("1.0.0", {"RUNNING"}), host


def test_an_irreversible_change_refuses_the_whole_undo(lab, tmp_path):
    """Pure plan logic: a reconfigure (schema migrations) that ran blocks the undo; nothing is planned."""
    plan = plan_for((BUILTIN_RUNBOOKS / "upgrade.yaml").read_text(), tmp_path, lab_inventory(lab), {"version": "1.1.0"})
    index = {planned.stage.name: planned.index for planned in plan.stages}

    def pair(stage: str, host: str, outcome: Outcome, remembered: dict | None = None) -> HostResult:
        facts = {UNDO_FACTS: remembered} if remembered is not None else {}
        return HostResult(stage, host, outcome, "", facts=facts, stage_index=index[stage])

    stopped = [pair("stop services", "db1", Outcome.CHANGED, {"stopped": ["scalr-mysql"]}),
               pair("upgrade package", "db1", Outcome.CHANGED, {"previous": "1.0.0"})]
    undo = undo_plan(plan, stopped)
    assert not undo.blocked
    assert [(p.stage.name, p.hosts, p.index) for p in undo.plan.stages] == [
        ("undo upgrade package", ["db1"], len(plan.stages)), ("undo stop services", ["db1"], len(plan.stages) + 1)]
    migrated = undo_plan(plan, [*stopped, pair("reconfigure db", "db1", Outcome.FAILED, {})])
    assert migrated.blocked and migrated.empty
    assert "stage 4 reconfigure db (app.reconfigure) changed db1 and cannot be undone" in migrated.blocked[0]
    untouched = undo_plan(plan, [*stopped, pair("reconfigure db", "db1", Outcome.FAILED)])  # failed before its apply
    assert not untouched.blocked


HOOKED = """
name: hooked
on_failure: undo
params: {tag: x, threshold: 1}
hooks:
  before:
    - {name: maintenance on, step: shell, roles: [app], params: {command: "echo on > /root/maint-${tag}"}}
  after:
    - {name: maintenance off, step: shell, roles: [app], params: {command: "rm -f /root/maint-${tag}"}}
  on_failure:
    - {name: tell the status page, step: shell, hosts: [db1], params: {command: "echo failed >> /root/status-${tag}"}}
stages:
  - name: stop services
    step: services.stop
  - name: breaks
    step: disk.usage
    hosts: [app1]
    params: {mounts: [/], threshold: "${threshold}"}
"""


def test_hooks_run_around_the_stages_and_on_failure_after_the_undo(fresh_lab, tmp_path):
    lab = fresh_lab(3)
    runbook = tmp_path / "runbooks/hooked.yaml"
    runbook.parent.mkdir()
    runbook.write_text(HOOKED)
    args = ("run", str(runbook), "--env", "lab", "--yes", "--hosts-dir", str(lab.inventory.parent))
    app1, db1 = lab.host("app1"), lab.host("db1")

    failed = overhaul_cli(tmp_path, *args, "-p", "tag=a")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    [run] = SQLiteState(tmp_path / "journal.sqlite").runs("lab")
    ran = [r for r in SQLiteState(tmp_path / "journal.sqlite").results(run.id) if r.outcome != "skipped"]
    order = [r.stage for r in sorted(ran, key=lambda r: r.started)]
    assert list(dict.fromkeys(order)) == ["maintenance on", "stop services", "breaks", "undo stop services",
                                          "tell the status page"], order
    assert run.status == "rolled back"  # the hook is not the change: left as is; the stopped services started again
    assert app1.exec("cat /root/maint-a").stdout.strip() == "on"  # after-hooks run only when every stage passed
    assert db1.exec("cat /root/status-a").stdout.strip() == "failed"
    assert program_states(lab, "app1") == {"RUNNING"}

    passed = overhaul_cli(tmp_path, *args, "-p", "tag=b", "-p", "threshold=100")
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert app1.exec("test -e /root/maint-b", check=False).returncode == 1  # on, then off again
    assert db1.exec("test -e /root/status-b", check=False).returncode == 1  # nothing failed: the page is not told


def test_a_run_cut_off_in_the_middle_of_a_change_is_not_undone_blind(lab, tmp_path):
    """A pair left `running` (the controller died in it) journaled nothing of what it changed: undo refuses (exit 3)."""
    path = BUILTIN_RUNBOOKS / "upgrade.yaml"
    journal = SQLiteState(tmp_path / "journal.sqlite")
    journal.start_run(RunRecord("r-cut", "upgrade", str(path), file_sha256(path), "lab", {"version": "1.1.0"}, "t",
                                time.time(), status="interrupted"))
    journal.record(ResultRecord("r-cut", 1, "stop services", "db1", "changed", facts={UNDO_FACTS: {"stopped": []}}))
    journal.record(ResultRecord("r-cut", 2, "upgrade package", "db1", "running"))
    refused = overhaul_cli(tmp_path, "undo", "--run", "r-cut", "--hosts-dir", str(lab.inventory.parent))
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "cut off in the middle of upgrade package on db1" in refused.stderr
    assert "overhaul resume --run r-cut" in refused.stderr
    assert journal.run("r-cut").status == "interrupted"  # nothing started, nothing changed


def test_the_undo_of_a_stop_waits_for_a_program_a_cut_off_start_left_starting(fresh_lab):
    """A controller killed while it started programs leaves the supervisor starting one: the resumed undo's start of
    it is refused as "already started", at once. The undo waits until it settles, and its verify finds it RUNNING."""
    from overhaul.context import StepHost
    from overhaul.step import Registry
    from overhaul.transport import Transport

    lab = fresh_lab(3)
    app1 = lab.host("app1")
    conf = "/opt/scalr-server/etc/supervisor/conf.d/plotter.conf"  # (a start that takes 4 s: a window to be in)
    app1.exec(f"sed -i 's/^startsecs=1$/startsecs=4/' {conf} && scalr-server-manage update >/dev/null "
              "&& scalr-server-manage stop plotter scalr-nginx")
    step_class = Registry().get("services.stop")
    step = step_class(step_class.Params.model_validate({}))
    remembered = {"stopped": ["plotter", "scalr-nginx"]}
    inventory = lab_inventory(lab)
    transport = Transport(inventory)
    try:
        app1.exec("nohup scalr-server-manage start plotter >/dev/null 2>&1 &")  # the start left in flight
        deadline = time.monotonic() + 10
        while "STARTING" not in states_by_program(lab, "app1").get("plotter", "") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert states_by_program(lab, "app1")["plotter"] == "STARTING"
        host = StepHost(transport.host("app1"), timeout=60, run_id="settle")
        said = step.undo(host, remembered)
        host.forget()  # as the runner, after an apply: what was read before it is forgotten ...
        host.keep_reported()  # ... and what the apply read after its change is what its verify reads
        assert step.undone(host, remembered).done
    finally:
        transport.close()
    assert said == "started plotter, scalr-nginx"
    assert states_by_program(lab, "app1") == dict.fromkeys(["plotter", "scalr-httpd", "scalr-memcached",
                                                             "scalr-nginx"], "RUNNING")

