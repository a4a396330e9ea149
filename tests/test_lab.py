"""The lab's hosts are real: SSH with strict host keys, supervisord, MariaDB, apt, and faults that bite."""

from __future__ import annotations

import gzip
import os
import socket
import stat
import subprocess
from pathlib import Path

import paramiko
import pytest
from helpers import PROCESS_OCTET, overhaul_cli

from overhaul.inventory import load_inventory_file
from overhaul.lab import Lab, faults
from overhaul.lab.host import CAPABILITIES
from overhaul.lab.lab import LabInputError, farm_layout, synthetic_subnet
from overhaul.proc import process_state

PROGRAMS = {
    "db": {"scalr-mysql", "scalr-crond"},
    "worker": {"dbqueue", "workflow-engine", "msgsender", "poller", "scalr-crond"},
    "app": {"scalr-httpd", "scalr-nginx", "scalr-memcached", "plotter"},
}


def states(output: str) -> dict[str, str]:
    """program -> STATE from supervisorctl status lines."""
    return {line.split()[0]: line.split()[1] for line in output.splitlines() if line.strip()}


def test_farm_layout_has_one_db_one_worker_and_app_hosts():
    layout = farm_layout(5, "127.9.0")
    assert [(h.name, h.role, h.address) for h in layout] == [
        ("db1", "db", "127.9.0.1"), ("worker1", "worker", "127.9.0.2"),
        ("app1", "app", "127.9.0.3"), ("app2", "app", "127.9.0.4"), ("app3", "app", "127.9.0.5"),
    ]


def test_each_lab_subnet_gets_a_synthetic_farm_subnet_of_its_own():
    labs = [f"127.{a}.{b}" for a in range(256) for b in range(255)]  # every subnet a lab may take
    farms = {lab: synthetic_subnet(lab) for lab in labs}
    assert len(set(farms.values())) == len(labs)  # two labs never share a farm
    assert farms["127.82.0"] == "127.82.255" and farms["127.81.0"] == "127.81.255" and farms["127.10.0"] == "127.10.255"
    for lab, farm in farms.items():
        assert not farm.endswith(".0"), lab  # never a 127.A.0, where people start labs (127.10.0, 127.82.0, ...)
        assert farm != lab and Lab(subnet=farm, synthetic=False).subnet == farm  # a loopback subnet a farm can use


def test_a_farms_subnet_is_refused_as_a_labs_but_taken_by_a_synthetic_run():
    with pytest.raises(LabInputError, match=r"subnet 127\.5\.255 is kept for the synthetic farm of the lab on 127\.5\.0"):
        Lab(subnet="127.5.255")
    assert Lab(subnet="127.5.255", synthetic=False).synthetic_subnet is None


@pytest.mark.parametrize("subnet", ["10.0.0", "192.168.1", "127.0", "127.1.2.3", "127.300.0", "127.1.x"])
def test_lab_refuses_addresses_outside_loopback(subnet):
    with pytest.raises(ValueError, match=r"127\.0\.0\.0/8"):
        Lab(subnet=subnet)


def test_lab_up_takes_a_subnet_and_refuses_one_outside_loopback(tmp_path):
    where = ("--home", str(tmp_path / "lab"), "--inventory", str(tmp_path / "hosts/lab.yaml"))
    refused = overhaul_cli(tmp_path, "lab.up", "--subnet", "10.1.2", *where)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "subnet must be three octets inside 127.0.0.0/8" in refused.stderr and "Traceback" not in refused.stderr
    farms = overhaul_cli(tmp_path, "lab.up", "--subnet", "127.28.255", *where)
    assert farms.returncode == 2 and "is kept for the synthetic farm of the lab on 127.28.0" in farms.stderr, farms.stderr
    assert not (tmp_path / "lab").exists()
    subnet = f"127.28.{PROCESS_OCTET}"
    try:
        started = overhaul_cli(tmp_path, "lab.up", "--hosts", "1", "--subnet", subnet, *where)
        assert started.returncode == 0, started.stdout + started.stderr
        assert ["db1", "db", f"{subnet}.1", "yes", "answers"] in [line.split() for line in started.stdout.splitlines()]
        assert f"address: {subnet}.1" in (tmp_path / "hosts/lab.yaml").read_text()
        written = load_inventory_file(tmp_path / "hosts/lab.yaml").synthetic
        assert written is not None and written.lab_subnet == f"127.28.{255 - PROCESS_OCTET}"
        assert f"hosts of its own on 127.28.{255 - PROCESS_OCTET}.1 and up" in started.stdout, started.stdout
        elsewhere = overhaul_cli(tmp_path, "lab.up", "--hosts", "1", "--subnet", "127.27.0", *where)
        assert elsewhere.returncode == 2 and f"a lab of 1 hosts ({subnet}.1, ...) is already here" in elsewhere.stderr
    finally:
        assert overhaul_cli(tmp_path, "lab.down", *where).returncode == 0


# -- what a lab host is kept from (docs/lab.md, "What the lab isolates") -----------------------------------------

CAPABILITY_BITS = {"chown": 0, "dac_override": 1, "fowner": 3, "fsetid": 4, "kill": 5, "setgid": 6, "setuid": 7,
                   "net_bind_service": 10, "sys_chroot": 18, "audit_write": 29}  # linux/capability.h
DROPPED_BITS = {"net_admin": 12, "net_raw": 13, "sys_module": 16, "sys_rawio": 17, "sys_ptrace": 19, "sys_admin": 21,
                "sys_boot": 22, "sys_time": 25, "mknod": 27, "syslog": 34}


def test_the_lab_home_and_its_secrets_are_private(lab):
    assert stat.S_IMODE(lab.home.stat().st_mode) == 0o700
    for path in (lab.key_file, lab.secret_file("mysql-app"), lab.secret_file("mysql-backup")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_a_host_has_a_minimal_dev_of_its_own(lab, shell):
    session = shell(lab, "app1")
    code, out, _ = session.run("ls -A /dev")
    assert code == 0
    assert set(out.split()) == {"null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm",
                                "fd", "stdin", "stdout", "stderr"}
    # Its own devpts: the machine's terminals are not there, and a session can still have a pty.
    assert session.run("stat -f -c %T /dev/pts && ls /dev/pts")[1].split() == ["devpts", "ptmx"]
    channel = session.client.get_transport().open_session()
    channel.get_pty()
    channel.exec_command("tty")
    assert channel.makefile().read().decode().strip().startswith("/dev/pts/")


def test_a_host_keeps_only_the_capabilities_it_needs(lab, shell):
    session = shell(lab, "db1")
    for pid in ("1", "self"):  # the host's init, and a root login's shell
        fields = dict(line.split(":\t") for line in session.run(f"cat /proc/{pid}/status")[1].splitlines() if "\t" in line)
        bounding = int(fields["CapBnd"], 16)
        assert bounding == sum(1 << CAPABILITY_BITS[name] for name in CAPABILITIES), hex(bounding)
        assert not any(bounding & (1 << bit) for bit in DROPPED_BITS.values())
    code, _, err = session.run("mount -t tmpfs none /mnt")
    assert code != 0 and "permission denied" in err
    code, _, err = session.run("echo 3 > /proc/sys/vm/drop_caches")
    assert code != 0 and "Read-only file system" in err


def test_a_host_has_its_own_namespaces_but_the_machines_network(lab):
    host = lab.host("app2")
    own = {kind for kind in ("mnt", "pid", "uts", "ipc", "net", "user", "cgroup")
           if os.readlink(f"/proc/{host.pid}/ns/{kind}") != os.readlink(f"/proc/self/ns/{kind}")}
    assert own == {"mnt", "pid", "uts", "ipc"}  # docs/lab.md says what sharing the rest means


def test_root_in_a_host_cannot_reach_the_machines_files(lab, shell):
    # The classic chroot escape: chroot into a subfolder, walk up past the root, chroot there. With
    # pivot_root and the machine's root unmounted, walking up ends at the host's own root.
    escape = ("import os; os.makedirs('/tmp/escape', exist_ok=True); os.chroot('/tmp/escape'); "
              "[os.chdir('..') for _ in range(64)]; os.chroot('.'); "
              f"print(os.path.exists({str(lab.key_file)!r}), os.path.exists('/.overhaul-complete'))")
    code, out, err = shell(lab, "worker1").run(f'python3 -c "{escape}"')
    assert (code, out.split()) == (0, ["False", "True"]), err


def test_every_host_answers_ssh_with_strict_host_keys(lab, shell):
    for host in lab.hosts():
        code, out, _ = shell(lab, host.name).run("hostname")
        assert (code, out.strip()) == (0, host.name)


def test_an_unknown_host_key_is_refused(lab, tmp_path):
    client = paramiko.SSHClient()
    (tmp_path / "known_hosts").write_text("")
    client.load_host_keys(str(tmp_path / "known_hosts"))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        client.connect(lab.host("app1").spec.address, username="root", key_filename=str(lab.key_file),
                       look_for_keys=False, allow_agent=False, timeout=5)


def test_inventory_points_at_the_hosts(lab):
    text = lab.inventory.read_text()
    for host in lab.hosts():
        assert f"address: {host.spec.address}" in text
        assert f"roles: [{host.spec.role}]" in text
    assert "mysql_backup_password: {file: " in text
    assert lab.secret_file("mysql-backup").read_text().strip() not in text


def test_every_program_is_running_under_the_application_supervisor(lab, shell):
    for host in lab.hosts():
        session = shell(lab, host.name)
        code, out, _ = session.run("scalr-server-manage status")
        assert code == 0, out
        assert states(out) == dict.fromkeys(PROGRAMS[host.spec.role], "RUNNING")
        assert session.run("service scalr status")[1].strip() == "scalr is running"


def test_version_1_0_0_is_installed_from_the_local_repository(lab, shell):
    for host in lab.hosts():
        code, out, _ = shell(lab, host.name).run("dpkg-query -W -f '${Version}' scalr-server")
        assert (code, out) == (0, "1.0.0")


def test_the_database_answers_and_a_full_dump_is_a_valid_archive(lab, shell):
    db = shell(lab, "db1")
    code, out, _ = db.run("mysql -N -e 'SELECT version FROM scalr.schema_version; SELECT COUNT(*) FROM scalr.servers'")
    assert code == 0 and out.split() == ["1.0.0", "3"]
    # The backup account's password reaches mysqldump in a file, never on the command line.
    password = lab.secret_file("mysql-backup").read_text().strip()
    db.run("umask 077 && cat > /root/backup.cnf", stdin=f"[client]\nuser=backup\npassword={password}\n")
    code, _, err = db.run(
        "mysqldump --defaults-extra-file=/root/backup.cnf --all-databases --single-transaction | gzip > /tmp/all.sql.gz"
        " && gzip -t /tmp/all.sql.gz && rm /root/backup.cnf"
    )
    assert code == 0, err
    sftp = db.client.open_sftp()
    with sftp.open("/tmp/all.sql.gz", "rb") as remote:
        dump = gzip.decompress(remote.read()).decode()
    assert "CREATE TABLE `servers`" in dump and "web-prod" in dump
    assert dump.rstrip().splitlines()[-1].startswith("-- Dump completed")


def test_the_data_mount_is_a_small_filesystem_of_its_own(lab, shell):
    code, out, _ = shell(lab, "app1").run("df --output=target,size /opt/scalr-server/data | tail -1")
    mount, size_k = out.split()
    assert (code, mount) == (0, "/opt/scalr-server/data")
    assert int(size_k) == 64 * 1024


def test_reconfigure_order_is_enforced_by_a_real_failure(fresh_lab, shell):
    lab = fresh_lab(3)
    app, db = shell(lab, "app1"), shell(lab, "db1")
    upgrade = "scalr-server-manage stop all && apt-get install -y -q scalr-server=1.1.0"
    code, _, err = app.run(upgrade)
    assert code == 0, err
    assert app.run("dpkg-query -W -f '${Version}' scalr-server")[1] == "1.1.0"
    # The db host still runs 1.0.0 with its 1.0.0 schema: the app host must refuse it.
    code, _, err = app.run("scalr-server-ctl reconfigure")
    assert code == 1
    assert "database schema 1.0.0" in err and "older than scalr-server 1.1.0" in err
    code, _, err = db.run(upgrade)
    assert code == 0, err
    code, _, err = db.run("scalr-server-ctl reconfigure")
    assert code == 0, err
    assert db.run("mysql -N -e 'SELECT version FROM scalr.schema_version'")[1].strip() == "1.1.0"
    code, _, err = app.run("scalr-server-ctl reconfigure")
    assert code == 0, err
    assert set(states(app.run("scalr-server-manage status")[1]).values()) == {"RUNNING"}
    log = app.run("cat /opt/scalr-server/var/log/reconfigure.log")[1].splitlines()
    assert [line.split()[2] for line in log] == ["1.0.0", "1.1.0"]  # the failed run did not count


def test_stopped_sshd_refuses_connections_until_started(fresh_lab):
    lab = fresh_lab(1)
    host = lab.host("db1")
    faults.stop_sshd(host)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host.spec.address, 22), timeout=2).close()
    faults.start_sshd(host)
    assert host.sshd_answers()


def test_a_frozen_host_accepts_tcp_but_never_answers_until_thawed(fresh_lab):
    lab = fresh_lab(1)
    host = lab.host("db1")
    faults.freeze(host)
    assert all(process_state(pid) == "T" for pid in host.processes())
    assert not host.sshd_answers(timeout=1.0)
    faults.thaw(host)
    assert host.sshd_answers(timeout=5.0)


def test_a_broken_service_is_reported_until_repaired(lab, shell):
    host = lab.host("app2")
    faults.break_service(host, "scalr-nginx")
    try:
        _, out, _ = shell(lab, "app2").run("scalr-server-manage status")  # its exit code varies by version
        assert states(out)["scalr-nginx"] == "FATAL"
        assert states(out)["scalr-httpd"] == "RUNNING"
    finally:
        faults.repair_service(host, "scalr-nginx")
    assert states(host.exec("scalr-server-manage status").stdout)["scalr-nginx"] == "RUNNING"


def test_fill_data_pushes_usage_past_the_threshold_and_clears(lab, shell):
    host = lab.host("worker1")
    session = shell(lab, "worker1")
    df = "df --output=pcent /opt/scalr-server/data | tail -1 | tr -dc 0-9"
    faults.fill_data(host, 85)
    try:
        assert int(session.run(df)[1]) >= 85
    finally:
        faults.clear_data(host)
    assert int(session.run(df)[1]) < 5


def test_a_broken_package_fails_to_install_and_can_be_withdrawn(lab, shell):
    session = shell(lab, "app1")
    faults.publish_broken_package(lab.repo, "1.1.1")
    try:
        session.run("apt-get update -q")
        code, _, _ = session.run("apt-cache madison scalr-server | grep -c 1.1.1")
        assert code == 0
        # Unpack only (no configure), so the shared lab's installed package is untouched.
        code, out, _ = session.run(
            "cd /tmp && apt-get download scalr-server=1.1.1 && dpkg-deb -I scalr-server_1.1.1_all.deb postinst"
        )
        assert code == 0 and "exit 1" in out
    finally:
        faults.unpublish_package(lab.repo, "1.1.1")
    session.run("apt-get update -q")
    assert session.run("apt-cache madison scalr-server | grep -c 1.1.1")[0] != 0


def test_installing_the_broken_package_fails(fresh_lab, shell):
    lab = fresh_lab(1)
    faults.publish_broken_package(lab.repo, "1.1.1")
    code, out, err = shell(lab, "db1").run("apt-get update -q && apt-get install -y -q scalr-server=1.1.1")
    assert code != 0
    assert "post-installation script failed" in out + err


def test_up_is_idempotent_and_repairs_a_dead_host(fresh_lab, shell):
    lab = fresh_lab(3)
    before = {h.name: h.pid for h in lab.hosts()}
    lab.up(3)
    assert {h.name: h.pid for h in lab.hosts()} == before
    lab.host("worker1").stop()
    assert [s.running for s in lab.status()] == [True, False, True]
    lab.up(3)
    after = {h.name: h.pid for h in lab.hosts()}
    assert after["db1"] == before["db1"] and after["app1"] == before["app1"]
    assert after["worker1"] != before["worker1"]
    assert all(s.running and s.sshd for s in lab.status())
    out = shell(lab, "worker1").run("scalr-server-manage status")[1]
    assert set(states(out).values()) == {"RUNNING"}


def test_down_leaves_no_process_no_mount_and_is_idempotent(tmp_path):
    subnet = f"127.29.{PROCESS_OCTET}"
    lab = Lab(home=tmp_path / "lab", inventory=tmp_path / "lab.yaml", subnet=subnet, log=lambda _: None)
    lab.up(2)
    pids = [pid for host in lab.hosts() for pid in host.processes()]
    assert len(pids) >= 4  # init, sshd, supervisord, its programs...
    lab.down()
    lab.down()
    assert not any(Path(f"/proc/{pid}").exists() and process_state(pid) != "Z" for pid in pids)
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(tmp_path) not in mounts
    assert not (tmp_path / "lab" / "hosts").exists() and not (tmp_path / "lab.yaml").exists()
    assert lab.status() == []
    probe = subprocess.run(["ss", "-ltn", "src", f"{subnet}.1"], capture_output=True, text=True).stdout
    assert ":22" not in probe

