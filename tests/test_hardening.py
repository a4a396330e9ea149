"""The engine's edge cases on real lab hosts: failure budgets, retries, dead links, frozen hosts, signals,
the controller's own disk, read-only checks, resuming a failed run, stages without hosts, shell quoting."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
from helpers import lab_inventory, outcomes, overhaul_cli, plan_for, run, write

from overhaul.errors import ConfigError
from overhaul.execution import _journal_new_run, recorded_hosts
from overhaul.inventory import load_inventory
from overhaul.lab import faults
from overhaul.plan import Plan, build_plan
from overhaul.preflight import run_preflight
from overhaul.runbook import load_runbook
from overhaul.runner import Runner
from overhaul.state import SQLiteState
from overhaul.step import Registry
from overhaul.transport import Transport


def cli(lab, cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return overhaul_cli(cwd, *args, "--hosts-dir", str(lab.inventory.parent), env=env)


def count(lab, host: str, command: str) -> int:
    return int(lab.host(host).exec(command, check=False).stdout.strip() or 0)


def running(lab, host: str, needle: str) -> bool:
    """Whether a process of the host has `needle` in its command line (read from outside the host)."""
    for pid in lab.host(host).processes():
        try:
            if needle in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode():
                return True
        except OSError:
            continue
    return False


def test_on_failure_continue_runs_every_host_of_a_big_farm(fresh_lab, tmp_path):
    lab = fresh_lab(22)  # more hosts than the default concurrency (10)
    broken = ["app1", "app7", "app19"]
    for host in broken:
        faults.break_service(lab.host(host), "plotter")
    try:
        proc = cli(lab, tmp_path, "verify", "--env", "lab")
    finally:
        for host in broken:
            faults.repair_service(lab.host(host), "plotter")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "verify: 85 passed, 3 failed, 0 skipped" in proc.stdout  # 4 checks x 22 hosts, every one of them run
    for host in broken:
        assert f"FAILED services running on {host}: not RUNNING: plotter FATAL" in proc.stdout


def test_a_bug_in_a_step_fails_at_once_with_its_traceback_in_the_host_log(lab, tmp_path):
    write(tmp_path / "steps" / "buggy.py", """
        from overhaul.step import Check, Step

        class Buggy(Step):
            name = "local.buggy"

            def check(self, host):
                host.run("echo checking")
                return Check(False, "never done")

            def apply(self, host):
                return str(1 / 0)
    """)
    write(tmp_path / "runbooks" / "buggy.yaml", """
        name: buggy
        stages:
          - {name: divide, step: local.buggy, hosts: [app1], retry: {attempts: 3, delay: 0}}
    """)
    proc = cli(lab, tmp_path, "run", "buggy", "--env", "lab", "--steps-dir", str(tmp_path / "steps"),
               "--runbooks-dir", str(tmp_path / "runbooks"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    [run_record] = SQLiteState(tmp_path / "journal.sqlite").runs("lab")
    [result] = SQLiteState(tmp_path / "journal.sqlite").results(run_record.id)
    assert result.attempts == 1  # a bug is not retried
    assert "raised ZeroDivisionError: division by zero" in result.message
    log = Path(result.output_path).read_text()
    assert "$ echo checking" in log and "Traceback (most recent call last)" in log and "1 / 0" in log


def test_a_step_failure_is_retried_per_its_policy(lab, tmp_path):
    marker = "/tmp/overhaul-retry-counter"
    lab.host("app1").exec(f"rm -f {marker}")
    result = run(f"""
        name: flaky
        stages:
          - name: third time lucky
            step: shell
            hosts: [app1]
            retry: {{attempts: 3, delay: 0}}
            params: {{command: "echo x >> {marker}; [ $(wc -l < {marker}) -ge 3 ]"}}
    """, tmp_path, lab_inventory(lab))
    [only] = result.results
    assert (only.outcome.value, only.attempts) == ("changed", 3)
    lab.host("app1").exec(f"rm -f {marker}")


def test_a_remote_process_killed_by_a_signal_is_reported_as_such(lab, tmp_path):
    result = run("""
        name: killed
        stages:
          - {name: kill, step: shell, hosts: [app1], params: {command: "kill -9 $PPID"}}
          - {name: after, step: shell, hosts: [app1], params: {command: "true"}}
    """, tmp_path, lab_inventory(lab))
    [killed] = [r for r in result.results if r.stage == "kill"]
    assert killed.outcome.value == "failed"
    assert "killed by a signal on the host" in killed.message
    assert "connection lost" not in killed.message


def test_a_frozen_host_costs_one_timeout_and_the_others_finish(lab, tmp_path):
    inventory = lab_inventory(lab)
    plan = plan_for("""
        name: frozen
        stages:
          - name: a few commands
            step: shell
            timeout: 3
            params: {command: "touch /tmp/overhaul-frozen", unless: "test -e /tmp/overhaul-frozen"}
    """, tmp_path, inventory)
    for host in plan.hosts:
        lab.host(host).exec("rm -f /tmp/overhaul-frozen")
    transport = Transport(inventory)
    try:
        assert not transport.connect(plan.hosts)
        faults.freeze(lab.host("app2"))
        started = time.monotonic()
        try:
            result = Runner(plan, transport, sleep=lambda _: None).run()
        finally:
            faults.thaw(lab.host("app2"))
        elapsed = time.monotonic() - started
    finally:
        transport.close()
    assert outcomes(result, "a few commands") == {"db1": "changed", "worker1": "changed", "app1": "changed",
                                                  "app2": "failed"}
    [frozen] = [r for r in result.results if r.host == "app2"]
    assert "host frozen or overloaded?" in frozen.message
    assert elapsed < 3 + 10 + 5, elapsed  # one timeout plus its grace, not one per command


def test_show_says_which_command_a_host_froze_in(lab, tmp_path):
    """A pair that failed because its host stopped answering has no output, but its log and `show` say the command
    it was in when the host froze."""
    write(tmp_path / "runbooks" / "stuck.yaml", """
        name: stuck
        stages:
          - {name: long work, step: shell, hosts: [app2], timeout: 3, retry: {attempts: 1},
             params: {command: "echo starting; sleep 31.5"}}
    """)
    app2 = lab.host("app2")
    started = subprocess.Popen([sys.executable, "-m", "overhaul", "run", "stuck", "--env", "lab", "--runbooks-dir",
                                str(tmp_path / "runbooks"), "--hosts-dir", str(lab.inventory.parent)], cwd=tmp_path,
                               env={**os.environ, "OVERHAUL_JOURNAL": str(tmp_path / "journal.sqlite")},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 120
        while not running(lab, "app2", "sleep 31.5") and started.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        faults.freeze(app2)  # in the middle of its command
        try:
            out, _ = started.communicate(timeout=120)
        finally:
            faults.thaw(app2)
    finally:
        started.kill()
        app2.exec("pkill -f 'sleep 31.5'", check=False)
    assert started.returncode == 1, out
    shown = overhaul_cli(tmp_path, "show", "last").stdout
    assert "last output: $ echo starting; sleep 31.5" in shown, shown
    assert "[no answer: app2: no answer by the command's deadline" in shown, shown
    assert "output: " in shown.replace("last output: ", "")  # and where the whole log is


def test_check_is_read_only_even_for_latest(lab, tmp_path):
    inventory = lab_inventory(lab)
    plan = plan_for("""
        name: look
        params: {version: latest}
        stages:
          - {name: upgrade, step: package.upgrade, params: {version: "${version}"}}
          - {name: stop, step: services.stop}
    """, tmp_path, inventory)
    transport = Transport(inventory)
    try:
        result = Runner(plan, transport, check_only=True).run()
        commands = [c.command for name in plan.hosts for c in transport.host(name).history]
    finally:
        transport.close()
    assert set(outcomes(result, "upgrade").values()) == {"changed"}  # would change 1.0.0 -> 1.1.0
    assert commands and not [c for c in commands if "apt-get update" in c or "apt-get install" in c or "stop all" in c]


def test_a_stage_that_selects_no_host_is_an_input_error_unless_optional(lab, tmp_path):
    text = """
        name: nohost
        stages:
          - {name: on app1 only, step: shell, hosts: [app1], params: {command: "true"}}
          - {name: nothing left, step: shell, roles: [app], exclude: [app1, app2], OPTIONAL params: {command: "true"}}
    """
    with pytest.raises(ConfigError, match=r"stages\[1\] \('nothing left'\): selects no host of 'lab'"):
        plan_for(text.replace("OPTIONAL ", ""), tmp_path, lab_inventory(lab))
    plan: Plan = plan_for(text.replace("OPTIONAL ", "optional: true, "), tmp_path, lab_inventory(lab))
    assert plan.stages[1].hosts == []


def test_shell_values_are_quoted_with_the_q_form(lab, tmp_path):
    lab.host("app1").exec("rm -f /tmp/overhaul-said /tmp/overhaul-pwned")
    result = run("""
        name: say
        params: {word: null}
        stages:
          - {name: say, step: shell, hosts: [app1], params: {command: "printf %s ${q:word} > /tmp/overhaul-said"}}
    """, tmp_path, lab_inventory(lab), params={"word": "it's; touch /tmp/overhaul-pwned; $(touch /tmp/overhaul-pwned)"})
    assert outcomes(result, "say") == {"app1": "changed"}
    assert lab.host("app1").exec("cat /tmp/overhaul-said").stdout == \
        "it's; touch /tmp/overhaul-pwned; $(touch /tmp/overhaul-pwned)"
    assert lab.host("app1").exec("test -e /tmp/overhaul-pwned", check=False).returncode != 0
    lab.host("app1").exec("rm -f /tmp/overhaul-said")


def test_a_failed_run_is_resumed_after_the_repair_and_says_how(lab, tmp_path):
    marker = "/tmp/overhaul-repaired"
    lab.host("app2").exec(f"rm -f {marker}")
    write(tmp_path / "runbooks" / "needs.yaml", f"""
        name: needs
        stages:
          - {{name: first, step: shell, hosts: [app1], params: {{command: "true"}}}}
          - {{name: needs repair, step: shell, hosts: [app2], params: {{command: "test -e {marker}"}}}}
    """)
    failed = cli(lab, tmp_path, "run", "needs", "--env", "lab", "--runbooks-dir", str(tmp_path / "runbooks"))
    assert failed.returncode == 1, failed.stdout + failed.stderr
    verdict, hint = failed.stdout.rstrip().splitlines()[-2:]  # the verdict, then what to type next
    assert hint == "after repairing the cause, continue with: overhaul resume --env lab (or leave it: a failed run " \
                   "does not block the next one)"
    assert verdict.startswith("run ") and " failed in " in verdict
    lab.host("app2").exec(f"touch {marker}")
    try:
        resumed = cli(lab, tmp_path, "resume", "--env", "lab")
    finally:
        lab.host("app2").exec(f"rm -f {marker}")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    state = SQLiteState(tmp_path / "journal.sqlite")
    [record] = state.runs("lab")
    assert record.status == "succeeded"
    assert {(r.stage, r.host, r.outcome) for r in state.results(record.id)} == {
        ("first", "app1", "changed"), ("needs repair", "app2", "changed")}


def test_a_controller_that_cannot_write_its_run_log_stops_interrupted_and_resumable(lab, tmp_path):
    (tmp_path / "runs").write_text("a file where the run logs' folder should be\n")  # every log write fails
    write(tmp_path / "runbooks" / "two.yaml", """
        name: two
        stages:
          - {name: one, step: shell, hosts: [app1], params: {command: "echo one"}}
          - {name: two, step: shell, hosts: [app1], params: {command: "echo two"}}
    """)
    proc = cli(lab, tmp_path, "run", "two", "--env", "lab", "--runbooks-dir", str(tmp_path / "runbooks"))
    assert proc.returncode == 130, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "error: cannot write the run log" in proc.stderr and "overhaul resume --env lab" in proc.stderr
    state = SQLiteState(tmp_path / "journal.sqlite")
    [record] = state.runs("lab")
    assert record.status == "interrupted" and state.lock("lab") is None
    assert [r.stage for r in state.results(record.id)] == ["one"]  # stage two never started
    (tmp_path / "runs").unlink()
    resumed = cli(lab, tmp_path, "resume", "--env", "lab")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert state.run(record.id).status == "succeeded"


@pytest.mark.skipif(shutil.which("mount") is None, reason="needs mount(8)")
def test_a_journal_whose_disk_fills_stops_the_run_interrupted(lab, tmp_path):
    journal_dir = tmp_path / "journal"
    journal_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "overhaul-test-journal", str(journal_dir)], check=True)
    try:
        write(tmp_path / "runbooks" / "slow.yaml", """
            name: slow
            stages:
              - {name: slow, step: shell, hosts: [app1], params: {command: "sleep 3"}}
              - {name: after, step: shell, hosts: [app1], params: {command: "true"}}
        """)
        env = dict(os.environ, OVERHAUL_JOURNAL=str(journal_dir / "journal.sqlite"))
        proc = subprocess.Popen([sys.executable, "-m", "overhaul", "run", "slow", "--env", "lab", "--hosts-dir",
                                 str(lab.inventory.parent), "--runbooks-dir", str(tmp_path / "runbooks")],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        state = SQLiteState(journal_dir / "journal.sqlite")
        deadline = time.monotonic() + 30
        while not [r for run_record in state.runs("lab") for r in state.results(run_record.id)]:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        state.close()
        fill = journal_dir / "fill"
        subprocess.run(["dd", "if=/dev/zero", f"of={fill}", "bs=64k"], capture_output=True)  # until the disk is full
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, out + err
        assert "Traceback" not in err
        # The run's log and the journal share the full disk: whichever write failed first stopped the run.
        assert ("error: cannot write the journal" in err or "error: cannot write the run log" in err), err
        assert "overhaul resume --env lab" in err
        fill.unlink()
        state = SQLiteState(journal_dir / "journal.sqlite")
        [record] = state.runs("lab")
        assert record.status == "running"  # the end could not be written: a crashed run, resumable
        resumed = overhaul_cli(tmp_path, "resume", "--env", "lab", "--hosts-dir", str(lab.inventory.parent),
                               env={"OVERHAUL_JOURNAL": str(journal_dir / "journal.sqlite")})
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert state.run(record.id).status == "succeeded"
        state.close()
    finally:
        subprocess.run(["umount", "-l", str(journal_dir)], check=False)


SLOW_DUMP = "#!/bin/sh\nsleep 4\nexec mysqldump \"$@\"\n"


def test_killing_the_controller_mid_dump_then_resuming_leaves_one_backup(fresh_lab, tmp_path):
    lab = fresh_lab(3)
    lab.host("db1").exec("cat > /usr/local/bin/slow-mysqldump && chmod 755 /usr/local/bin/slow-mysqldump", input=SLOW_DUMP)
    runbook = Path("runbooks/upgrade.yaml").read_text().replace(
        "      password_secret: ${backup_secret}\n",
        "      password_secret: ${backup_secret}\n      mysqldump: /usr/local/bin/slow-mysqldump\n")
    write(tmp_path / "runbooks" / "upgrade.yaml", runbook)
    env = dict(os.environ, OVERHAUL_JOURNAL=str(tmp_path / "journal.sqlite"))
    proc = subprocess.Popen([sys.executable, "-m", "overhaul", "upgrade", "--env", "lab", "--version", "1.1.0", "--yes",
                             "--hosts-dir", str(lab.inventory.parent), "--runbooks-dir", str(tmp_path / "runbooks")],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not running(lab, "db1", "slow-mysqldump"):
        assert time.monotonic() < deadline and proc.poll() is None, "the dump never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # in the middle of the dump's command, not after a journal write
    proc.wait()
    resumed = cli(lab, tmp_path, "resume", "--env", "lab")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert count(lab, "db1", "ls /var/backups/overhaul/*.sql.gz | wc -l") == 1
    for host in ("db1", "worker1", "app1"):
        assert count(lab, host, "grep -c 'upgrade scalr-server:all 1.0.0 1.1.0' /var/log/dpkg.log") == 1, host


def test_a_link_dropped_during_the_install_then_resume_installs_once(fresh_lab, tmp_path):
    lab = fresh_lab(3)
    # Make each install last a few seconds (a dpkg hook), so the link can drop in the middle of it.
    for host in ("db1", "worker1", "app1"):
        lab.host(host).exec("echo 'DPkg::Pre-Invoke {\"sleep 3\";};' > /etc/apt/apt.conf.d/99slow")
    env = dict(os.environ, OVERHAUL_JOURNAL=str(tmp_path / "journal.sqlite"))
    proc = subprocess.Popen([sys.executable, "-m", "overhaul", "upgrade", "--env", "lab", "--version", "1.1.0", "--yes",
                             "--hosts-dir", str(lab.inventory.parent)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 90
    while not running(lab, "worker1", "apt-get install"):
        assert time.monotonic() < deadline and proc.poll() is None, "the install never started"
        time.sleep(0.05)
    faults.stop_sshd(lab.host("worker1"))  # the link drops: no new connection, and the session is killed
    for pid in lab.host("worker1").processes():  # and the session's sshd is killed: the link is gone
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sshd: root"):
                os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out  # the pair failed: connection lost during a command
    assert "worker1" in out and "connection lost" in out
    faults.start_sshd(lab.host("worker1"))
    resumed = cli(lab, tmp_path, "resume", "--env", "lab")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    for host in ("db1", "worker1", "app1"):
        assert count(lab, host, "grep -c 'upgrade scalr-server:all 1.0.0 1.1.0' /var/log/dpkg.log") == 1, host
        assert lab.host(host).exec("dpkg-query -W -f '${Version}' scalr-server").stdout == "1.1.0"


def _string_fields(step) -> list[tuple[str, bool]]:
    """(field, is a list) for every string parameter of a step's Params."""
    found = []
    for name, info in step.Params.model_fields.items():
        annotation = str(info.annotation)
        if annotation in ("<class 'str'>", "str | None", "typing.Optional[str]", "list[str]"):
            found.append((name, annotation == "list[str]"))
    return found


COMMANDS_BY_DESIGN = {("shell", "command"), ("shell", "unless")}  # a shell command is what these are for


def test_shell_metacharacters_in_any_parameter_of_any_built_in_step_run_nothing(fresh_lab, tmp_path):
    lab = fresh_lab(3)
    inventory = lab_inventory(lab)
    registry = Registry()
    marker = "/tmp/overhaul-pwned"
    payloads = [f"a'\"; touch {marker}; $(touch {marker}) `touch {marker}` #", f"b\ntouch {marker}\n"]
    tried = 0
    for step_name in registry.names():
        step = registry.get(step_name)
        for field, is_list in _string_fields(step):
            if (step_name, field) in COMMANDS_BY_DESIGN:
                continue
            for payload in payloads:
                params = {field: [payload] if is_list else payload}
                if step_name == "shell":
                    params.setdefault("command", "true")
                runbook = {"name": "probe", "stages": [{"name": "probe", "step": step_name, "hosts": ["db1"],
                                                        "params": params}]}
                try:
                    plan = plan_for(json.dumps(runbook), tmp_path, inventory, registry=registry)
                except ConfigError:
                    continue  # refused as input: nothing reached a host
                tried += 1
                transport = Transport(inventory, plan.redactor)
                try:
                    run_preflight(plan, transport, "probe")
                    Runner(plan, transport, check_only=True, sleep=lambda _: None).run()  # plan
                    Runner(plan, transport, sleep=lambda _: None).run()  # run
                finally:
                    transport.close()
    assert tried >= 10, tried
    for host in ("db1", "worker1", "app1"):
        assert lab.host(host).exec(f"test -e {marker}", check=False).returncode != 0, host
    assert not Path(marker).exists()


LEAKY_STEP = '''
import base64, json, urllib.parse

from overhaul.errors import StepFailed
from overhaul.step import Check, Params, Step


class LeakParams(Params):
    fail: bool = False


class Leak(Step[LeakParams]):
    """Prints its secret every way it can: stdout, stderr, encoded, in facts and in an error."""

    name = "local.leak"
    Params = LeakParams

    def secrets(self):
        return ["leaky"]

    def check(self, host):
        return Check(False, "not yet")

    def apply(self, host):
        value = host.secret("leaky")
        forms = [base64.b64encode(value.encode()).decode(), urllib.parse.quote(value), json.dumps(value)[1:-1]]
        host.run('cat; cat >&2; printf "%s\\\\n" "$@"', stdin=value + "\\\\n")
        host.run("cat", stdin="\\\\n".join(forms) + "\\\\n")
        if self.params.fail:
            raise StepFailed(f"could not use {value}")
        return "leaked"

    def verify(self, host):
        return Check(True, "ok", {"token": host.secret("leaky")})
'''


def test_a_secret_a_step_prints_is_masked_everywhere(lab, tmp_path):
    secret = 'Zx9"q/w+e r&t=Yu'  # characters that every encoding changes
    (tmp_path / "leaky.secret").write_text(secret + "\n")
    (tmp_path / "leaky.secret").chmod(0o600)
    hosts = lab.inventory.parent  # beside the lab's inventory: its relative key paths hold
    text = lab.inventory.read_text().replace("environment: lab", "environment: leak")
    text = text.replace("secrets:\n", f"secrets:\n  leaky: {{file: {tmp_path / 'leaky.secret'}}}\n")
    write(hosts / "leak.yaml", text)
    write(tmp_path / "steps" / "leak.py", LEAKY_STEP)
    write(tmp_path / "runbooks" / "leak.yaml", """
        name: leak
        params: {note: ""}
        stages:
          - {name: print it, step: local.leak, hosts: [app1]}
          - {name: fail with it, step: local.leak, hosts: [app1], params: {fail: true}}
    """)
    try:
        proc = overhaul_cli(tmp_path, "run", "leak", "--env", "leak", "--hosts-dir", str(hosts), "--steps-dir",
                            str(tmp_path / "steps"), "--runbooks-dir", str(tmp_path / "runbooks"), "--param",
                            f"note={secret}")
    finally:
        (hosts / "leak.yaml").unlink()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    state = SQLiteState(tmp_path / "journal.sqlite")
    [record] = state.runs("leak")
    shown = overhaul_cli(tmp_path, "show", record.id).stdout
    logs = list((tmp_path / "runs" / record.id).glob("*.log"))
    assert logs and "********" in logs[0].read_text() and "********" in shown
    forms = [secret, base64.b64encode(secret.encode()).decode(), urllib.parse.quote(secret), json.dumps(secret)[1:-1]]
    texts = {"console": proc.stdout + proc.stderr, "show": shown}
    texts |= {str(path): path.read_bytes().decode(errors="replace") for path in [*logs, *tmp_path.glob("journal.sqlite*")]}
    for where, text in texts.items():
        for form in forms:
            assert form not in text, (where, form)


def test_a_run_records_the_hosts_its_source_found_and_its_resume_works_on_them(aws, tmp_path):
    url, ec2, image = aws
    reply = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, TagSpecifications=[{"ResourceType": "instance", "Tags": [
        {"Key": "Name", "Value": "db-a"}, {"Key": "overhaul:role", "Value": "db"}, {"Key": "env", "Value": "prod"}]}])
    write(tmp_path / "hosts/known_hosts", "")
    write(tmp_path / "hosts/prod.yaml", f"""
        environment: prod
        ssh: {{known_hosts: known_hosts}}
        source: {{provider: aws-ec2, endpoint_url: "{url}", region: us-east-1, filters: {{env: prod}}}}
    """)
    inventory = load_inventory("prod", tmp_path / "hosts")
    plan = build_plan(load_runbook("verify"), inventory, Registry(), {})
    state = SQLiteState(tmp_path / "journal.sqlite")
    record = _journal_new_run(state, plan, "run-1")
    # The farm changes under the source: the instance is gone. The run's resume still works on db-a.
    ec2.terminate_instances(InstanceIds=[reply["Instances"][0]["InstanceId"]])
    with pytest.raises(ConfigError, match="no hosts"):
        load_inventory("prod", tmp_path / "hosts")  # asked now, the source finds nothing
    resumed = load_inventory("prod", tmp_path / "hosts", found=recorded_hosts(state, record))
    assert [(h.name, h.roles, h.address) for h in resumed.hosts] == [(h.name, h.roles, h.address) for h in inventory.hosts]
    assert [h.name for h in resumed.hosts] == ["db-a"]


def test_a_host_log_holds_each_command_as_it_completes_so_a_killed_run_shows_the_step_in_flight(lab, tmp_path):
    write(tmp_path / "runbooks" / "long.yaml", """
        name: long
        stages:
          - name: long step
            step: shell
            hosts: [app1]
            params: {unless: "echo checked-before-the-long-part; false", command: "sleep 30"}
    """)
    env = dict(os.environ, OVERHAUL_JOURNAL=str(tmp_path / "journal.sqlite"))
    proc = subprocess.Popen([sys.executable, "-m", "overhaul", "run", "long", "--env", "lab", "--hosts-dir",
                             str(lab.inventory.parent), "--runbooks-dir", str(tmp_path / "runbooks")],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not running(lab, "app1", "sleep 30"):
            assert time.monotonic() < deadline and proc.poll() is None, "the long part never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        lab.host("app1").exec("pkill -f 'sleep 30' || true", check=False)
    [log] = (tmp_path / "runs").glob("*/01-long-step-app1.log")
    text = log.read_text()
    assert "$ echo checked-before-the-long-part; false\nchecked-before-the-long-part\n[exit 1," in text


def test_a_command_runs_when_the_controller_holds_more_than_1024_files(lab):
    """A thousand hosts' connections push file descriptors past select()'s limit of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.fail(f"this test needs a hard limit of open files >= 2048 (ulimit -Hn is {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    null = os.open(os.devnull, os.O_RDONLY)
    held = [os.dup(null) for _ in range(1100)]
    transport = Transport(lab_inventory(lab))
    try:
        result = transport.host("db1").run("echo $((6 * 7))")
        assert result.ok and result.stdout.strip() == "42"
    finally:
        transport.close()
        for fd in [null, *held]:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
