"""The transport under pressure and hostile files: sshd's session limit is back-pressure (never a frozen host),
a connection stays open while commands run on it, a bad known_hosts line costs only its own host, and the run's
log never shows a secret that a command split between its two streams."""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import paramiko
import pytest
from helpers import lab_inventory, overhaul_cli, plan_for, run, write

from overhaul.command import sh
from overhaul.context import StepHost
from overhaul.errors import ConfigError, HostUnreachable
from overhaul.inventory import load_inventory_file
from overhaul.secrets import REDACTED
from overhaul.transport import Transport


def concurrent(host, count: int) -> list:
    """`count` commands at once on one host, each one second long; each result (or the error it raised)."""
    def one(i: int):
        try:
            return host.run(sh("sleep 1; echo {i}", i=i))
        except HostUnreachable as exc:
            return exc

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_more_commands_at_once_than_sshd_allows_all_succeed_on_one_connection(lab):
    transport = Transport(lab_inventory(lab))
    try:
        host = transport.host("app1")
        connection = host.connect()
        results = concurrent(host, 11)
        assert [getattr(r, "stdout", r) for r in results] == [f"{i}\n" for i in range(11)]
        assert host.connect() is connection  # the same connection all along: never closed under the others
    finally:
        transport.close()


def test_a_session_limit_above_sshds_is_waited_for_not_taken_for_a_frozen_host(lab, tmp_path):
    """With ssh.max_sessions 16, sshd (MaxSessions 10) refuses channels: they wait, all 16 commands succeed."""
    text = lab.inventory.read_text().replace("../", str(lab.inventory.parent.parent) + "/")
    inventory_file = write(tmp_path / "hosts/lab.yaml", text.replace("ssh:\n", "ssh:\n  max_sessions: 16\n", 1))
    inventory = load_inventory_file(inventory_file)
    assert inventory.ssh.max_sessions == 16
    transport = Transport(inventory)
    try:
        host = transport.host("app2")
        results = concurrent(host, 16)
        assert [getattr(r, "stdout", r) for r in results] == [f"{i}\n" for i in range(16)]
    finally:
        transport.close()


def test_a_close_while_a_command_runs_lets_it_finish_then_closes(lab):
    transport = Transport(lab_inventory(lab))
    try:
        host = transport.host("worker1")
        outcome = {}
        worker = threading.Thread(target=lambda: outcome.setdefault("result", host.run(sh("sleep 1; echo done"))))
        worker.start()
        time.sleep(0.3)
        host.close()  # between two uses (a park, a release): the running command is not cut
        worker.join(10)
        assert outcome["result"].stdout == "done\n"
        assert host._connection is None  # closed once it ended
        assert host.run(sh("echo again")).stdout == "again\n"  # and a later command reconnects
    finally:
        transport.close()


def test_a_bad_known_hosts_line_is_skipped_with_a_warning_naming_it(lab, tmp_path, caplog):
    lines = lab.known_hosts.read_text().splitlines()
    db1 = lab.host("db1").spec.address
    cut = [line[:40] if line.startswith(db1 + " ") else line for line in lines]
    known_hosts = write(tmp_path / "known_hosts", "\n".join(cut) + "\n")
    text = lab.inventory.read_text().replace("../", str(lab.inventory.parent.parent) + "/")
    inventory_file = write(tmp_path / "hosts/lab.yaml", text.replace(str(lab.known_hosts), str(known_hosts)))
    bad_line = next(i for i, line in enumerate(cut, 1) if line.startswith(db1 + " "))
    with caplog.at_level(logging.WARNING, logger="overhaul"):
        transport = Transport(load_inventory_file(inventory_file))
    try:
        assert f"{known_hosts}:{bad_line}: not a valid known_hosts entry, skipped" in caplog.text
        assert transport.host("app1").run(sh("echo fine")).stdout == "fine\n"  # every other host connects
        with pytest.raises(HostUnreachable, match="is not in"):
            transport.host("db1").connect()  # its own host is unknown now: refused, as OpenSSH would
    finally:
        transport.close()


def test_a_known_hosts_that_is_not_a_regular_file_is_an_input_error(lab, tmp_path):
    fifo = tmp_path / "known_hosts"
    os.mkfifo(fifo)
    text = lab.inventory.read_text().replace("../", str(lab.inventory.parent.parent) + "/")
    inventory_file = write(tmp_path / "hosts/lab.yaml", text.replace(str(lab.known_hosts), str(fifo)))
    with pytest.raises(ConfigError, match="not a regular file"):
        Transport(load_inventory_file(inventory_file))


def test_a_secret_split_between_stdout_and_stderr_never_shows_whole_in_the_log(lab, tmp_path):
    secret = "s3cr3t-Value-2026"
    transport = Transport(lab_inventory(lab))
    try:
        transport.redactor.add(secret)
        log = tmp_path / "logs/app1.log"
        host = StepHost(transport.host("app1"), timeout=30, run_id="split", log=log)
        host.run(sh("printf %s {a}; printf %s {b} >&2", a=secret[:8], b=secret[8:]))
        host.run(sh("echo {whole}", whole=secret))
        text = log.read_text()
        assert secret not in text
        assert text.count(REDACTED) >= 2  # the split one and the whole one, both redacted
    finally:
        transport.close()


def test_a_backup_into_an_existing_folder_leaves_its_mode_alone(fresh_lab, tmp_path):
    lab = fresh_lab(1)
    db = lab.host("db1")
    db.exec("mkdir -p /srv/shared && chmod 1777 /srv/shared")
    runbook = """
        name: backup
        stages:
          - name: backup
            step: mysql.backup
            roles: [db]
            params: {backup_dir: /srv/shared, label: modes}
    """
    result = run(runbook, tmp_path, lab_inventory(lab))
    assert [r.outcome.value for r in result.results] == ["changed"]
    assert db.exec("stat -c %a /srv/shared").stdout.strip() == "1777"
    second = run(runbook.replace("/srv/shared", "/srv/fresh/backups"), tmp_path, lab_inventory(lab))
    assert [r.outcome.value for r in second.results] == ["changed"]
    assert db.exec("stat -c %a /srv/fresh/backups").stdout.strip() == "700"  # a folder it made: private


def test_the_command_line_shows_a_skipped_known_hosts_line_and_goes_on(lab, tmp_path):
    lines = lab.known_hosts.read_text().splitlines()
    known_hosts = write(tmp_path / "known_hosts", "\n".join(["127.0.0.9 ssh-ed25519 AAAAC3Nz", *lines]) + "\n")
    text = lab.inventory.read_text().replace("../", str(lab.inventory.parent.parent) + "/")
    write(tmp_path / "hosts/lab.yaml", text.replace(str(lab.known_hosts), str(known_hosts)))
    proc = overhaul_cli(tmp_path, "verify", "--env", "lab", "--no-checks", "--hosts-dir", str(tmp_path / "hosts"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"warning: {known_hosts}:1: not a valid known_hosts entry, skipped" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_waiting_for_a_free_channel_does_not_count_against_a_commands_deadline(lab, tmp_path):
    """max_sessions 1, four 4-second commands with a 4.5 s timeout: the last waits 12 s for its turn, longer than
    its timeout and grace (4.5 + 10 s), and still runs and succeeds: a queue is not a frozen host."""
    text = lab.inventory.read_text().replace("../", str(lab.inventory.parent.parent) + "/")
    inventory_file = write(tmp_path / "hosts/lab.yaml", text.replace("ssh:\n", "ssh:\n  max_sessions: 1\n", 1))
    transport = Transport(load_inventory_file(inventory_file))
    try:
        host = transport.host("worker1")

        def one(i: int):
            try:
                return host.run(sh("sleep 4; echo {i}", i=i), timeout=4.5)
            except HostUnreachable as exc:
                return exc

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(one, range(4)))
        assert [getattr(r, "stdout", r) for r in results] == [f"{i}\n" for i in range(4)]
        assert max(r.duration for r in results) < 8  # each measured from its own start, not from its wait
    finally:
        transport.close()


def test_after_a_cut_no_command_reconnects(lab):
    transport = Transport(lab_inventory(lab))
    host = transport.host("app1")
    assert host.run(sh("true")).ok
    transport.cut()
    with pytest.raises(HostUnreachable, match="connections were cut"):
        host.run(sh("true"))
    with pytest.raises(HostUnreachable, match="connections were cut"):
        transport.host("app2").run(sh("true"))  # a host first asked for after the cut, too


THREE_STAGES = """
    name: three changes
    stages:
      - {name: one, step: shell, params: {command: 'true'}}
      - {name: two, step: shell, params: {command: 'true'}}
      - {name: three, step: shell, params: {command: 'true'}}
"""


class Census:
    """A subscriber that counts, at each event of a run (from the workers), the open connections of `transport`, the
    live paramiko threads (one per open connection) and all threads."""

    def __init__(self, transport: Transport):
        self.transport = transport
        self.open: list[int] = []
        self.paramiko: list[int] = []
        self.threads: list[int] = []
        self.before = threading.active_count()

    def __call__(self, event) -> None:
        self.open.append(sum(host.connected for host in list(self.transport._hosts.values())))
        self.paramiko.append(sum(isinstance(t, paramiko.Transport) for t in threading.enumerate()))
        self.threads.append(threading.active_count())


def changing_run(inventory, tmp_path, transport: Transport, census: Census):
    from overhaul.execution import Execution
    from overhaul.state import SQLiteState

    plan = plan_for(THREE_STAGES, tmp_path, inventory)
    return Execution(plan, state=SQLiteState(tmp_path / "journal.sqlite"), subscribers=[census],
                     transport=transport).run()


def with_forks(inventory, forks: int):
    return inventory.model_copy(update={"ssh": inventory.ssh.model_copy(update={"forks": forks})})


def test_a_changing_run_on_more_hosts_than_forks_connects_to_each_host_once(lab, tmp_path):
    """4 hosts, forks 2: the preflight connects each host, and the three stages reuse its kept connection (before,
    each host was let go after its preflight and each stage: four handshakes per host)."""
    inventory = with_forks(lab_inventory(lab), 2)
    transport = Transport(inventory)
    census = Census(transport)
    try:
        assert transport.parks(inventory.hosts) and transport.idle_limit == 4  # within 10 per fork: the whole farm
        result = changing_run(inventory, tmp_path, transport, census)
        handshakes = {name: host.opened for name, host in transport._hosts.items()}
    finally:
        transport.close()
    assert [r.outcome.value for r in result.results] == ["changed"] * 12, result.refused
    assert handshakes == {host.name: 1 for host in inventory.hosts}
    assert max(census.paramiko) <= 4 and max(census.threads) <= census.before + 2 + 4 + 8  # workers, connections, run


def test_a_pool_keeping_fewer_hosts_than_the_farm_stays_within_its_bound_and_reuses_what_it_kept(lab, tmp_path):
    """forks 1 and one idle connection kept: at most two connections (and paramiko threads) open at any time, and each
    stage first walks the host kept from the one before: 4 handshakes at the preflight, then 3 per stage (not 4)."""
    inventory = with_forks(lab_inventory(lab), 1)
    transport = Transport(inventory)
    transport.keep = 1
    census = Census(transport)
    try:
        result = changing_run(inventory, tmp_path, transport, census)
        handshakes = sum(host.opened for host in transport._hosts.values())
    finally:
        transport.close()
    assert [r.outcome.value for r in result.results] == ["changed"] * 12, result.refused
    assert handshakes == 4 + 3 * 3
    assert max(census.open) <= 2 and max(census.paramiko) <= 2


def test_a_closed_connection_ends_its_paramiko_thread_at_once_though_idle_reads_wait_seconds(lab):
    from overhaul.transport import IDLE_WAKE

    transport = Transport(lab_inventory(lab))
    try:
        host = transport.host("app1")
        connection = host.connect()
        thread = connection.transport
        assert connection.transport.sock.gettimeout() == IDLE_WAKE and IDLE_WAKE >= 1
        assert host.run(sh("echo up")).stdout == "up\n"  # (data wakes the thread at once: a command is not slowed)
        host.close()
        assert not thread.is_alive()  # ended by the close itself, not at its next wake
    finally:
        transport.close()


def test_a_run_on_a_farm_of_sshd_endpoints_logs_in_once_per_host_as_sshd_counts_it(tmp_path):
    """40 endpoints as bench/scale.py starts them (real sshd, LogLevel INFO: a line per accepted login), forks 4: the
    preflight and three changing stages make one login per host in the sshds' own logs."""
    import sys
    from pathlib import Path

    from helpers import PROCESS_OCTET

    sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
    import scale

    farm = scale.Farm(tmp_path, 24000 + PROCESS_OCTET)
    scale.write_farm(farm, [40], forks=4)
    sshds = scale.start_sshds(farm, 40, log_level="INFO")
    try:
        inventory = load_inventory_file(farm.inventory(40))
        transport = Transport(inventory)
        census = Census(transport)
        try:
            result = changing_run(inventory, tmp_path, transport, census)
        finally:
            transport.close()
    finally:
        scale.stop_sshds(sshds)
    assert [r.outcome.value for r in result.results] == ["changed"] * 120, result.refused
    logins = [line for log in tmp_path.glob("sshd-*.log") for line in log.read_text().splitlines()
              if "Accepted publickey for root" in line]
    assert len(logins) == 40
    assert max(census.paramiko) <= 40 and max(census.threads) <= census.before + 4 + 40 + 8
