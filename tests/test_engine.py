"""The engine on real hosts: idempotent runs, plan, strategies and failure budgets, strict keys, retries."""

from __future__ import annotations

import itertools
import re
import subprocess
import threading
import time
from collections import Counter

import pytest
from helpers import lab_inventory, outcomes, overhaul_cli, plan_for, run, write

from overhaul.errors import HostUnreachable
from overhaul.lab import faults
from overhaul.runbook import Stage, resolve_count
from overhaul.step import Registry
from overhaul.transport import Transport


def test_counts_and_percentages_resolve_against_the_stage_size():
    assert resolve_count("25%", 8, 1) == 2
    assert resolve_count("10%", 4, 1) == 1  # a batch is never empty
    assert resolve_count("0%", 4, 0) == 0
    assert resolve_count(3, 10, 0) == 3


def test_rolling_needs_a_batch_and_only_rolling_takes_one():
    with pytest.raises(ValueError, match="needs `batch`"):
        Stage(name="s", step="shell", strategy="rolling")
    with pytest.raises(ValueError, match="only applies to strategy 'rolling'"):
        Stage(name="s", step="shell", batch=2)


def test_selectors_pick_roles_names_and_exclusions_in_inventory_order(lab, tmp_path):
    inventory = lab_inventory(lab)
    plan = plan_for("""
        name: select
        stages:
          - {name: by role, step: shell, roles: [app, db], params: {command: "true"}}
          - {name: by name, step: shell, hosts: [app2, worker1], params: {command: "true"}}
          - {name: all but, step: shell, exclude: [app1, db1], params: {command: "true"}}
    """, tmp_path, inventory)
    assert [s.hosts for s in plan.stages] == [["db1", "app1", "app2"], ["worker1", "app2"], ["worker1", "app2"]]


TWO_STAGES = """
    name: two-stage
    params:
      tag: null
    stages:
      - name: write marker
        step: shell
        params:
          command: echo ${host} > /root/marker-${tag}
          creates: /root/marker-${tag}
      - name: app only
        step: shell
        roles: [app]
        strategy: rolling
        batch: 1
        params:
          command: echo done >> /root/app-${tag}
          creates: /root/app-${tag}
"""


def test_plan_shows_the_change_and_touches_nothing(lab, tmp_path, tag, shell):
    inventory = lab_inventory(lab)
    result = run(TWO_STAGES, tmp_path, inventory, check_only=True, params={"tag": tag})
    assert outcomes(result, "write marker") == dict.fromkeys(["db1", "worker1", "app1", "app2"], "changed")
    assert all(r.message.startswith("would run: echo") for r in result.results)
    assert shell(lab, "app1").run(f"test -e /root/marker-{tag}")[0] == 1


def test_a_two_stage_runbook_is_idempotent(lab, tmp_path, tag, shell):
    inventory = lab_inventory(lab)
    first = run(TWO_STAGES, tmp_path, inventory, params={"tag": tag})
    assert not first.failed
    assert outcomes(first, "write marker") == dict.fromkeys(["db1", "worker1", "app1", "app2"], "changed")
    assert outcomes(first, "app only") == {"app1": "changed", "app2": "changed"}
    second = run(TWO_STAGES, tmp_path, inventory, params={"tag": tag})
    assert {r.outcome.value for r in second.results} == {"ok"}
    assert shell(lab, "app2").run(f"cat /root/marker-{tag} /root/app-{tag}")[1].split() == ["app2", "done"]


def test_one_failure_under_max_failures_0_stops_before_the_next_stage(lab, tmp_path, tag, shell):
    result = run(f"""
        name: budget
        stages:
          - name: fails on app1
            step: shell
            roles: [app, worker]
            params: {{command: 'test $(hostname) != app1'}}
          - name: never runs
            step: shell
            params: {{command: touch /root/never-{tag}}}
    """, tmp_path, lab_inventory(lab))
    assert outcomes(result, "fails on app1") == {"worker1": "changed", "app1": "failed", "app2": "changed"}
    assert set(outcomes(result, "never runs").values()) == {"skipped"}
    assert result.stopped_at == "fails on app1" and result.failed
    assert shell(lab, "db1").run(f"test -e /root/never-{tag}")[0] == 1


def test_a_failure_within_budget_continues_without_the_failed_host(lab, tmp_path, tag):
    result = run(f"""
        name: budget
        stages:
          - name: fails on app1
            step: shell
            roles: [app, worker]
            max_failures: 1
            params: {{command: 'test $(hostname) != app1'}}
          - name: next
            step: shell
            roles: [app]
            params: {{command: 'rm -f /root/next-{tag}'}}
    """, tmp_path, lab_inventory(lab))
    assert result.stopped_at is None and result.failed  # a host failed, so the run still reports failure
    assert outcomes(result, "next") == {"app1": "skipped", "app2": "changed"}


def test_a_rolling_stage_stops_launching_batches_once_over_budget(lab, tmp_path):
    result = run("""
        name: rolling
        stages:
          - name: roll
            step: shell
            strategy: rolling
            batch: 2
            params: {command: 'test $(hostname) != worker1'}
    """, tmp_path, lab_inventory(lab))
    # inventory order db1, worker1 | app1, app2: the first batch fails, the second never starts.
    assert outcomes(result, "roll") == {"db1": "changed", "worker1": "failed", "app1": "skipped", "app2": "skipped"}
    skipped = [r.message for r in result.results if r.outcome.value == "skipped"]
    assert skipped == ["stage failure budget exceeded"] * 2


def test_serial_runs_one_host_at_a_time(lab, tmp_path, tag, shell):
    stamp = f"/tmp/serial-{tag}"
    result = run(f"""
        name: serial
        stages:
          - name: one by one
            step: shell
            strategy: serial
            params: {{command: 'date +%s.%N > {stamp}.start; sleep 0.3; date +%s.%N > {stamp}.end'}}
    """, tmp_path, lab_inventory(lab))
    assert not result.failed
    spans = []
    for host in ("db1", "worker1", "app1", "app2"):
        start, end = shell(lab, host).run(f"cat {stamp}.start {stamp}.end")[1].split()
        spans.append((float(start), float(end)))
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end  # each host started after the previous one finished


def test_a_failing_command_is_retried_only_as_the_stage_allows(lab, tmp_path, tag):
    flaky = f"n=$(cat /tmp/flaky-{tag} 2>/dev/null || echo 0); echo $((n+1)) > /tmp/flaky-{tag}; [ $n -ge 2 ]"
    runbook = f"""
        name: retry
        stages:
          - name: flaky
            step: shell
            hosts: [db1]
            retry: {{attempts: ATTEMPTS, delay: 0}}
            params: {{command: '{flaky}'}}
    """
    once = run(runbook.replace("ATTEMPTS", "1"), tmp_path, lab_inventory(lab))
    assert [(r.outcome.value, r.attempts) for r in once.results] == [("failed", 1)]
    thrice = run(runbook.replace("ATTEMPTS", "3"), tmp_path, lab_inventory(lab))
    assert [(r.outcome.value, r.attempts) for r in thrice.results] == [("changed", 2)]


def test_a_gated_stage_runs_only_when_confirmed(lab, tmp_path, tag, shell):
    runbook = f"""
        name: gated
        stages:
          - name: dangerous
            step: shell
            hosts: [db1]
            confirm: true
            params: {{command: touch /root/gated-{tag}, creates: /root/gated-{tag}}}
    """
    refused = run(runbook, tmp_path, lab_inventory(lab), confirm=lambda planned: False)
    assert refused.stopped_at == "dangerous" and outcomes(refused, "dangerous") == {"db1": "skipped"}
    assert shell(lab, "db1").run(f"test -e /root/gated-{tag}")[0] == 1
    accepted = run(runbook, tmp_path, lab_inventory(lab), confirm=lambda planned: planned.hosts == ["db1"])
    assert outcomes(accepted, "dangerous") == {"db1": "changed"}


def test_a_timed_out_command_is_killed_on_the_host(lab, tmp_path, tag, shell):
    result = run(f"""
        name: slow
        stages:
          - name: too slow
            step: shell
            hosts: [app1]
            timeout: 1
            params: {{command: 'sleep 30 && touch /root/slow-{tag}'}}
    """, tmp_path, lab_inventory(lab))
    assert [r.outcome.value for r in result.results] == ["failed"]
    assert "exited 124" in result.results[0].message
    assert shell(lab, "app1").run("pgrep -f 'sleep 30'")[0] == 1


def test_commands_reuse_one_connection_per_host(lab):
    transport = Transport(lab_inventory(lab))
    try:
        host = transport.host("worker1")
        # SSH_CLIENT is "client-address client-port server-port": one client port means one TCP connection.
        results = [host.run("echo $SSH_CLIENT") for _ in range(20)]
        assert len({r.stdout for r in results}) == 1
        local_port = host._connection.transport.sock.getsockname()[1]
        assert results[0].stdout.split()[1] == str(local_port)
        assert len(host.history) == 20
    finally:
        transport.close()


def test_sudo_runs_as_root_for_an_unprivileged_user(lab, tmp_path):
    text = lab.inventory.read_text().replace("  user: root", "  user: deploy\n  sudo: true")
    path = write(tmp_path / "hosts/lab.yaml", text.replace("../", str(lab.inventory.parent.parent) + "/"))
    from overhaul.inventory import load_inventory_file

    transport = Transport(load_inventory_file(path))
    try:
        host = transport.host("app1")
        assert host.run("id -un", sudo=False).stdout.strip() == "deploy"
        assert host.run("id -un").stdout.strip() == "root"
    finally:
        transport.close()


def _inventory_with(lab, tmp_path, replace: tuple[str, str]):
    from overhaul.inventory import load_inventory_file

    text = lab.inventory.read_text().replace("../", str(lab.inventory.parent.parent) + "/")
    return load_inventory_file(write(tmp_path / "hosts/lab.yaml", text.replace(*replace)))


def test_output_written_after_the_exit_status_is_kept_and_a_background_holder_does_not_hang(lab):
    """sshd sends a command's exit status when the command ends, while what it wrote may still be in its pipe: the
    output ends at EOF (it used to end at the exit status: under load a check read an empty answer). A background
    process left holding the output open is waited for only briefly (transport.OUTPUT_GRACE)."""
    transport = Transport(lab_inventory(lab))
    try:
        late = transport.host("app1").run("(sleep 0.5; echo late; echo also >&2) & exit 3", sudo=False)
        assert (late.exited, late.stdout, late.stderr) == (3, "late\n", "also\n")
        held = transport.host("app1").run("(sleep 61; echo never) & echo now", sudo=False)
        assert (held.exited, held.stdout) == (0, "now\n")
    finally:
        transport.close()
        lab.host("app1").exec("pkill -f 'sleep 6[1]' || true")


def test_a_bastion_logs_in_with_its_own_key_file(lab, tmp_path):
    """`ssh.bastion.key_file` is the bastion's key, even when `ssh.key_file` is set (it used to be ignored then):
    a key the bastion does not know fails at the bastion, while the hosts' own key works without one."""
    key = tmp_path / "hosts/jump_key"
    key.parent.mkdir(parents=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    bastion = lab.host("db1").spec.address
    inventory = _inventory_with(lab, tmp_path, ("  connect_timeout: 5", f"  connect_timeout: 5\n  bastion: "
                                                                      f"{{address: {bastion}, key_file: {key}}}"))
    assert inventory.ssh.key_file and inventory.ssh.bastion.key_file == key
    transport = Transport(inventory)
    try:
        failures = transport.connect(["app1"])
        assert "authentication failed" in str(failures["app1"]).lower() and f"bastion {bastion}:22" in str(failures["app1"])
    finally:
        transport.close()
    lab.host("db1").exec(f"cat >> /root/.ssh/authorized_keys <<'EOF'\n{key.with_suffix('.pub').read_text()}EOF")
    transport = Transport(inventory)
    try:
        assert transport.host("app1").run("hostname").stdout == "app1\n"
    finally:
        transport.close()
        lab.host("db1").exec(f"sed -i '/{key.with_suffix('.pub').read_text().split()[1].replace('/', '.')}/d' "
                             "/root/.ssh/authorized_keys")


def test_a_host_whose_key_does_not_match_known_hosts_is_refused(lab, tmp_path):
    # Give app1's address the key of db1: exactly what a man in the middle looks like.
    lines = lab.known_hosts.read_text().splitlines()
    keys = {line.split()[0]: line.split(maxsplit=1)[1] for line in lines}
    app1, db1 = lab.host("app1").spec.address, lab.host("db1").spec.address
    forged = tmp_path / "known_hosts"
    forged.write_text("".join(f"{addr} {keys[db1] if addr == app1 else key}\n" for addr, key in keys.items()))
    inventory = _inventory_with(lab, tmp_path, (str(lab.known_hosts), str(forged)))
    transport = Transport(inventory)
    try:
        with pytest.raises(HostUnreachable, match=r"app1 .*host key does not match .*refusing to connect"):
            transport.host("app1").connect()
        transport.host("db1").connect()  # the others are fine
    finally:
        transport.close()


def test_a_host_missing_from_known_hosts_is_refused_not_added(lab, tmp_path):
    partial = tmp_path / "known_hosts"
    partial.write_text("".join(line + "\n" for line in lab.known_hosts.read_text().splitlines()[:1]))
    inventory = _inventory_with(lab, tmp_path, (str(lab.known_hosts), str(partial)))
    transport = Transport(inventory)
    try:
        with pytest.raises(HostUnreachable, match=r"is not in .*known_hosts: refusing to connect"):
            transport.host("app2").connect()
    finally:
        transport.close()
    assert len(partial.read_text().splitlines()) == 1


def test_a_bastion_carries_the_connections_and_is_checked_strictly(lab, tmp_path):
    bastion = lab.host("db1").spec.address
    bastion_line = f"  connect_timeout: 5\n  bastion: {{address: {bastion}}}"
    inventory = _inventory_with(lab, tmp_path, ("  connect_timeout: 5", bastion_line))
    transport = Transport(inventory)
    try:
        client_port = transport.host("app2").run("echo $SSH_CLIENT").stdout.split()[1]
        # The TCP connection app2's sshd sees was opened by db1 (the bastion), not by us.
        app2 = lab.host("app2").spec.address
        on_bastion = lab.host("db1").exec(f"ss -Htn state established '( dst {app2} and dport = :22 )'").stdout
        assert f":{client_port} " in on_bastion
    finally:
        transport.close()
    without_bastion_key = tmp_path / "known_hosts"
    without_bastion_key.write_text("".join(
        line + "\n" for line in lab.known_hosts.read_text().splitlines() if not line.startswith(bastion + " ")
    ))
    inventory.ssh.known_hosts = without_bastion_key
    transport = Transport(inventory)
    try:
        failures = transport.connect(["app1", "app2"])
        assert set(failures) == {"app1", "app2"}
        assert all(f"bastion {bastion}:22" in str(e) and "refusing to connect" in str(e) for e in failures.values())
    finally:
        transport.close()


def test_a_stopped_sshd_is_retried_then_reported(fresh_lab, tmp_path):
    lab = fresh_lab(1)
    host = lab.host("db1")
    faults.stop_sshd(host)
    inventory = _inventory_with(lab, tmp_path, ("  connect_timeout: 5", "  connect_timeout: 2\n  connect_retries: 2"))
    transport = Transport(inventory)
    try:
        with pytest.raises(HostUnreachable, match=r"db1 .*: connection refused after 2 attempts"):
            transport.host("db1").connect()
        # Back within the retry window: the retries carry the connection through.
        inventory.ssh.connect_retries = 6
        timer = threading.Timer(1.0, faults.start_sshd, [host])
        timer.start()
        started = time.monotonic()
        transport.host("db1").connect()
        assert time.monotonic() - started >= 1.0
        timer.join()
        assert transport.host("db1").run("hostname").stdout.strip() == "db1"
    finally:
        transport.close()


def test_a_step_from_a_local_steps_folder_is_found_and_run(lab, tmp_path, tag):
    write(tmp_path / "steps/touch.py", """
        from overhaul.step import Check, Params, Step

        class TouchParams(Params):
            path: str

        class Touch(Step[TouchParams]):
            name = "local.touch"
            Params = TouchParams

            def check(self, host):
                return Check(host.run(f"test -e {self.params.path}").ok, self.params.path)

            def apply(self, host):
                host.run(f"touch {self.params.path}")
                return "touched"
    """)
    registry = Registry([tmp_path / "steps"])
    runbook = f"""
        name: local
        stages:
          - {{name: touch, step: local.touch, hosts: [app1], params: {{path: /root/local-{tag}}}}}
    """
    first = run(runbook, tmp_path, lab_inventory(lab), registry=registry)
    second = run(runbook, tmp_path, lab_inventory(lab), registry=registry)
    assert [r.outcome.value for r in first.results + second.results] == ["changed", "ok"]


def test_the_command_line_runs_a_runbook_and_exits_non_zero_on_failure(lab, tmp_path, tag):
    write(tmp_path / "runbooks/ok.yaml", f"""
        name: ok
        stages:
          - {{name: touch, step: shell, hosts: [db1], params: {{command: touch /root/cli-{tag}, creates: /root/cli-{tag}}}}}
    """)
    write(tmp_path / "runbooks/bad.yaml", """
        name: bad
        stages:
          - {name: fail, step: shell, hosts: [db1], params: {command: 'exit 3'}}
    """)
    common = ["--env", "lab", "--hosts-dir", str(lab.inventory.parent), "--runbooks-dir", str(tmp_path / "runbooks")]
    good = overhaul_cli(tmp_path, "run", "ok", *common)  # (its own journal: never the checkout's)
    assert good.returncode == 0, good.stdout + good.stderr
    assert re.search(r"^run \S+ succeeded in ", good.stdout, re.M)
    bad = overhaul_cli(tmp_path, "run", "bad", *common)
    assert bad.returncode == 1
    assert "FAILED fail on db1: `exit 3` exited 3" in bad.stdout


def test_a_stop_right_after_a_start_was_journaled_still_finishes_that_pair(lab, tmp_path, tag):
    """Ctrl-C between the journal's record of a pair's start and the pair itself: the pair runs and ends.

    (Found by CI: the runner used to drop such a pair, leaving it `running` in the journal for ever.)
    """
    from overhaul.execution import JournalRecorder
    from overhaul.runner import Runner
    from overhaul.state import RunRecord, SQLiteState

    inventory = lab_inventory(lab)
    plan = plan_for(TWO_STAGES, tmp_path, inventory, {"tag": tag})
    state = SQLiteState(tmp_path / "journal.sqlite")
    state.start_run(RunRecord(id="r1", runbook="two", runbook_path="", runbook_sha256="", environment="lab",
                              params={}, operator="t", started=time.time()))
    transport = Transport(inventory)
    runner = Runner(plan, transport, sleep=lambda _: None)

    class StopOnFirstStart:  # the signal handler's request_stop, at the worst moment
        def stage_started(self, planned, hosts): pass
        def host_started(self, planned, host): runner.request_stop()
        def host_finished(self, result): pass

    runner.listeners = [JournalRecorder(state, "r1", tmp_path / "out"), StopOnFirstStart()]
    try:
        result = runner.run()
    finally:
        transport.close()
    journaled = {(r.stage, r.host): r.outcome for r in state.results("r1")}
    assert journaled and "running" not in journaled.values(), journaled
    assert journaled == {(r.stage, r.host): r.outcome.value for r in result.results}
    assert set(journaled.values()) == {"changed"} and len(journaled) < 6  # the stop held for every later pair


def test_a_run_that_changes_nothing_journals_each_pair_once_when_it_ends(lab, tmp_path):
    """Unfenced (no lease: a verify), a read-only pair is written once, with its result, and the ends of such pairs
    are written together (one transaction for a stage's hosts here); a pair that may change a host is written
    when it starts too (what resume and undo read), each write its own transaction."""
    from overhaul.execution import JournalRecorder
    from overhaul.runner import Runner
    from overhaul.state import RunRecord, SQLiteState

    written: list[tuple[str, str]] = []
    transactions: list[list[str]] = []

    class Counting(SQLiteState):
        def record_ends(self, ends):
            ends = list(ends)
            written.extend((result.stage, result.outcome) for result, _ in ends)
            transactions.append([result.stage for result, _ in ends])
            super().record_ends(ends)

    inventory = lab_inventory(lab)
    plan = plan_for(LOOK.replace("THRESHOLD", "99") + "      - {name: echo, step: shell, hosts: [db1], "
                    "params: {command: 'true'}}\n", tmp_path, inventory)
    state = Counting(tmp_path / "journal.sqlite")
    state.start_run(RunRecord(id="r1", runbook="look", runbook_path="", runbook_sha256="", environment="lab",
                              params={}, operator="t", started=time.time()))
    transport = Transport(inventory)
    runner = Runner(plan, transport, sleep=lambda _: None)
    recorder = JournalRecorder(state, "r1", tmp_path / "out")
    runner.listeners = [recorder]
    try:
        result = runner.run()
    finally:
        transport.close()
    recorder.flush()  # (the run's end does it)
    assert not result.failed
    hosts = len(inventory.hosts)
    assert sorted(written) == sorted([("supervisor", "ok")] * hosts + [("disks", "ok")] * hosts
                                     + [("echo", "running"), ("echo", "changed")])
    assert len(transactions) < 2 * hosts + 2  # read-only ends shared transactions
    assert ["echo"] in transactions and transactions.count(["echo"]) == 2  # the changing pair's: one each
    assert {(r.stage, r.host): r.outcome for r in state.results("r1")} == \
        {(r.stage, r.host): r.outcome.value for r in result.results}


LOOK = """
    name: look
    stages:
      - {name: supervisor, step: supervisor.up}
      - {name: disks, step: disk.usage, params: {mounts: [/], threshold: THRESHOLD}}
"""


class Ear:
    """A listener that writes down what it hears, and how many connections were open at each pair's start."""

    def __init__(self, transport: Transport):
        self.transport, self.heard, self.open = transport, [], []

    def stage_started(self, planned, hosts):
        self.heard.append(("stage", planned.index))

    def host_started(self, planned, host):
        self.open.append(sum(h._connection is not None for h in self.transport._hosts.values()))

    def host_finished(self, result):
        self.heard.append(("host", result.stage_index))


def test_a_read_only_run_goes_host_by_host_within_forks_connections_and_is_heard_stage_by_stage(lab, tmp_path):
    from overhaul.runner import Runner

    inventory = lab_inventory(lab)
    inventory = inventory.model_copy(update={"ssh": inventory.ssh.model_copy(update={"forks": 2})})  # ssh.forks: 2
    hosts = [host.name for host in inventory.hosts]
    plan = plan_for(LOOK.replace("THRESHOLD", "100"), tmp_path, inventory)
    transport = Transport(inventory)
    ear = Ear(transport)
    try:
        result = Runner(plan, transport, listeners=[ear]).run()
        left_open = [h.name for h in transport._hosts.values() if h._connection is not None]
    finally:
        transport.close()
    assert [(r.stage_index, r.host, r.outcome.value) for r in result.results] == \
        [(0, host, "ok") for host in hosts] + [(1, host, "ok") for host in hosts]
    # Stage by stage, every host would still be connected at the second stage; host by host, two at most.
    assert max(ear.open) <= 2 and len(ear.open) == 2 * len(hosts)
    assert left_open == []  # each host's connection closed once its stages were done
    assert ear.heard == [("stage", 0), *[("host", 0)] * len(hosts), ("stage", 1), *[("host", 1)] * len(hosts)]


CHANGES = """
    name: changes
    stages:
      - {name: one, step: shell, params: {command: 'true'}}
      - {name: two, step: shell, params: {command: 'true'}}
      - {name: three, step: shell, params: {command: 'true'}}
      - {name: last, step: shell, hosts: [app1], params: {command: 'true'}}
"""


def open_connections(transport: Transport) -> list[str]:
    return [h.name for h in transport._hosts.values() if h._connection is not None]


def test_a_run_closes_a_hosts_connection_once_the_host_has_no_stage_left(lab, tmp_path):
    from overhaul.runner import Runner

    inventory = lab_inventory(lab)  # 4 hosts, forks above that: every connection may stay open between stages
    plan = plan_for(CHANGES, tmp_path, inventory)
    transport = Transport(inventory)
    ear = Ear(transport)
    try:
        transport.connect(plan.hosts)
        result = Runner(plan, transport, listeners=[ear]).run()
        left_open = open_connections(transport)
    finally:
        transport.close()
    assert [r.outcome.value for r in result.results] == ["changed"] * (3 * len(inventory.hosts) + 1)
    assert ear.open[:-1] == [len(inventory.hosts)] * 3 * len(inventory.hosts)  # reused from stage to stage ...
    assert ear.open[-1] == 1  # ... but at the last stage, only app1's is still open: the others had no stage left
    assert left_open == ["app1"]  # (kept for what may follow on the transport, an undo or hooks: its owner closes it)


def test_a_run_on_more_hosts_than_forks_keeps_forks_connections_open_from_its_preflight_to_its_end(lab, tmp_path):
    """A pool that keeps no idle connection (`keep` 0; by default it keeps up to 10 per fork, see
    test_transport_sessions): a host is let go after each use, so at most `forks` connections are ever open."""
    from overhaul.preflight import run_preflight
    from overhaul.runner import Runner

    inventory = lab_inventory(lab)
    inventory = inventory.model_copy(update={"ssh": inventory.ssh.model_copy(update={"forks": 2})})  # 4 hosts, 2 forks
    plan = plan_for(CHANGES, tmp_path, inventory)
    transport = Transport(inventory)
    transport.keep = 0
    ear = Ear(transport)
    try:
        report = run_preflight(plan, transport, "preflight")
        after_preflight = open_connections(transport)
        result = Runner(plan, transport, listeners=[ear]).run()
        left_open = open_connections(transport)
    finally:
        transport.close()
    assert report.ok, report.refusals
    assert after_preflight == []  # each host let go once its preflight was done: its first stage reconnects
    assert [r.outcome.value for r in result.results] == ["changed"] * (3 * len(inventory.hosts) + 1)
    assert max(ear.open) <= 1  # as a pair starts, its host was let go after its last use; the other worker's may be open
    assert left_open == []  # app1 too, let go after the last stage's pair like every other


def test_a_read_only_run_reads_each_host_in_one_command_and_each_stage_judges_its_own_answer(lab, tmp_path):
    """Host by host, what all of a host's stages read goes to it as one command (status reads back to back are one
    round trip), and each stage still judges its own answer: every disk is over 1 %, every supervisor runs."""
    from overhaul.runner import Runner

    class Commands:
        def __init__(self):
            self.sent = Counter()

        def command_done(self, host, result):
            self.sent[host] += 1

        def stage_started(self, planned, hosts):
            pass

        def host_started(self, planned, host):
            return True

        def host_finished(self, result):
            pass

    inventory = lab_inventory(lab)
    plan = plan_for(LOOK.replace("THRESHOLD}", "1}, on_failure: continue").replace("up}", "up, on_failure: continue}"),
                    tmp_path, inventory)
    transport = Transport(inventory)
    commands = Commands()
    try:
        runner = Runner(plan, transport, listeners=[commands], log_dir=tmp_path / "logs")
        assert runner.host_by_host
        result = runner.run()
    finally:
        transport.close()
    hosts = [host.name for host in inventory.hosts]
    assert commands.sent == {host: 1 for host in hosts}  # (stage by stage: one per stage)
    for host in hosts:  # each stage's log: the command, or where its answers were read
        assert "service scalr status" in (tmp_path / f"logs/01-supervisor-{host}.log").read_text()
        assert "df -P -- /" in (tmp_path / f"logs/01-supervisor-{host}.log").read_text()
        assert (tmp_path / f"logs/02-disks-{host}.log").read_text() == (
            f"# read with the command of stage 1 (see 01-supervisor-{host}.log)\n")
    assert {(r.stage, r.outcome.value) for r in result.results} == {("supervisor", "ok"), ("disks", "failed")}
    assert all("is running" in r.message for r in result.results if r.stage == "supervisor")
    assert all("/ at" in r.message and "%" in r.message for r in result.results if r.stage == "disks")


def test_a_read_only_stage_over_its_failure_budget_stops_the_run_host_by_host_too(lab, tmp_path):
    inventory = lab_inventory(lab)
    plan = plan_for(LOOK.replace("THRESHOLD", "1").replace("- {name: supervisor, step: supervisor.up}", "")
                    + "      - {name: after, step: supervisor.up}\n", tmp_path, inventory)
    from overhaul.runner import Runner

    transport = Transport(inventory, max_workers=2)
    try:
        result = Runner(plan, transport).run()
    finally:
        transport.close()
    disks = [r for r in result.results if r.stage == "disks"]
    failed = [r for r in disks if r.outcome.value == "failed"]
    assert 1 <= len(failed) <= 2 and all("/" in r.message for r in failed)  # the two workers' first hosts
    assert {r.message for r in disks if r not in failed} <= {"stage failure budget exceeded"}
    assert {(r.outcome.value, r.message) for r in result.results if r.stage == "after"} == \
        {("skipped", "run stopped at stage 'disks'")}
    assert result.stopped_at == "disks" and result.failed
    assert result.stop_reason == f"{len(failed)} of {len(disks)} hosts failed (max_failures 0)"


def test_a_stage_of_concurrency_1_over_its_budget_starts_no_more_of_its_pairs_host_by_host(lab, tmp_path):
    """Every worker waits for the stage's one slot; once the first pair failed, those waiting start nothing."""
    from overhaul.runner import Runner

    inventory = lab_inventory(lab)
    plan = plan_for(LOOK.replace("THRESHOLD", "1").replace("threshold: 1}", "threshold: 1}, concurrency: 1"),
                    tmp_path, inventory)
    transport = Transport(inventory)  # as wide as the lab: every host's worker is there at once
    try:
        result = Runner(plan, transport).run()
    finally:
        transport.close()
    disks = {r.host: (r.outcome.value, r.message) for r in result.results if r.stage == "disks"}
    assert sorted(outcome for outcome, _ in disks.values()) == ["failed"] + ["skipped"] * (len(disks) - 1)
    assert {message for outcome, message in disks.values() if outcome == "skipped"} == {"stage failure budget exceeded"}
    assert result.stop_reason == f"1 of {len(disks)} hosts failed (max_failures 0)"


def test_known_hosts_looked_up_by_name_answer_as_paramikos_linear_scan(tmp_path):
    """The index (constant-time lookup) finds what paramiko's scan of every line finds: plain, [address]:port,
    several names on a line, hashed names, duplicates (the first line wins) and names it does not know."""
    import paramiko

    from overhaul.transport import load_known_hosts

    keys = [paramiko.ECDSAKey.generate() for _ in range(5)]

    def line(names: str, key: paramiko.PKey) -> str:
        return f"{names} {key.get_name()} {key.get_base64()}\n"

    path = write(tmp_path / "known_hosts", "# a comment\n" + line("host-a", keys[0]) + line("[10.0.0.1]:2222", keys[1])
                 + line(paramiko.HostKeys.hash_host("host-h"), keys[2]) + line("host-a", keys[3])
                 + line("host-b,host-c", keys[4]) + line(paramiko.HostKeys.hash_host("host-a"), keys[4]))
    ours = load_known_hosts(path)
    scan = paramiko.HostKeys()
    scan._entries = list(ours._entries)  # the same lines, looked up the way paramiko does: every line, in order

    def found(keys: paramiko.HostKeys, name: str) -> dict[str, str] | None:
        answer = keys.lookup(name)
        return None if answer is None else {kind: key.get_base64() for kind, key in answer.items()}

    names = ["host-a", "[10.0.0.1]:2222", "10.0.0.1", "host-h", "host-b", "host-c", "nobody"]
    assert [found(ours, name) for name in names] == [found(scan, name) for name in names]
    assert found(ours, "host-a") == {keys[0].get_name(): keys[0].get_base64()}  # the first line
    assert found(ours, "host-h") == {keys[2].get_name(): keys[2].get_base64()}
    assert found(ours, "nobody") is None and ours.check("host-c", keys[4]) and not ours.check("host-c", keys[0])
    known = [name for name in names if scan.lookup(name) is not None]  # the type SSHClient.connect asks for first
    assert [ours.lookup(name).keys()[0] for name in known] == [scan.lookup(name).keys()[0] for name in known]


def test_a_host_by_host_run_journals_each_command_with_its_own_stage(lab, tmp_path):
    """One worker: a host's later pairs run while its earlier results wait for the other hosts (to be told stage
    by stage); each pair's commands are still journaled with that pair, not with the one told before it."""

    from overhaul.execution import Execution
    from overhaul.state import SQLiteState
    from overhaul.step import AssertionStep, Check, Params, Registry

    class Word(Params):
        word: str

    class Say(AssertionStep):  # a read-only step that runs a command of its own (no probe to read ahead)
        name = "test.say"
        Params = Word

        def check(self, host):
            return Check(host.run(f"echo {self.params.word}").ok, "said")

    registry = Registry()
    registry.add(Say)
    inventory = lab_inventory(lab)
    plan = plan_for("name: say\nstages:\n" + "".join(f"  - {{name: s{n}, step: test.say, params: {{word: w{n}}}}}\n"
                                                     for n in range(3)), tmp_path, inventory, registry=registry)
    state = SQLiteState(tmp_path / "journal.sqlite")
    transport = Transport(inventory, max_workers=1)
    try:
        result = Execution(plan, state=state, transport=transport).read()
    finally:
        transport.close()
    assert not result.failed
    commands = state.commands(result.run_id)
    assert {(c.stage_index, c.host) for c in commands} == {(stage, h.name) for stage in range(3) for h in inventory.hosts}
    for command in commands:
        assert f"echo w{command.stage_index}" in command.command, command


def test_a_verify_whose_last_results_cannot_be_journaled_ends_interrupted(lab, tmp_path):
    """The ends of a verify's pairs are written together, the last ones when the run ends: if the disk refuses them,
    the run does not end as if recorded (as when any journal write fails: interrupted, exit 130)."""

    from overhaul.execution import Execution, exit_code
    from overhaul.state import SQLiteState, StateError

    class FullDisk(SQLiteState):
        def record_ends(self, ends):
            raise StateError("database or disk is full")

    inventory = lab_inventory(lab)
    plan = plan_for(LOOK.replace("THRESHOLD", "100"), tmp_path, inventory)
    state = FullDisk(tmp_path / "journal.sqlite")
    result = Execution(plan, state=state).read()
    assert result.interrupted and exit_code(result) == 130
    assert state.run(result.run_id).status == "interrupted"


def test_making_connections_leaves_the_one_shared_fabric_configuration_untouched(lab):
    """Every connection reads one Fabric configuration; one that wrote to it (fabric stores an undeclared attribute
    there, then merges the configuration again) would make other threads' reads of it fail now and then."""
    from overhaul.transport import _fabric_config, make_connection

    inventory = lab_inventory(lab)
    connections = [make_connection(host.address, host.port or inventory.ssh.port, "root", inventory, None)
                   for host in inventory.hosts]
    assert all(connection.config is _fabric_config() for connection in connections)
    assert _fabric_config()._modifications == {}
