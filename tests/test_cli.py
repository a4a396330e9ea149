"""The command line means what it says: every task's --help, no invoke flag that is ignored, exit codes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import PROCESS_OCTET, overhaul_cli, write

from overhaul.api import check_promotion
from overhaul.cli import EXIT_CODES, SHORT_FLAGS, describe_policy, namespace
from overhaul.errors import ConfigError, Refused
from overhaul.history import History
from overhaul.inventory import Policy, load_inventory_file
from overhaul.plan import limited_to
from overhaul.state import RunRecord, SQLiteState

ROOT = Path(__file__).resolve().parent.parent
TASKS = sorted(namespace.task_names)


def invoke_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`invoke` with this repository's tasks.py, as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), *args], cwd=cwd,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)


@pytest.mark.parametrize("task", TASKS)
def test_every_task_prints_its_help_with_overhaul_and_with_invoke(task, tmp_path):
    for proc in (overhaul_cli(tmp_path, task, "--help"), invoke_cli(tmp_path, task, "--help")):
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Options:" in proc.stdout or "none" in proc.stdout
        # every option says what it is for: its flag, then its help on the same line
        flags = [line for line in proc.stdout.partition("Options:")[2].splitlines() if line.startswith("  -")]
        assert all(re.fullmatch(r"  -\S.*?\s{2,}\S.*", line) for line in flags), proc.stdout
        assert "Traceback" not in proc.stderr
        # -h always means help: no task flag takes it.
        assert not re.search(r"^\s+-h\b", proc.stdout, re.M), proc.stdout


@pytest.mark.parametrize("task", TASKS)
def test_a_tasks_usage_line_says_what_it_takes_and_nothing_invoke_would(task, tmp_path):
    """`overhaul plan --help`: `Usage: overhaul plan [--options] RUNBOOK`, no `[other tasks here ...]`."""
    shown = overhaul_cli(tmp_path, task, "--help").stdout
    usage = shown.splitlines()[0]
    assert re.fullmatch(rf"Usage: overhaul {re.escape(task)} \[--options\]( [A-Z_]+)*", usage), shown
    assert "other tasks here" not in shown and "--core-opts" not in shown


def test_short_flags_mean_the_same_in_every_task(tmp_path):
    seen: dict[str, set[str]] = {}
    for task in TASKS:
        for short, long in re.findall(r"^\s+-(\w)(?: \w+)?, --([\w-]+)", overhaul_cli(tmp_path, task, "--help").stdout, re.M):
            seen.setdefault(short, set()).add(long)
    assert seen == {letter: {name} for name, letter in SHORT_FLAGS.items() if letter in seen}
    assert set(seen) == set(SHORT_FLAGS.values())


def test_help_lists_only_the_core_flags_overhaul_honours_and_the_exit_codes(tmp_path):
    out = overhaul_cli(tmp_path, "--help").stdout
    for ignored in ("--dry", "--echo", "--warn-only", "--pty", "--command-timeout", "--prompt-for-sudo-password",
                    "--hide", "--config", "--debug", "--write-pyc"):
        assert ignored not in out
    for kept in ("--help", "--version", "--list", "--print-completion-script"):
        assert kept in out
    assert EXIT_CODES in out


def test_overhaul_dry_is_a_usage_error_and_changes_nothing(lab, tmp_path):
    proc = overhaul_cli(tmp_path, "--dry", "upgrade", "--env", "lab", "--version", "1.1.0", "--yes",
                        "--hosts-dir", str(lab.inventory.parent))
    assert proc.returncode == 2
    assert "No idea what '--dry' is!" in proc.stderr
    assert not (tmp_path / "journal.sqlite").exists()
    assert lab.host("db1").exec("dpkg-query -W -f '${Version}' scalr-server").stdout == "1.0.0"


@pytest.mark.parametrize(("how", "flag"), [
    ("invoke", "--dry"), ("overhaul", "--check"), ("overhaul", "--dry-run")])
def test_invoke_dry_check_and_dry_run_show_the_plan_and_change_nothing(lab, tmp_path, how, flag):
    """The flags other tools use for "what would you do" (invoke's --dry, Ansible's --check, --dry-run) mean `plan`."""
    args = ("upgrade", "--env", "lab", "--version", "1.1.0", "--yes", "--hosts-dir", str(lab.inventory.parent))
    proc = invoke_cli(tmp_path, flag, *args) if how == "invoke" else overhaul_cli(tmp_path, *args, flag)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{flag}: showing the plan (as `overhaul plan` does); nothing is changed" in proc.stdout
    assert "plan only: nothing was changed" in proc.stdout
    for host in ("db1", "worker1", "app1", "app2"):
        assert lab.host(host).exec("dpkg-query -W -f '${Version}' scalr-server").stdout == "1.0.0"
        states = {line.split()[1] for line in lab.host(host).exec("scalr-server-manage status").stdout.splitlines()}
        assert states == {"RUNNING"}


def test_exit_code_1_when_a_host_fails_during_the_run(lab, tmp_path):
    runbooks = tmp_path / "runbooks"
    write(runbooks / "fails.yaml", """
        name: fails
        stages:
          - {name: fail on app1, step: shell, hosts: [app1], params: {command: "exit 7"}}
    """)
    proc = overhaul_cli(tmp_path, "run", "fails", "--env", "lab", "--hosts-dir", str(lab.inventory.parent),
                        "--runbooks-dir", str(runbooks))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED fail on app1 on app1: `exit 7` exited 7" in proc.stdout


@pytest.mark.parametrize(("args", "says"), [
    (("upgrade", "--env", "lab", "--no-such-flag", "--hosts-dir", "{hosts}"), "No idea what '--no-such-flag' is!"),
    (("upgrade", "--hosts-dir", "{hosts}"), "--env is required"),
    (("no-such-task",), "No idea what 'no-such-task' is!"),
    (("run", "no-such-runbook", "--env", "lab", "--hosts-dir", "{hosts}"), "unknown runbook 'no-such-runbook'"),
    (("apply", "missing-plan.json"), "missing-plan.json: no such plan file"),
    (("history", "--count", "many"), "invalid literal for int()"),
    (("upgrade", "--env", "nowhere", "--version", "1.1.0", "--hosts-dir", "{hosts}"), "unknown environment 'nowhere'"),
])
def test_exit_code_2_for_bad_input_or_usage(lab, tmp_path, args, says):
    proc = overhaul_cli(tmp_path, *(arg.format(hosts=lab.inventory.parent) for arg in args))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert says in proc.stderr


def test_exit_code_2_for_a_plan_file_that_is_not_a_plan(tmp_path):
    for name, content in (("bad.json", "{not json"), ("other.json", '{"format": 1}'), ("binary.json", b"\xff\xfe")):
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        proc = overhaul_cli(tmp_path, "apply", str(path))
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert str(path) in proc.stderr and "Traceback" not in proc.stderr


def test_a_run_says_its_id_and_log_folder_first_and_how_it_ended_last(lab, tmp_path):
    runbooks = tmp_path / "runbooks"
    write(runbooks / "stops.yaml", """
        name: stops
        stages:
          - {name: first, step: shell, hosts: [app1], params: {command: "echo one; echo two >&2; exit 3"}}
          - {name: second, step: shell, hosts: [app1, app2], params: {command: "true"}}
          - {name: third, step: shell, hosts: [app2], params: {command: "true"}}
    """)
    proc = overhaul_cli(tmp_path, "run", "stops", "--env", "lab", "--hosts-dir", str(lab.inventory.parent),
                        "--runbooks-dir", str(runbooks))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    [record] = SQLiteState(tmp_path / "journal.sqlite").runs("lab")
    lines = proc.stdout.splitlines()
    assert f"run {record.id}: stops on lab, 2 hosts, logs in {Path('runs') / record.id}" in proc.stdout.replace(
        str(tmp_path) + "/", "")
    assert "== stage 2 second: skipped, run stopped at stage 'first'" in lines
    assert "== stage 3 third: skipped, run stopped at stage 'first'" in lines
    assert not [line for line in lines if line.strip().startswith(("app1", "app2")) and "skipped" in line]
    assert any(line.startswith(f"run {record.id} failed in ") and line.endswith(f"details: overhaul show {record.id}")
               for line in lines)
    for reference in ("last", record.id[:17]):
        shown = overhaul_cli(tmp_path, "show", reference)
        assert shown.returncode == 0 and shown.stdout.startswith(f"run {record.id}: stops on lab, failed"), shown.stderr


def test_history_filters_and_hides_read_only_runs_unless_asked(lab, tmp_path):
    runbooks = tmp_path / "runbooks"
    write(runbooks / "ok.yaml", "name: ok\nstages:\n  - {name: one, step: shell, hosts: [app1], params: {command: 'true'}}\n")
    write(runbooks / "bad.yaml", "name: bad\nstages:\n  - {name: one, step: shell, hosts: [app1], params: {command: 'false'}}\n")
    common = ("--env", "lab", "--hosts-dir", str(lab.inventory.parent), "--runbooks-dir", str(runbooks))
    assert overhaul_cli(tmp_path, "run", "ok", *common).returncode == 0
    assert overhaul_cli(tmp_path, "run", "bad", *common).returncode == 1
    assert overhaul_cli(tmp_path, "verify", "--env", "lab", "--hosts-dir", str(lab.inventory.parent),
                        "--no-checks").returncode == 0
    state = SQLiteState(tmp_path / "journal.sqlite")
    ok_run, bad_run = sorted((r for r in state.runs("lab") if r.mutating), key=lambda r: r.started)
    verify_run = next(r for r in state.runs("lab") if not r.mutating)

    def ids(*args: str) -> list[str]:
        out = overhaul_cli(tmp_path, "history", *args).stdout
        return [line.split()[0] for line in out.splitlines()[1:] if line.strip()]

    assert ids() == [bad_run.id, ok_run.id]  # the verify is hidden
    assert ids("--all") == [verify_run.id, bad_run.id, ok_run.id]
    assert ids("--status", "failed") == [bad_run.id]
    assert ids("--runbook", "ok") == [ok_run.id]
    assert ids("--since", "1h") == [bad_run.id, ok_run.id]
    assert "no runs journaled" in overhaul_cli(tmp_path, "history", "--since", "2999-01-01").stdout
    as_json = [json.loads(line) for line in overhaul_cli(tmp_path, "history", "--json", "--all").stdout.splitlines()]
    assert [(r["id"], r["status"]) for r in as_json] == [(verify_run.id, "succeeded"), (bad_run.id, "failed"),
                                                        (ok_run.id, "succeeded")]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["started"]) for r in as_json), as_json
    bad = overhaul_cli(tmp_path, "history", "--since", "yesterday-ish")
    assert bad.returncode == 2 and "expected an age" in bad.stderr


def test_limit_takes_names_globs_and_roles(lab):
    inventory = load_inventory_file(lab.inventory)
    assert limited_to(inventory, "app*") == {"app1", "app2"}
    assert limited_to(inventory, "role:db, worker1") == {"db1", "worker1"}
    with pytest.raises(ConfigError, match=r"--limit 'web\*': matches no host of 'lab'"):
        limited_to(inventory, "app1,web*")


def test_a_limited_run_touches_only_those_hosts_and_is_journaled_as_limited(lab, tmp_path):
    write(tmp_path / "runbooks" / "mark.yaml", """
        name: mark
        stages:
          - {name: everywhere, step: shell, params: {command: "true"}}
          - {name: db only, step: shell, roles: [db], optional: true, params: {command: "true"}}
    """)
    proc = overhaul_cli(tmp_path, "run", "mark", "--env", "lab", "--limit", "role:app", "--hosts-dir",
                        str(lab.inventory.parent), "--runbooks-dir", str(tmp_path / "runbooks"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "limited to role:app, 2 hosts" in proc.stdout
    state = SQLiteState(tmp_path / "journal.sqlite")
    [record] = state.runs("lab")
    assert {(r.stage, r.host) for r in state.results(record.id)} == {("everywhere", "app1"), ("everywhere", "app2")}
    assert [(kind, detail) for _, run_id, kind, detail in state.events("lab")
            if run_id == record.id and kind != "preflight"] == [  # (the gate's table: tested in test_web.py)
        ("limit", "role:app")]


def test_a_limit_that_leaves_a_changing_stage_without_host_is_refused(lab, tmp_path):
    # An upgrade limited to the app hosts would stop and upgrade them with no backup taken: an input error.
    proc = overhaul_cli(tmp_path, "upgrade", "--env", "lab", "--version", "1.1.0", "--yes", "--limit", "role:app",
                        "--hosts-dir", str(lab.inventory.parent))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "('backup database'): --limit 'role:app' leaves it no host, but it changes hosts (db1)" in proc.stderr
    assert not (tmp_path / "journal.sqlite").exists() or not SQLiteState(tmp_path / "journal.sqlite").runs("lab")


def test_only_a_full_environment_upgrade_counts_as_a_pass_for_promotion(tmp_path, monkeypatch):
    monkeypatch.setenv("OVERHAUL_JOURNAL", str(tmp_path / "journal.sqlite"))
    state = SQLiteState(tmp_path / "journal.sqlite")
    for run_id, version, limit in (("full", "1.1.0", ""), ("partial", "1.2.0", "app1")):
        state.start_run(RunRecord(run_id, "upgrade", "", "", "staging", {"version": version}, "me", time.time()))
        if limit:
            state.event("staging", "limit", limit, run_id)
        state.set_status(run_id, "succeeded", time.time())
    assert [version for _, version, _ in History(state, "staging").passed_upgrades()] == ["1.1.0"]


def test_a_soak_policy_waits_that_long_after_the_first_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("OVERHAUL_JOURNAL", str(tmp_path / "journal.sqlite"))
    state = SQLiteState(tmp_path / "journal.sqlite")
    an_hour_ago = time.time() - 3600
    state.start_run(RunRecord("passed", "upgrade", "", "", "staging", {"version": "1.1.0"}, "ci", an_hour_ago - 60))
    state.set_status("passed", "succeeded", an_hour_ago)
    production = SimpleNamespace(environment="production",
                                 policy=Policy(promotion_from="staging", soak="2h"))  # type: ignore[arg-type]
    with pytest.raises(Refused, match=r"version 1.1.0 has been on 'staging' for 1.0 h; 'production' has policy.soak: 2h: "
                                      r"promote it after "):
        check_promotion(production, "1.1.0")
    production.policy = Policy(promotion_from="staging", soak="30m")
    check_promotion(production, "1.1.0")  # soaked long enough: no refusal
    assert "passed on staging, 30m ago or more (soak)" in describe_policy(production)


def test_the_demo_runs_twice_with_the_lab_rebuilt_between(tmp_path):
    """`make demo`'s commands, twice, `lab.down` between: the rebuilt 1.0.0 farm is what verify expects."""
    lab_args = ("--home", str(tmp_path / "lab"), "--inventory", str(tmp_path / "hosts/lab.yaml"))
    common = ("--env", "lab", "--hosts-dir", str(tmp_path / "hosts"), "--checks", str(ROOT / "checks"))
    try:
        for _ in range(2):
            up = overhaul_cli(tmp_path, "lab.up", "--hosts", "3", "--subnet", f"127.29.{os.getpid() % 250}", *lab_args)
            assert up.returncode == 0, up.stdout + up.stderr
            for args in (("verify", *common), ("upgrade", "--version", "1.1.0", "--yes", *common[:4]), ("verify", *common)):
                proc = overhaul_cli(tmp_path, *args)
                assert proc.returncode == 0, (args, proc.stdout[-3000:] + proc.stderr)
            assert overhaul_cli(tmp_path, "lab.down", *lab_args).returncode == 0
    finally:
        overhaul_cli(tmp_path, "lab.down", *lab_args)


def test_the_synthetic_test_passes_on_the_labs_own_inventory(lab, tmp_path):
    proc = overhaul_cli(tmp_path, "synthetic", "--env", "lab", "--hosts-dir", str(lab.inventory.parent), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert "synthetic lab: passed (3 servers launched, proven, terminated)" in proc.stdout, proc.stdout[-2000:]


def test_off_a_terminal_progress_is_plain_lines_with_a_still_running_heartbeat(lab, tmp_path):
    write(tmp_path / "runbooks" / "slow.yaml", """
        name: slow
        stages:
          - {name: slow, step: shell, hosts: [app1, app2], params: {command: "sleep 3"}}
    """)
    common = ("--env", "lab", "--hosts-dir", str(lab.inventory.parent), "--runbooks-dir", str(tmp_path / "runbooks"))
    proc = overhaul_cli(tmp_path, "run", "slow", *common, env={"OVERHAUL_HEARTBEAT_SECONDS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "\x1b[" not in proc.stdout  # no terminal drawing in a pipe
    beats = [line for line in proc.stdout.splitlines() if line.strip().startswith("still running: ")]
    assert len(beats) >= 2 and "app1 (" in beats[0] and "app2 (" in beats[0], proc.stdout
    assert proc.stdout.index("== stage 1: slow") < proc.stdout.index(beats[0]) < proc.stdout.index("   app1 ")

    verbose = overhaul_cli(tmp_path, "run", "slow", *common, "-v")
    assert "   app1           $ sleep 3  [exit 0, " in verbose.stdout
    quiet = overhaul_cli(tmp_path, "run", "slow", *common, "-q")
    assert "== stage 1" not in quiet.stdout and "   app1 " not in quiet.stdout
    assert re.search(r"^run \S+ succeeded in ", quiet.stdout, re.M)


def test_inventory_shows_policy_secret_names_and_known_hosts_never_secret_values(lab, tmp_path):
    out = overhaul_cli(tmp_path, "inventory", "--env", "lab", "--hosts-dir", str(lab.inventory.parent)).stdout
    password = lab.secret_file("mysql-backup").read_text().strip()
    assert "  policy: not protected" in out
    assert f"  secrets: mysql_backup_password (file:{lab.secret_file('mysql-backup')})" in out
    assert f"  known_hosts: {lab.known_hosts}" in out
    assert password not in out


def test_show_json_holds_the_run_its_pairs_and_events(lab, tmp_path):
    write(tmp_path / "runbooks" / "one.yaml", "name: one\nstages:\n  - {name: one, step: shell, hosts: [app1], "
                                             "params: {command: 'true'}}\n")
    assert overhaul_cli(tmp_path, "run", "one", "--env", "lab", "--hosts-dir", str(lab.inventory.parent),
                        "--runbooks-dir", str(tmp_path / "runbooks")).returncode == 0
    shown = json.loads(overhaul_cli(tmp_path, "show", "last", "--json").stdout)
    assert shown["run"]["runbook"] == "one" and shown["run"]["status"] == "succeeded"
    [pair] = shown["pairs"]
    assert (pair["stage"], pair["host"], pair["outcome"]) == ("one", "app1", "changed") and pair["ended"] >= pair["started"]
    # as the text says it: stage 1, and times a reader outside Python takes as they are (ISO 8601, UTC)
    iso = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    assert pair["stage_number"] == 1 and "stage_index" not in pair
    assert all(re.fullmatch(iso, value) for value in (pair["started"], pair["ended"], shown["run"]["started"],
                                                     shown["run"]["ended"], shown["commands"][0]["at"])), shown
    text = overhaul_cli(tmp_path, "show", "last").stdout
    assert re.search(r"\[1\] +one +app1 +changed +\d\d:\d\d:\d\d +\d+\.\ds x1 ran `true`", text), text


def test_starting_the_command_line_imports_no_library_only_some_commands_need():
    heavy = ("boto3", "botocore", "rich", "pytest", "testinfra", "psycopg", "psycopg_pool", "moto")
    probe = f"import sys, overhaul.cli; print([name for name in {heavy!r} if name in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


@pytest.mark.parametrize("argv", [["--help"], ["upgrade", "--help"], ["--complete", "--", "overhaul", "up"],
                                  ["--complete", "--", "overhaul", "upgrade", "--"]])  # tasks, then a task's flags
def test_help_and_shell_completion_load_no_ssh_model_or_journal_library(argv):
    # The shell completion runs `overhaul --complete` at every Tab: it should cost what invoke costs, not a run's start.
    heavy = ("paramiko", "fabric", "cryptography", "pydantic", "tenacity", "sqlite3", "overhaul.runner",
             "overhaul.inventory")
    probe = ("import contextlib, io, sys; from overhaul.cli import program\n"
             "with contextlib.redirect_stdout(io.StringIO()) as shown, contextlib.suppress(SystemExit):\n"
             f"    program.run(['overhaul', *{argv!r}])\n"
             f"print(bool(shown.getvalue().strip()), [name for name in {heavy!r} if name in sys.modules])")
    answer = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert answer == "True []"


def test_ctrl_c_at_the_gate_ends_the_run_interrupted_as_its_exit_code_says(lab, tmp_path):
    # A host that accepts TCP and never speaks SSH keeps the preflight gate waiting: Ctrl-C arrives there.
    silent = socket.create_server((f"127.30.{PROCESS_OCTET}.200", 22))
    inventory = lab.inventory.parent / "gate.yaml"
    text = lab.inventory.read_text().replace("environment: lab", "environment: gate")
    silent_host = f"  - {{name: silent1, address: 127.30.{PROCESS_OCTET}.200, roles: [app]}}\n"
    write(inventory, text.replace("hosts:\n", "hosts:\n" + silent_host, 1))
    runbook = write(tmp_path / "runbooks" / "touch.yaml", "name: touch\nstages:\n  - {name: t, step: shell, params: "
                                                           "{command: 'true'}}\n")
    env = dict(os.environ, OVERHAUL_JOURNAL=str(tmp_path / "journal.sqlite"))
    proc = subprocess.Popen([sys.executable, "-m", "overhaul", "run", "touch", "--env", "gate", "--hosts-dir",
                             str(inventory.parent), "--runbooks-dir", str(runbook.parent)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "journal.sqlite").exists() or not SQLiteState(tmp_path / "journal.sqlite").runs("gate"):
            assert time.monotonic() < deadline and proc.poll() is None, "the run never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        silent.close()
        inventory.unlink()
    assert proc.returncode == 130, out + err
    [run] = SQLiteState(tmp_path / "journal.sqlite").runs("gate")
    assert run.status == "interrupted"  # as its exit code says; nothing changed, and resume may run it


def test_the_command_line_raises_its_open_files_limit_to_the_hard_limit():
    probe = ("import resource; from overhaul.cli import raise_open_files_limit; raise_open_files_limit(); "
             "print(*resource.getrlimit(resource.RLIMIT_NOFILE))")
    soft, hard = subprocess.run(["bash", "-c", f"ulimit -Sn 256 && {sys.executable} -c '{probe}'"], capture_output=True,
                                text=True, check=True).stdout.split()
    assert soft == hard and int(soft) > 256


def test_loading_the_labs_inventory_does_not_import_the_aws_library(lab):
    probe = ("import sys; from pathlib import Path; from overhaul.inventory import load_inventory_file; "
             f"load_inventory_file(Path({str(lab.inventory)!r})); print('boto3' in sys.modules)")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "False"  # its synthetic section names the lab provider: only that one is imported


@pytest.mark.parametrize(("args", "flag"), [
    (("verify", "--env", "lab", "--limit", ""), "--limit"), (("upgrade", "--env", "lab", "--limit", "  ", "--yes"), "--limit"),
    (("rollback", "--env", "lab", "--run", ""), "--run"), (("undo", "--run", " "), "--run"),
    (("run", "x", "--env", "lab", "--param", ""), "--param"), (("history", "--env", ""), "--env"),
])
def test_an_empty_or_blank_flag_value_is_exit_2_never_everything(tmp_path, args, flag):
    proc = overhaul_cli(tmp_path, *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"error: {flag} of `{args[0]}` is empty: give it a value, or leave the flag out" in proc.stderr
    assert not (tmp_path / "journal.sqlite").exists() or not SQLiteState(tmp_path / "journal.sqlite").runs()


def test_an_unknown_status_is_exit_2_naming_the_known_ones(tmp_path):
    proc = overhaul_cli(tmp_path, "history", "--status", "bogus")
    assert proc.returncode == 2
    assert "error: --status 'bogus': not a run status (one of: running, interrupted, succeeded" in proc.stderr
    assert overhaul_cli(tmp_path, "history", "--status", "failed").returncode == 0
