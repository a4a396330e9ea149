"""The way back reasons over an environment's whole history, not one run's journal nor a window of recent runs.

On the lab, each as the sequence of runs that broke it: a rollback after a no-op re-run, of an upgrade that relied on
an earlier run's backup; an undo of a run that a later run superseded; an undo killed half-way, continued. On both
state backends: thousands of journaled verify runs after an upgrade do not make the environment forget it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
from helpers import failed_upgrade, installed_version, overhaul_cli, program_states, write

from overhaul.errors import OverhaulError
from overhaul.history import History, find_run
from overhaul.state import ResultRecord, RunRecord, SQLiteState

HOSTS = ("db1", "worker1", "app1")




BACKUP_ONLY = """
    name: backup-only
    stages:
      - name: backup database
        step: mysql.backup
        roles: [db]
        params: {label: pre-upgrade-1.1.0, backup_dir: /var/backups/overhaul, password_secret: mysql_backup_password}
"""


def test_rollback_after_a_no_op_re_run_takes_back_the_real_upgrade_from_the_backup_it_relied_on(fresh_lab, tmp_path):
    lab = fresh_lab(3)
    hosts_dir = ("--hosts-dir", str(lab.inventory.parent))
    journal = SQLiteState(tmp_path / "journal.sqlite")
    # A backup taken by hand first (its own run), then the upgrade, which finds it fresh and relies on it.
    write(tmp_path / "runbooks/backup-only.yaml", BACKUP_ONLY)
    backed_up = overhaul_cli(tmp_path, "run", "backup-only", "--env", "lab", "--yes", "--runbooks-dir",
                             str(tmp_path / "runbooks"), *hosts_dir)
    assert backed_up.returncode == 0, backed_up.stdout + backed_up.stderr
    [backup_run] = journal.runs("lab")
    time.sleep(2)  # the upgrade's times differ from the dump's by seconds that show
    upgraded = overhaul_cli(tmp_path, "upgrade", "--env", "lab", "--version", "1.1.0", "--yes", *hosts_dir)
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    upgrade = journal.runs("lab")[0]
    [relied] = [r for r in journal.results(upgrade.id) if r.stage == "backup database"]
    assert relied.outcome == "ok" and f"-{backup_run.id}.sql.gz" in relied.facts["path"]
    # The "make sure" reflex: the same upgrade again changes nothing. It must not become the run rollback picks.
    again = overhaul_cli(tmp_path, "upgrade", "--env", "lab", "--version", "1.1.0", "--yes", *hosts_dir)
    assert again.returncode == 0 and "0 changed" in again.stdout, again.stdout + again.stderr

    dumped = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(History(journal, "lab").rollback_source().backup.taken))
    assert dumped <= time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(upgrade.started))
    # No terminal, no --yes: it says everything, then refuses (exit 3) with nothing changed.
    asked = overhaul_cli(tmp_path, "rollback", "--env", "lab", *hosts_dir)
    assert asked.returncode == 3, asked.stdout + asked.stderr
    said = " ".join(asked.stdout.split())
    assert f"rollback of run {upgrade.id} (upgrade to 1.1.0): back to 1.0.0" in said
    assert f"dumped {dumped} by run {backup_run.id}" in said
    assert f"LOST: everything written to the database after {dumped} (the dump's start)." in said
    assert "rollback asks first, on every environment: review the above, then run with --yes" in asked.stderr
    for host in HOSTS:
        assert (installed_version(lab, host), program_states(lab, host)) == ("1.1.0", {"RUNNING"}), host

    rolled = overhaul_cli(tmp_path, "rollback", "--env", "lab", "--yes", *hosts_dir)
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    for host in HOSTS:
        assert (installed_version(lab, host), program_states(lab, host)) == ("1.0.0", {"RUNNING"}), host
    assert History(journal, "lab").expected_version() == "1.0.0"
    # The built-in verify checks every host's version against the one the journal expects.
    verified = overhaul_cli(tmp_path, "verify", "--env", "lab", "--no-checks", *hosts_dir)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    journal.event("lab", "rebuilt", "1.2.0")  # the journal says the farm was rebuilt at 1.2.0: the hosts disagree
    wrong = overhaul_cli(tmp_path, "verify", "--env", "lab", "--no-checks", *hosts_dir)
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    assert "scalr-server 1.0.0, expected 1.2.0" in wrong.stdout


MAINTENANCE = """
    name: maintenance
    stages:
      - name: stop services
        step: services.stop
        hosts: [app1]
      - name: breaks
        step: disk.usage
        hosts: [app1]
        params: {mounts: [/], threshold: 1}
"""

MARK = """
    name: mark
    stages:
      - name: mark
        step: shell
        hosts: [app1]
        params: {command: "touch /root/marked", creates: /root/marked}
"""


def test_undo_asks_first_and_refuses_a_run_a_later_run_superseded(fresh_lab, tmp_path):
    lab = fresh_lab(3)
    common = ("--env", "lab", "--yes", "--hosts-dir", str(lab.inventory.parent), "--runbooks-dir",
              str(tmp_path / "runbooks"))
    write(tmp_path / "runbooks/maintenance.yaml", MAINTENANCE)
    write(tmp_path / "runbooks/mark.yaml", MARK)
    journal = SQLiteState(tmp_path / "journal.sqlite")
    failed = overhaul_cli(tmp_path, "run", "maintenance", *common)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    [old] = journal.runs("lab")
    assert program_states(lab, "app1") == {"STOPPED"}

    # Not protected, no terminal, no --yes: it says what it would do (and what each host had), then refuses.
    asked = overhaul_cli(tmp_path, "undo", "--run", old.id, "--hosts-dir", str(lab.inventory.parent))
    assert asked.returncode == 3, asked.stdout + asked.stderr
    assert re.search(r"undo stop services: app1 \(stopped [a-z-]+", asked.stdout), asked.stdout
    assert "undo asks first, on every environment" in asked.stderr
    assert program_states(lab, "app1") == {"STOPPED"} and journal.run(old.id).status == "failed"

    marked = overhaul_cli(tmp_path, "run", "mark", *common)  # a later run changes app1
    assert marked.returncode == 0, marked.stdout + marked.stderr
    assert f"note: the last run of 'lab', {old.id} (maintenance), is failed" in marked.stderr  # named, not hidden
    later = journal.runs("lab")[0]
    refused = overhaul_cli(tmp_path, "undo", "--run", old.id, "--yes", "--hosts-dir", str(lab.inventory.parent))
    assert refused.returncode == 3, refused.stdout + refused.stderr
    message = " ".join(refused.stderr.split())
    assert f"run {old.id} was superseded: run {later.id} changed app1 after it" in message
    assert "nothing was undone" in message  # and no rollback offered: no upgrade of this farm changed a package
    assert "none in the journal (no upgrade that changed a package): repair by hand" in message
    assert program_states(lab, "app1") == {"STOPPED"} and journal.run(old.id).status == "failed"
    assert [r.id for r in journal.runs("lab")] == [later.id, old.id]  # no run was started for the refused undo
    lab.host("app1").exec("scalr-server-manage start all")


def test_an_undo_killed_half_way_is_continued_by_undo_then_resume_each_change_taken_back_once(fresh_lab, tmp_path):
    lab = fresh_lab(3)
    run = failed_upgrade(lab, tmp_path)
    hosts_dir = ("--hosts-dir", str(lab.inventory.parent))
    journal = SQLiteState(tmp_path / "journal.sqlite")
    environ = dict(os.environ, OVERHAUL_JOURNAL=str(tmp_path / "journal.sqlite"))
    undo = [sys.executable, "-m", "overhaul", "undo", "--run", run.id, "--yes", *hosts_dir]
    for kill_after in (5, 9):  # in the middle of its first undo stage, then of its second
        killed = subprocess.run(undo, cwd=tmp_path, env={**environ, "OVERHAUL_TEST_KILL_AFTER_WRITES": str(kill_after)},
                                capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
        assert killed.returncode == -9, killed.stdout + killed.stderr
        assert journal.run(run.id).status == "running"
    resumed = overhaul_cli(tmp_path, "resume", "--run", run.id, "--yes", *hosts_dir)  # resume continues the undo
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"run {run.id} was being undone: continuing its undo" in resumed.stdout
    assert journal.run(run.id).status == "rolled back"
    for host in HOSTS:
        assert (installed_version(lab, host), program_states(lab, host)) == ("1.0.0", {"RUNNING"}), host
        # Installed back once: dpkg's own log on the host has one install of 1.0.0 after the run's start.
        log = lab.host(host).exec("cat /var/log/dpkg.log", check=False).stdout.splitlines()
        installs = [line for line in log if re.search(r" (upgrade|install) scalr-server:\S+ \S+ 1\.0\.0$", line)]
        assert len(installs) - 1 == 1, (host, installs)  # (the lab's own install of 1.0.0, then the undo's)


def test_thousands_of_verify_runs_after_an_upgrade_do_not_hide_it(backend):
    """5,000 verify runs journaled after an upgrade and a rollback: the environment still knows both."""
    state = backend.open()
    state.migrate()
    now = time.time() - 100_000
    upgrade = RunRecord("20261201T000000-aaaaaa", "upgrade", "/r/upgrade.yaml", "0" * 64, "staging",
                        {"version": "1.1.0"}, "me", now, now + 60, "succeeded")
    rerun = RunRecord("20261201T000200-bbbbbb", "upgrade", "/r/upgrade.yaml", "0" * 64, "staging",
                      {"version": "1.1.0"}, "me", now + 120, now + 150, "succeeded")
    for record in (upgrade, rerun):
        state.start_run(record)
    backup = {"path": f"/b/pre-upgrade-1.1.0-20261201T000000Z-{upgrade.id}.sql.gz", "size": 10, "sha256": "a" * 64}
    state.record(ResultRecord(upgrade.id, 0, "backup database", "db1", "changed", 1, now, now + 1, "", "", backup))
    state.record(ResultRecord(upgrade.id, 2, "upgrade package", "db1", "changed", 1, now, now + 2, "", "",
                              {"version": "1.1.0", "previous": "1.0.0"}))
    state.record(ResultRecord(rerun.id, 2, "upgrade package", "db1", "ok", 1, now, now + 2, "", "", {"version": "1.1.0"}))
    rows = [{"table": "runs", "row": {"id": f"20261202T{n:06d}-{n:06x}", "runbook": "verify", "runbook_path": "/r/v.yaml",
                                      "runbook_sha256": "0" * 64, "environment": "staging", "params": "{}",
                                      "operator": "monitor", "started": now + 200 + n, "ended": now + 201 + n,
                                      "status": "succeeded", "mutating": False}} for n in range(5000)]
    assert state.import_rows(rows) == 5000
    history = History(state, "staging")
    assert history.passed("1.1.0") == [now + 150, now + 60]
    assert history.expected_version() == "1.1.0"
    source = history.rollback_source()
    assert (source.upgrade.id, source.version, source.backup.taken_by) == (upgrade.id, "1.0.0", upgrade.id)
    assert find_run(state, rerun.id[:17]).id == rerun.id
    # The no-op re-run changed nothing: it supersedes nothing. A later run that changed db1 does, whatever came between.
    assert history.superseded(upgrade, {"db1", "app1"}) == {}
    later = RunRecord("20261203T000000-cccccc", "upgrade", "/r/upgrade.yaml", "0" * 64, "staging",
                      {"version": "1.2.0"}, "me", now + 90_000, None, "failed")
    state.start_run(later)
    state.record(ResultRecord(later.id, 1, "stop services", "db1", "changed", 1, now, now + 2, "", "", {}))
    assert history.superseded(upgrade, {"db1", "app1"}) == {later.id: ["db1"]}
    # An upgrade that was undone (rolled back) left nothing to roll back: it is never the one picked.
    state.record(ResultRecord(later.id, 2, "upgrade package", "db1", "changed", 1, now, now + 2, "", "",
                              {"version": "1.2.0", "previous": "1.1.0"}))
    state.set_status(later.id, "rolled back", now + 90_100)
    assert history.rollback_source().upgrade.id == upgrade.id and history.rollback_source().already is None
    # Once rolled back (its backup restored), a repeat says so instead of a loss that will not happen.
    rollback = RunRecord("20261204T000000-dddddd", "rollback", "/r/rollback.yaml", "0" * 64, "staging",
                         {"version": "1.0.0", "backup": backup["path"]}, "me", now + 95_000, now + 95_060, "succeeded")
    state.start_run(rollback)
    source = history.rollback_source()
    assert source.already is not None and source.already.id == rollback.id
    assert source.lost().startswith(f"Already rolled back by run {rollback.id}: the backup was restored then")
    assert history.expected_version() == "1.0.0"
    with pytest.raises(OverhaulError, match="no run"):  # a prefix is matched as written, on both backends
        find_run(state, rerun.id[:9].lower())
    # A farm rebuilt since (new hosts, new disks): the upgrades before it have nothing left to roll back.
    state.event("staging", "rebuilt", "1.0.0")
    with pytest.raises(OverhaulError, match="no upgrade of 'staging' changed a package since it was rebuilt "):
        history.rollback_source()
    with pytest.raises(OverhaulError, match=f"run {upgrade.id} is older than the rebuild of 'staging'"):
        history.rollback_source(upgrade)
