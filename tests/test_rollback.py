"""The built-in rollback runbook on real lab hosts: back to the version before an upgrade, with its backup's data."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

from helpers import installed_version, overhaul_cli, program_states

from overhaul.state import SQLiteState

HOSTS = ("db1", "worker1", "app1")




def query(lab, sql: str) -> str:
    return lab.host("db1").exec(f"mysql -N -B -e \"{sql}\"").stdout.strip()


def test_rollback_refuses_an_altered_backup_then_restores_the_real_one_once(fresh_lab, tmp_path):
    lab = fresh_lab(3)
    hosts_dir = ("--hosts-dir", str(lab.inventory.parent))
    # Enough rows that the restore takes a moment: the controller is killed in the middle of it below.
    query(lab, "CREATE TABLE scalr.bulk (id INT PRIMARY KEY, pad CHAR(100)); "
               "INSERT INTO scalr.bulk SELECT seq, REPEAT('x', 100) FROM scalr.seq_1_to_200000")
    upgraded = overhaul_cli(tmp_path, "upgrade", "--env", "lab", "--version", "1.1.0", "--yes", *hosts_dir)
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    journal = SQLiteState(tmp_path / "journal.sqlite")
    [upgrade] = journal.runs("lab")
    results = journal.results(upgrade.id)
    backup = next(r for r in results if r.stage == "backup database").facts
    # The upgrade journaled the version each host had before it: the version to go back to.
    assert {r.host: r.facts.get("previous") for r in results if r.stage == "upgrade package"} == dict.fromkeys(HOSTS, "1.0.0")
    farms_in_backup = query(lab, "SELECT id, name FROM scalr.farms ORDER BY id")
    assert "web-prod" in farms_in_backup
    # Written after the backup: the rollback loses it, on purpose.
    query(lab, "INSERT INTO scalr.farms (name, status) VALUES ('after-backup', 'running')")
    rollback = ("run", "rollback", "--env", "lab", "-p", "version=1.0.0", "-p", f"backup={backup['path']}",
                "-p", f"backup_sha256={backup['sha256']}", "-p", f"backup_size={backup['size']}", "--yes", *hosts_dir)

    # Refused in preflight, nothing stopped, nothing downgraded: a user that may not restore (the backup user
    # only reads), and a backup altered on the host (one byte more).
    reader = overhaul_cli(tmp_path, *rollback, "-p", "restore_user=backup", "-p", "restore_secret=mysql_backup_password")
    assert reader.returncode == 3, reader.stdout + reader.stderr
    assert "'backup' cannot restore a dump: it lacks the global privileges" in " ".join(reader.stdout.split())
    db = lab.host("db1")
    db.exec(f"printf x >> {backup['path']}")
    refused = overhaul_cli(tmp_path, *rollback)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert f"backup {backup['path']} does not match the journal" in " ".join(refused.stdout.split())
    assert journal.runs("lab")[0].status == "refused"
    for host in HOSTS:
        assert (installed_version(lab, host), program_states(lab, host)) == ("1.1.0", {"RUNNING"}), host
    db.exec(f"truncate -s {backup['size']} {backup['path']}")  # the file as the upgrade left it

    # `overhaul rollback` finds all of the above in the journal, and says what is lost before it starts. SIGKILLed
    # while the restore runs (the restore goes on to its end on the host), then resumed: restored exactly once.
    environ = dict(os.environ, OVERHAUL_JOURNAL=str(tmp_path / "journal.sqlite"), PYTHONUNBUFFERED="1")
    killed = subprocess.Popen([sys.executable, "-m", "overhaul", "rollback", "--env", "lab", "--yes", *hosts_dir],
                              cwd=tmp_path, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    # the restore's `zcat "$f"` (gzip -cd FILE) is running; the proof after it reads `zcat -- FILE`, which this misses
    while db.exec(f"pgrep -f '[g]zip -cd {backup['path']}'", check=False).returncode != 0:
        assert time.monotonic() < deadline and killed.poll() is None, killed.communicate()[0]
        time.sleep(0.02)
    killed.kill()
    said = killed.communicate()[0]
    assert f"back to 1.0.0, the database restored from {backup['path']}" in said
    assert "LOST: everything written to the database after " in said
    marker = f"{backup['path']}.restored"
    while db.exec(f"test -s {marker}", check=False).returncode != 0:  # the killed controller's restore, finishing
        assert time.monotonic() < deadline
        time.sleep(0.1)
    query(lab, "INSERT INTO scalr.farms (name, status) VALUES ('after-restore', 'running')")  # a 2nd restore drops it
    resumed = overhaul_cli(tmp_path, "resume", "--env", "lab", "--yes", *hosts_dir)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "after-restore" in query(lab, "SELECT name FROM scalr.farms")
    query(lab, "DELETE FROM scalr.farms WHERE name = 'after-restore'")
    for host in HOSTS:
        assert (installed_version(lab, host), program_states(lab, host)) == ("1.0.0", {"RUNNING"}), host
    assert query(lab, "SELECT version FROM scalr.schema_version") == "1.0.0"
    assert query(lab, "SELECT id, name FROM scalr.farms ORDER BY id") == farms_in_backup  # 'after-backup' is gone
    assert query(lab, "SELECT COUNT(*) FROM information_schema.columns WHERE column_name = 'launched_at'") == "0"
    run = journal.runs("lab")[0]
    [restore] = [r for r in journal.results(run.id) if r.stage == "restore database"]
    assert restore.outcome == "ok" and restore.facts["restored_by"] == run.id  # the killed attempt's restore stands
    assert re.fullmatch(r"[1-9][0-9]* tables of the dump back, scalr.schema_version as in the dump", restore.facts["proven"])

    # The same rollback again changes nothing (the restore above is not repeated).
    again = overhaul_cli(tmp_path, "rollback", "--env", "lab", "--yes", *hosts_dir)
    assert again.returncode == 0, again.stdout + again.stderr
    run = journal.runs("lab")[0]
    assert {r.outcome for r in journal.results(run.id)} == {"ok"}
    assert query(lab, "SELECT id, name FROM scalr.farms ORDER BY id") == farms_in_backup
    verified = overhaul_cli(tmp_path, "verify", "--env", "lab", "--no-checks", *hosts_dir)
    assert verified.returncode == 0, verified.stdout + verified.stderr  # the farm is expected at 1.0.0 again
