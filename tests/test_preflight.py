"""The preflight gate on real lab hosts: nothing goes down unless everything can come back.

Each of the three ordinary mistakes (one host unreachable, a version no repository has, an empty
version) ends before any change: the right exit code, every service on every host still RUNNING, no
backup taken, and the journal holding the refused run with its reasons.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from helpers import installed_version, overhaul_cli, program_states, write

from overhaul.lab import faults
from overhaul.state import SQLiteState

HOSTS = ("db1", "worker1", "app1", "app2")


def cli(lab, cwd: Path, *args: str):
    return overhaul_cli(cwd, *args, "--hosts-dir", str(lab.inventory.parent))




def assert_untouched(lab, hosts=HOSTS, installed: str = "1.0.0") -> None:
    """Every program RUNNING, the package as it was, and no backup taken."""
    for host in hosts:
        assert program_states(lab, host) == {"RUNNING"}, host
        assert installed_version(lab, host) == installed, host
    backups = lab.host("db1").exec("ls /var/backups/overhaul 2>/dev/null | wc -l", check=False).stdout.strip()
    assert backups == "0", "a backup was taken"


def refused_run(cwd: Path) -> tuple[str, list[str]]:
    """The one run journaled in cwd: its status, and the reasons of its refusal."""
    state = SQLiteState(cwd / "journal.sqlite")
    [run] = state.runs("lab")
    return run.status, [detail for _, run_id, kind, detail in state.events("lab") if run_id == run.id and kind == "refused"]


def test_an_unreachable_host_refuses_the_run_before_anything_stops(lab, tmp_path):
    faults.stop_sshd(lab.host("app2"))
    try:
        proc = cli(lab, tmp_path, "upgrade", "--env", "lab", "--version", "1.1.0", "--yes")
    finally:
        faults.start_sshd(lab.host("app2"))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "refused: app2: unreachable: connection refused after 3 attempts" in proc.stdout
    assert "Traceback" not in proc.stderr and "paramiko" not in proc.stderr
    assert_untouched(lab)
    status, reasons = refused_run(tmp_path)
    assert status == "refused"
    assert reasons == ["app2: unreachable: connection refused after 3 attempts"]
    history = overhaul_cli(tmp_path, "history", "--env", "lab").stdout
    assert "refused" in history
    shown = overhaul_cli(tmp_path, "show", SQLiteState(tmp_path / "journal.sqlite").runs("lab")[0].id).stdout
    assert "refused: app2: unreachable: connection refused after 3 attempts" in shown


def test_a_version_no_repository_has_is_refused_by_plan_and_by_upgrade(lab, tmp_path):
    planned = cli(lab, tmp_path, "plan", "upgrade", "--env", "lab", "--param", "version=9.9.9")
    assert planned.returncode == 3, planned.stdout + planned.stderr
    assert "would change" not in planned.stdout
    reason = "stage 3 upgrade package: scalr-server 9.9.9 is not in this host's repositories (available: 1.1.0, 1.0.0)"
    for host in HOSTS:
        assert f"refused: {host}: {reason}" in planned.stdout

    proc = cli(lab, tmp_path, "upgrade", "--env", "lab", "--version", "9.9.9", "--yes")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert_untouched(lab)
    status, reasons = refused_run(tmp_path)
    assert status == "refused" and sorted(reasons) == sorted(f"{host}: {reason}" for host in HOSTS)


def test_an_empty_version_is_an_input_error_before_anything_connects(lab, tmp_path):
    for bad in ("", "   ", " 1.1.0", "1.1.0; touch /tmp/x"):
        proc = cli(lab, tmp_path, "upgrade", "--env", "lab", "--version", bad, "--yes")
        assert proc.returncode == 2, (bad, proc.stdout + proc.stderr)
        assert "--version" in proc.stderr or "params.version" in proc.stderr, proc.stderr
        assert "preflight" not in proc.stdout  # refused while reading input, not at the hosts
    assert not (tmp_path / "journal.sqlite").exists() or not SQLiteState(tmp_path / "journal.sqlite").runs("lab")
    assert_untouched(lab)


def test_a_full_backup_disk_refuses_the_upgrade_naming_the_space(fresh_lab, tmp_path):
    lab = fresh_lab(3)
    faults.fill_data(lab.host("db1"), 99)
    runbooks = tmp_path / "runbooks"
    text = Path("runbooks/upgrade.yaml").read_text().replace("backup_dir: /var/backups/overhaul",
                                                             "backup_dir: /opt/scalr-server/data/backups")
    write(runbooks / "upgrade.yaml", text)
    proc = cli(lab, tmp_path, "upgrade", "--env", "lab", "--version", "1.1.0", "--yes", "--runbooks-dir", str(runbooks))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "refused: db1: stage 1 backup database: not enough free space for /opt/scalr-server/data/backups" in proc.stdout
    assert "(data size" in proc.stdout  # a first backup is estimated from the database's data, not 1 MiB
    assert_untouched(lab, ("db1", "worker1", "app1"))


def test_skip_unreachable_leaves_the_host_out_of_the_whole_run_and_says_so(fresh_lab, tmp_path):
    lab = fresh_lab(4)
    faults.stop_sshd(lab.host("app2"))
    try:
        proc = cli(lab, tmp_path, "upgrade", "--env", "lab", "--version", "1.1.0", "--yes", "--skip-unreachable")
    finally:
        faults.start_sshd(lab.host("app2"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    top = proc.stdout.split("== stage 1")[0]
    assert "excluded from this run: app2: unreachable: connection refused after 3 attempts" in top
    for host in ("db1", "worker1", "app1"):
        assert installed_version(lab, host) == "1.1.0"
    assert installed_version(lab, "app2") == "1.0.0" and program_states(lab, "app2") == {"RUNNING"}
    state = SQLiteState(tmp_path / "journal.sqlite")
    [run] = state.runs("lab")
    assert run.status == "succeeded"
    assert [kind for _, run_id, kind, _ in state.events("lab") if run_id == run.id] == ["preflight", "excluded"]


def test_skipping_the_only_host_of_a_stage_is_refused(lab, tmp_path):
    # With app1 and app2 both unreachable, "reconfigure app" would have no host: a half upgrade. Refused.
    for host in ("app1", "app2"):
        faults.stop_sshd(lab.host(host))
    try:
        proc = cli(lab, tmp_path, "upgrade", "--env", "lab", "--version", "1.1.0", "--yes", "--skip-unreachable")
    finally:
        for host in ("app1", "app2"):
            faults.start_sshd(lab.host(host))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "stage 6 reconfigure app: no host left without app1, app2" in refused_run(tmp_path)[1][0]
    assert_untouched(lab)


def test_a_reviewed_plan_is_refused_after_a_change_by_hand_naming_the_host(lab, tmp_path):
    plan_file = tmp_path / "plan.json"
    planned = cli(lab, tmp_path, "plan", "upgrade", "--env", "lab", "--param", "version=1.1.0", "--out", str(plan_file))
    assert planned.returncode == 0, planned.stdout + planned.stderr
    saved = json.loads(plan_file.read_text())
    assert saved["params"] == {"version": "1.1.0"} and saved["environment"] == "lab"
    assert saved["stages"][2]["hosts"]["app1"]["outcome"] == "changed"
    assert saved["stages"][2]["hosts"]["app1"]["message"] == "scalr-server 1.0.0 -> 1.1.0"

    faults.fill_data(lab.host("app1"), 85)  # by hand; (a program stopped by hand is refused by the preflight)
    try:
        proc = cli(lab, tmp_path, "apply", str(plan_file), "--yes")
        assert proc.returncode == 3, proc.stdout + proc.stderr
        assert "refused: drift: app1: stage 9 disk usage: planned 'ok: " in proc.stdout
        assert "drift: db1" not in proc.stdout and "drift: app2" not in proc.stdout
    finally:
        faults.clear_data(lab.host("app1"))
    assert_untouched(lab)

    too_old = cli(lab, tmp_path, "apply", str(plan_file), "--yes", "--max-age", "0")
    assert too_old.returncode == 3 and "plan again" in too_old.stderr


def test_a_plan_whose_runbook_changed_is_refused(lab, tmp_path):
    runbooks = tmp_path / "runbooks"
    write(runbooks / "upgrade.yaml", Path("runbooks/upgrade.yaml").read_text())
    plan_file = tmp_path / "plan.json"
    common = ("--runbooks-dir", str(runbooks))
    assert cli(lab, tmp_path, "plan", "upgrade", "--env", "lab", "-p", "version=1.1.0", "--out", str(plan_file),
               *common).returncode == 0
    (runbooks / "upgrade.yaml").write_text((runbooks / "upgrade.yaml").read_text().replace("disk_threshold: 80",
                                                                                           "disk_threshold: 90"))
    proc = cli(lab, tmp_path, "apply", str(plan_file), "--yes")
    assert proc.returncode == 3
    assert f"runbook {runbooks.resolve() / 'upgrade.yaml'} changed since the plan was made" in proc.stderr
    assert_untouched(lab)


def test_a_reviewed_plan_applied_to_an_untouched_farm_runs_it(fresh_lab, tmp_path):
    lab = fresh_lab(3)
    plan_file = tmp_path / "plan.json"
    assert cli(lab, tmp_path, "plan", "upgrade", "--env", "lab", "-p", "version=1.1.0", "--out",
               str(plan_file)).returncode == 0
    proc = cli(lab, tmp_path, "upgrade", "--plan", str(plan_file), "--yes")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^run \S+ succeeded in ", proc.stdout, re.M)
    for host in ("db1", "worker1", "app1"):
        assert installed_version(lab, host) == "1.1.0" and program_states(lab, host) == {"RUNNING"}
    # The same plan again: it was applied (the journal says by which run), so it is refused as such before any
    # host is read, not reported as drift.
    again = cli(lab, tmp_path, "apply", str(plan_file), "--yes")
    [applied] = [run for run in SQLiteState(tmp_path / "journal.sqlite").runs("lab") if run.status == "succeeded"]
    assert again.returncode == 3, again.stdout + again.stderr
    assert f"refused: already applied: this plan was applied by run {applied.id} (succeeded" in again.stderr
    assert "drift" not in again.stdout + again.stderr


def test_a_protected_environment_shows_what_would_change_before_it_asks(lab, tmp_path):
    hosts = lab.inventory.parent
    text = lab.inventory.read_text().replace("environment: lab", "environment: prod")
    write(hosts / "prod.yaml", text + "policy: {protected: true}\n")
    try:
        proc = overhaul_cli(tmp_path, "upgrade", "--env", "prod", "--version", "1.1.0", "--hosts-dir", str(hosts))
    finally:
        (hosts / "prod.yaml").unlink()
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "what this run would change:" in proc.stdout
    assert "3 upgrade package: db1, worker1, app1, app2: scalr-server 1.0.0 -> 1.1.0" in proc.stdout
    assert "2 stop services: app1, app2: running: plotter RUNNING" in proc.stdout
    assert "is protected: review the above, then run with --yes" in proc.stderr
    [run] = SQLiteState(tmp_path / "journal.sqlite").runs("prod")
    assert run.status == "refused"
    assert_untouched(lab)


def test_a_refused_run_is_final_it_keeps_its_end_and_resume_says_so(lab, tmp_path):
    refused = cli(lab, tmp_path, "upgrade", "--env", "lab", "--version", "9.9.9", "--yes")
    assert refused.returncode == 3, refused.stdout + refused.stderr
    journal = SQLiteState(tmp_path / "journal.sqlite")
    [record] = journal.runs("lab")
    assert record.status == "refused" and record.ended is not None
    for how in (("--env", "lab"), ("--run", record.id)):
        resumed = cli(lab, tmp_path, "resume", *how, "--yes")
        assert resumed.returncode == 2, resumed.stdout + resumed.stderr
        assert "preflight" not in resumed.stdout  # nothing connected
    assert f"run {record.id} was refused before any change: there is nothing to resume" in resumed.stderr
    assert journal.run(record.id).status == "refused" and journal.run(record.id).ended == record.ended
    assert_untouched(lab)
