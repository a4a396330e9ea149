"""The upgrade and verify runbooks on real lab hosts: the vendor procedure, safely and idempotently."""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from pathlib import Path

import boto3
from helpers import lab_inventory, outcomes, overhaul_cli, run

from overhaul.lab import faults
from overhaul.plan import build_plan
from overhaul.runbook import load_runbook
from overhaul.runner import Runner
from overhaul.step import Registry
from overhaul.transport import Transport

STAGES = ["backup database", "stop services", "upgrade package", "reconfigure db", "reconfigure worker",
          "reconfigure app", "supervisor up", "services running", "disk usage"]


def upgrade(inventory, **params):
    plan = build_plan(load_runbook("upgrade"), inventory, Registry(), {"version": "1.1.0", **params})
    transport = Transport(inventory)
    try:
        return Runner(plan, transport, sleep=lambda _: None).run(), transport
    finally:
        transport.close()


def states(lab, name: str) -> set[str]:
    out = lab.host(name).exec("scalr-server-manage status", check=False).stdout
    return {line.split()[1] for line in out.splitlines()}


class ArgvSampler(threading.Thread):
    """Reads every process's command line on a host, over and over, from outside the host."""

    def __init__(self, host):
        super().__init__(daemon=True)
        self.host, self.seen, self.stop = host, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            for pid in self.host.processes():
                with contextlib.suppress(OSError):
                    self.seen.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())


def test_upgrade_takes_every_host_to_1_1_0_safely_and_a_rerun_changes_nothing(fresh_lab, tmp_path):
    lab = fresh_lab(3)
    inventory = lab_inventory(lab)
    password = lab.secret_file("mysql-backup").read_text().strip()
    sampler = ArgvSampler(lab.host("db1"))
    sampler.start()
    try:
        result, transport = upgrade(inventory)
    finally:
        sampler.stop.set()
        sampler.join()
    assert not result.failed, [(r.stage, r.host, r.message) for r in result.results if r.outcome.value == "failed"]
    assert list(dict.fromkeys(r.stage for r in result.results)) == STAGES  # in the vendor's order
    for stage in ("stop services", "upgrade package"):
        assert set(outcomes(result, stage).values()) == {"changed"}
    for host in ("db1", "worker1", "app1"):
        assert lab.host(host).exec("dpkg-query -W -f '${Version}' scalr-server").stdout == "1.1.0"
        assert states(lab, host) == {"RUNNING"}
    # The password never showed: not in any argv on the db host while it dumped, not in any output.
    assert any("mysqldump" in argv for argv in sampler.seen), "the sampler never saw the dump running"
    assert not [argv for argv in sampler.seen if password in argv]
    texts = [r.message for r in result.results]
    texts += [c.command + c.stdout + c.stderr for h in ("db1", "worker1", "app1") for c in transport.host(h).history]
    assert not [text for text in texts if password in text]

    # A second run finds everything done.
    again, _ = upgrade(inventory)
    assert {r.outcome.value for r in again.results} == {"ok"}

    # Going back is refused unless asked for.
    downgrade = """
        name: downgrade
        stages: [{name: down, step: package.upgrade, hosts: [app1], params: {version: 1.0.0}}]
    """
    refused = run(downgrade, tmp_path, inventory)
    assert [r.message for r in refused.results] == [
        "refusing to downgrade scalr-server from 1.1.0 to 1.0.0 (set allow_downgrade: true)"]

    # The backup is whole and restores: delete data, restore the dump, the data is back.
    db = lab.host("db1")
    backup = next(r for r in result.results if r.stage == "backup database").facts
    assert backup["size"] > 0 and len(backup["sha256"]) == 64
    assert db.exec(f"sha256sum {backup['path']}").stdout.split()[0] == backup["sha256"]
    db.exec("mysql -e 'DELETE FROM scalr.servers'")
    db.exec(f"zcat {backup['path']} | mysql")
    assert db.exec("mysql -N -e 'SELECT COUNT(*) FROM scalr.servers'").stdout.strip() == "3"


def test_reconfiguring_app_before_db_fails_with_the_clear_error(fresh_lab, tmp_path):
    lab = fresh_lab(3)
    result = run("""
        name: wrong order
        stages:
          - {name: stop, step: services.stop}
          - {name: upgrade, step: package.upgrade, params: {version: 1.1.0}}
          - {name: reconfigure app first, step: app.reconfigure, roles: [app]}
          - {name: reconfigure db, step: app.reconfigure, roles: [db]}
          - {name: reconfigure worker, step: app.reconfigure, roles: [worker]}
    """, tmp_path, lab_inventory(lab))
    assert outcomes(result, "reconfigure app first") == {"app1": "failed"}
    message = next(r.message for r in result.results if r.host == "app1" and r.stage == "reconfigure app first")
    assert "reconfigure the database host first" in message
    assert result.stopped_at == "reconfigure app first"
    assert outcomes(result, "reconfigure db") == {"db1": "skipped"}


def test_verify_names_the_broken_service_and_the_full_mount(lab, tmp_path):
    faults.break_service(lab.host("app2"), "scalr-nginx")
    faults.fill_data(lab.host("worker1"), 85)
    try:
        proc = verify_builtin(lab, tmp_path)
    finally:
        faults.repair_service(lab.host("app2"), "scalr-nginx")
        faults.clear_data(lab.host("worker1"))
    assert proc.returncode == 1
    failures = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failures) == 2, proc.stdout
    assert failures[0] == "FAILED services running on app2: not RUNNING: scalr-nginx FATAL"
    assert failures[1].startswith("FAILED disk usage on worker1: /opt/scalr-server/data at ")
    assert "(threshold 80%)" in failures[1]


def verify_builtin(lab, cwd):
    """`overhaul verify` from a folder without checks/: the built-in verify runbook only."""
    return overhaul_cli(cwd, "verify", "--env", "lab", "--hosts-dir", str(lab.inventory.parent))


def test_verify_passes_on_a_healthy_farm(lab, tmp_path):
    proc = verify_builtin(lab, tmp_path)
    assert proc.returncode == 0, proc.stdout
    assert "verify: 16 passed, 0 failed, 0 skipped" in proc.stdout  # 4 checks x 4 hosts


def test_a_full_backup_disk_stops_the_upgrade_before_anything_is_stopped(fresh_lab):
    lab = fresh_lab(3)
    faults.fill_data(lab.host("db1"), 99)
    result, _ = upgrade(lab_inventory(lab), backup_dir="/opt/scalr-server/data/backups")
    assert outcomes(result, "backup database") == {"db1": "failed"}
    assert "not enough free space for /opt/scalr-server/data/backups" in result.results[0].message
    assert result.stopped_at == "backup database"
    assert set(outcomes(result, "stop services").values()) == {"skipped"}
    for host in ("db1", "worker1", "app1"):
        assert states(lab, host) == {"RUNNING"}


def test_a_broken_package_stops_the_run_at_the_package_stage(fresh_lab):
    lab = fresh_lab(3)
    faults.publish_broken_package(lab.repo, "1.1.1")
    result, _ = upgrade(lab_inventory(lab), version="1.1.1")
    assert result.stopped_at == "upgrade package"
    assert set(outcomes(result, "upgrade package").values()) == {"failed"}
    message = next(r.message for r in result.results if r.stage == "upgrade package")
    assert "apt could not install scalr-server 1.1.1" in message
    assert "post-installation script" in message
    assert set(outcomes(result, "reconfigure db").values()) == {"skipped"}


def test_a_backup_copy_in_s3_matches_and_a_rerun_uploads_nothing(lab, aws, tmp_path):
    url, _, _ = aws
    s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=url)
    s3.create_bucket(Bucket="backups")
    folder = f"/var/backups/overhaul-s3-{tmp_path.name}"
    runbook = f"""
        name: backup to s3
        stages:
          - name: backup
            step: mysql.backup
            roles: [db]
            params: {{label: s3test, backup_dir: {folder}, s3_bucket: backups, s3_prefix: lab/,
                      s3_endpoint_url: "{url}", s3_region: us-east-1}}
    """
    try:
        first = run(runbook, tmp_path, lab_inventory(lab))
        assert [(r.outcome.value, r.message.split(";")[-1].strip()) for r in first.results] == [
            ("changed", f"copied to s3://backups/lab/{first.results[0].facts['path'].rsplit('/', 1)[-1]}")]
        facts = first.results[0].facts
        head = s3.head_object(Bucket="backups", Key="lab/" + facts["path"].rsplit("/", 1)[-1])
        assert head["ContentLength"] == facts["size"] and head["Metadata"]["sha256"] == facts["sha256"]
        body = s3.get_object(Bucket="backups", Key="lab/" + facts["path"].rsplit("/", 1)[-1])["Body"].read()
        assert hashlib.sha256(body).hexdigest() == facts["sha256"]
        second = run(runbook, tmp_path, lab_inventory(lab))
        assert [r.outcome.value for r in second.results] == ["ok"]
        assert len(s3.list_objects_v2(Bucket="backups")["Contents"]) == 1
    finally:
        lab.host("db1").exec(f"rm -rf {folder}")


def test_retention_keeps_the_newest_backups_of_the_label(fresh_lab, tmp_path):
    lab = fresh_lab(1)
    runbook = """
        name: backups
        stages:
          - {name: backup, step: mysql.backup, roles: [db], params: {label: LABEL, keep: 2, max_age_hours: 0.0001}}
    """
    for label in ("nightly", "nightly", "other", "nightly"):  # max_age 0.36 s: each run dumps anew
        result = run(runbook.replace("LABEL", label), tmp_path, lab_inventory(lab))
        assert [r.outcome.value for r in result.results] == ["changed"]
        time.sleep(1.1)  # distinct timestamps
    kept = lab.host("db1").exec("cd /var/backups/overhaul && ls -1t *.sql.gz").stdout.split()
    assert [name.split("-")[0] for name in kept] == ["nightly", "other", "nightly"]  # the oldest nightly went


def test_a_backup_a_rollback_restored_is_never_reused_as_a_fresh_one(lab, tmp_path, tag):
    """After a rollback restored it, the database has moved on: an upgrade soon after must dump again (found in review:
    the reused file, already marked restored, made that upgrade's own rollback restore nothing)."""
    runbook = f"""
        name: backup only
        stages:
          - {{name: backup, step: mysql.backup, roles: [db], params: {{label: reuse-{tag}, backup_dir: /var/backups/r-{tag}}}}}
    """
    try:
        first = run(runbook, tmp_path, lab_inventory(lab))
        assert [r.outcome.value for r in first.results] == ["changed"]
        assert [r.outcome.value for r in run(runbook, tmp_path, lab_inventory(lab)).results] == ["ok"]  # fresh: reused
        lab.host("db1").exec(f"echo someone > {first.results[0].facts['path']}.restored")
        again = run(runbook, tmp_path, lab_inventory(lab))
        assert [r.outcome.value for r in again.results] == ["changed"]
        assert again.results[0].facts["path"] != first.results[0].facts["path"]
    finally:
        lab.host("db1").exec(f"rm -rf /var/backups/r-{tag}")
