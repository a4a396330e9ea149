"""testinfra through Overhaul's transport: every module works, keys are strict, one connection per host,
and `overhaul verify` reports the operator's checks per (check, host) beside the built-in ones."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest
from helpers import overhaul_cli, write

from overhaul import checks, verification
from overhaul.errors import HostUnreachable
from overhaul.inventory import load_inventory_file
from overhaul.lab import faults
from overhaul.state import SQLiteState
from overhaul.transport import RemoteHost, Transport


@pytest.fixture
def isolated(monkeypatch):
    """Each test gets its own connections and testinfra hosts (and the plugin's environment variables are
    restored after)."""
    monkeypatch.setenv(checks.ENV_VARIABLE, "")
    monkeypatch.setenv(checks.HOSTS_DIR_VARIABLE, "")
    checks.close_all()
    checks.forget_hosts()
    yield
    checks.close_all()
    checks.forget_hosts()


def test_testinfra_modules_work_through_the_backend(lab, isolated):
    hosts_dir = str(lab.inventory.parent)
    app = checks.get_host("lab", "app1", hosts_dir=hosts_dir)
    assert app.backend.get_connection_type() == "overhaul"
    assert app.run("hostname").stdout.strip() == "app1"
    assert app.package("scalr-server").is_installed and app.package("scalr-server").version == "1.0.0"
    assert app.service("scalr").is_running  # `service scalr status`, as the vendor's page says
    conf = "/opt/scalr-server/etc/supervisor/supervisord.conf"
    assert app.supervisor("scalr-httpd", supervisorctl_path="supervisorctl", supervisorctl_conf=conf).is_running
    assert app.file("/etc/scalr-server/scalr-server.conf").contains("ROLE=app")
    assert app.mount_point("/opt/scalr-server/data").filesystem == "tmpfs"
    assert not app.file("/nonexistent").exists


def test_testinfra_system_info_is_one_round_trip(lab, isolated, monkeypatch):
    """testinfra asks `uname -s`, `cat /etc/os-release` and `uname -m` one after the other (every package,
    service or user module starts with them): the backend sends them as one command; a later ask reads again."""
    sent = []
    original = RemoteHost.execute  # every command sent to a host goes through it
    monkeypatch.setattr(RemoteHost, "execute",
                        lambda self, command, **kw: sent.append(command) or original(self, command, **kw))
    app = checks.get_host("lab", "app1", hosts_dir=str(lab.inventory.parent))
    info = app.system_info
    expected = lab.host("app1").exec(". /etc/os-release && echo $ID $VERSION_ID && uname -m").stdout.split()
    assert (info.type, info.distribution, info.release, info.arch) == ("linux", *expected)
    assert len(sent) == 1
    assert app.run("uname -m").stdout == info.arch + "\n" and app.run("uname -s").stdout == "Linux\n"
    assert len(sent) == 3
    app.run("true")  # another question in between: what was read ahead is dropped
    assert app.run("uname -m").stdout == info.arch + "\n" and len(sent) == 5


def test_a_host_whose_key_does_not_match_is_refused(lab, tmp_path, isolated):
    keys = dict(line.split(" ", 1) for line in lab.known_hosts.read_text().splitlines())
    app1, db1 = lab.host("app1").spec.address, lab.host("db1").spec.address
    forged = "".join(f"{addr} {keys[db1] if addr == app1 else key}\n" for addr, key in keys.items())
    write(tmp_path / "hosts/known_hosts", forged)
    text = lab.inventory.read_text().replace("../", str(lab.inventory.parent.parent) + "/")
    write(tmp_path / "hosts/lab.yaml", text.replace(str(lab.known_hosts), str(tmp_path / "hosts/known_hosts")))
    host = checks.get_host("lab", "app1", hosts_dir=str(tmp_path / "hosts"))
    with pytest.raises(HostUnreachable, match="host key does not match"):
        host.run("true")


def test_checks_open_one_connection_per_host_however_many_checks(lab, tmp_path, isolated, monkeypatch):
    write(tmp_path / "checks/test_many.py", """
        import pytest

        @pytest.mark.parametrize("n", range(5))
        def test_file(host, n):
            assert host.file("/etc/hostname").exists

        def test_package(host):
            assert host.package("scalr-server").is_installed

        @pytest.mark.roles("db")
        def test_db_only(host):
            assert host.run("mysqladmin ping").rc == 0
    """)
    opened: list[str] = []
    real_open = RemoteHost._open

    def counting_open(self):
        opened.append(self.name)
        return real_open(self)

    monkeypatch.setattr(RemoteHost, "_open", counting_open)
    code = pytest.main([str(tmp_path / "checks"), "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                        "--overhaul-env", "lab", "--overhaul-hosts-dir", str(lab.inventory.parent),
                        "--overhaul-only", "db1,app1"])
    assert code == 0
    assert sorted(opened) == ["app1", "db1"]  # 13 checks ran (6 x 2 hosts + 1 on db1), 2 connections


def verify(lab, cwd, *args):
    return overhaul_cli(cwd, "verify", "--env", "lab", "--hosts-dir", str(lab.inventory.parent), *args)


def test_verify_reports_each_check_on_each_host_and_names_the_failing_host(lab, tmp_path):
    write(tmp_path / "checks/test_ops.py", """
        import pytest

        def test_no_maintenance_marker(host):
            assert not host.file("/root/under-maintenance").exists

        @pytest.mark.roles("db")
        def test_schema_is_readable(host):
            assert host.run("mysql -N -e 'SELECT version FROM scalr.schema_version'").rc == 0
    """)
    args = ["--checks", str(tmp_path / "checks"), "--junit", str(tmp_path / "out/junit.xml"),
            "--json", str(tmp_path / "out/verify.json")]
    passing = verify(lab, tmp_path, *args)
    assert passing.returncode == 0, passing.stdout + passing.stderr
    # 16 built-in + 4 + 1 (db only); the db-only check is reported skipped on the 3 other hosts
    assert "verify: 21 passed, 0 failed, 3 skipped" in passing.stdout

    lab.host("app1").exec("touch /root/under-maintenance")
    try:
        failing = verify(lab, tmp_path, *args)
    finally:
        lab.host("app1").exec("rm -f /root/under-maintenance")
    assert failing.returncode == 1
    failed = [line for line in failing.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and failed[0].startswith("FAILED test_ops::test_no_maintenance_marker on app1: ")
    root = ET.parse(tmp_path / "out/junit.xml").getroot()
    failures = [case for case in root.iter("testcase") if case.find("failure") is not None]
    assert [case.get("name") for case in failures] == ["test_ops::test_no_maintenance_marker [app1]"]
    text = failures[0].find("failure").text
    assert "assert not host.file" in text and "test_ops.py:4: AssertionError" in text  # the assertion, and where
    assert all(suite.get("timestamp") for suite in root.iter("testsuite"))
    skipped = [case.get("name") for case in root.iter("testcase") if case.find("skipped") is not None]
    assert sorted(skipped) == [f"test_ops::test_schema_is_readable [{h}]" for h in ("app1", "app2", "worker1")]
    report = json.loads((tmp_path / "out/verify.json").read_text())
    by_case = {(c["check"], c["host"]): c["status"] for c in report["cases"]}
    assert by_case[("test_ops::test_schema_is_readable", "db1")] == "passed"
    assert by_case[("test_ops::test_schema_is_readable", "app1")] == "skipped"  # the roles marker kept it to db
    assert by_case[("services running", "app1")] == "passed"
    assert len(by_case) == 24
    assert report["totals"] == {"passed": 20, "failed": 1, "skipped": 3} and report["run_id"] and report["timestamp"]
    # The journal says what the exit code said: the passing verify succeeded, the failing one failed.
    assert [run.status for run in SQLiteState(tmp_path / "journal.sqlite").runs("lab")] == ["failed", "succeeded"]
    shown = overhaul_cli(tmp_path, "show", "last").stdout  # with each check's result on each host
    assert "  check app1         failed   test_ops::test_no_maintenance_marker: " in shown
    assert "  check db1          passed   test_ops::test_schema_is_readable" in shown
    to_stdout = verify(lab, tmp_path, "--checks", str(tmp_path / "checks"), "--no-checks", "--json", "-")
    assert json.loads(to_stdout.stdout[to_stdout.stdout.index('{\n  "environment"'):])["totals"]["passed"] == 16  # 4 x 4 hosts


def test_verify_with_checks_opens_one_ssh_connection_per_host(lab, tmp_path):
    """The checks run in the controller on the run's own connections: each host's sshd logs exactly one accepted
    connection for a whole `overhaul verify` (the built-in runbook and the checks), not one for each."""
    log = "/var/log/overhaul-test-sshd.log"
    hosts = lab.hosts()
    for host in hosts:  # the same sshd, now logging every accepted connection to a file
        faults.stop_sshd(host)
        host.exec(f"rm -f {log}; mkdir -p /run/sshd && /usr/sbin/sshd -E {log}")
        host.wait_for_sshd()
    try:
        write(tmp_path / "checks/test_two.py", """
            def test_hostname(host):
                assert host.run("hostname").stdout.strip()

            def test_package(host):
                assert host.package("scalr-server").is_installed
        """)
        done = verify(lab, tmp_path, "--checks", str(tmp_path / "checks"))
        assert done.returncode == 0, done.stdout + done.stderr
        assert "verify: 24 passed, 0 failed, 0 skipped" in done.stdout  # 16 built-in + 2 checks x 4 hosts
        accepted = {host.name: host.exec(f"grep -c 'Accepted publickey' {log}", check=False).stdout.strip()
                    for host in hosts}
        assert accepted == {host.name: "1" for host in hosts}
    finally:
        for host in hosts:
            faults.stop_sshd(host)
            faults.start_sshd(host)


def test_checks_run_in_process_twice_on_a_transport_and_leave_the_controller_as_found(lab, tmp_path, isolated, capfd):
    folder = write(tmp_path / "checks/test_one.py", """
        def test_a(host):
            assert host.run("true").rc == 0
    """).parent
    path, handler, stdout = sys.path[:], signal.getsignal(signal.SIGINT), sys.stdout
    transport = Transport(load_inventory_file(lab.inventory))
    try:
        first = verification.run_checks(transport, str(lab.inventory.parent), folder, ["db1", "app1"])
        write(folder / "test_one.py", """
            def test_b(host):
                assert host.run("false").rc == 0
        """)
        second = verification.run_checks(transport, str(lab.inventory.parent), folder, ["app2"])
    finally:
        transport.close()
    assert [(c.check, c.host, c.status) for c in first] == [("test_one::test_a", "app1", "passed"),
                                                             ("test_one::test_a", "db1", "passed")]
    assert [(c.check, c.host, c.status) for c in second] == [("test_one::test_b", "app2", "failed")]  # read afresh
    assert "assert 1 == 0" in second[0].message and "test_one.py:2: AssertionError" in second[0].detail
    assert sys.path == path and signal.getsignal(signal.SIGINT) is handler and sys.stdout is stdout
    assert capfd.readouterr().out == ""  # pytest wrote nothing on the controller's terminal


def test_checks_side_by_side_keep_each_host_to_itself(lab, tmp_path, isolated):
    """One pytest session per host, all at once in this process (what run_checks shares between them: the process,
    its imported check modules, os.environ): every check sees its own host, in its module-scoped fixture and in what
    it records at module level, and none fails because another session ended a check at the same moment (pytest's
    PYTEST_CURRENT_TEST upkeep, shared by the sessions, once failed such checks on teardown)."""
    folder = write(tmp_path / "checks/test_own.py", """
        import pytest

        SEEN = {}  # module level: the one module object every session's checks share

        @pytest.fixture(scope="module")
        def hostname(host):
            return host.run("hostname").stdout.strip()

        @pytest.fixture
        def settled(host):
            yield
            assert host.run("true").rc == 0  # a teardown that waits on its host while other sessions' checks end

        @pytest.mark.parametrize("n", range(10))
        def test_own_host(host, hostname, settled, n):
            name = host.backend.hostname
            assert hostname == name  # made on this host, not on the host of a session running beside it
            SEEN.setdefault(name, set()).add(hostname)
            assert SEEN[name] == {name}
            with open(__file__ + ".seen", "a") as out:  # which module object, for the test to compare across hosts
                out.write(f"{name} {id(SEEN)}\\n")
    """).parent
    hosts = [host.name for host in lab.hosts()]
    transport = Transport(load_inventory_file(lab.inventory))
    try:
        cases = verification.run_checks(transport, str(lab.inventory.parent), folder, hosts, width=len(hosts))
    finally:
        transport.close()
    assert [case for case in cases if case.status != "passed"] == []
    assert sorted((case.host, case.check) for case in cases) == sorted((host, "test_own::test_own_host")
                                                                      for host in hosts for _ in range(10))
    seen = [line.split() for line in (folder / "test_own.py.seen").read_text().splitlines()]
    assert sorted(name for name, _ in seen) == sorted(host for host in hosts for _ in range(10))
    assert len({module for _, module in seen}) == 1  # every session's checks recorded in the one shared module
    assert "PYTEST_CURRENT_TEST" not in os.environ or os.environ["PYTEST_CURRENT_TEST"].startswith(
        "tests/test_checks.py::test_checks_side_by_side")  # this test's own, as pytest set it


@pytest.mark.parametrize("only", [True, False], ids=["checks-only", "with-runbook"])
def test_ctrl_c_during_the_checks_stops_verify_with_exit_130(lab, tmp_path, only):
    started = tmp_path / "started"
    write(tmp_path / "checks/test_slow.py", f"""
        import pathlib

        def test_slow(host):
            pathlib.Path({str(started)!r}).touch()
            assert host.run("sleep 3").rc == 0
    """)
    argv = [sys.executable, "-m", "overhaul", "verify", "--env", "lab", "--hosts-dir", str(lab.inventory.parent),
            "--checks", str(tmp_path / "checks"), *(["--checks-only"] if only else [])]
    # Started as a script's `overhaul verify &` is (SIGINT ignored, inherited): Ctrl-C must still stop it.
    proc = subprocess.Popen(argv, cwd=tmp_path, env={**os.environ, "OVERHAUL_JOURNAL": str(tmp_path / "journal.sqlite")},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, out + err
    if only:  # cut at once; with the runbook, the commands running get the run's grace period, as its stages' do
        assert "passed   test_slow::test_slow" not in out
    assert "Traceback" not in err
