"""The preflight proves the starting point: a farm that is not what an upgrade expects is refused before its first change.

A package on hold, a program not RUNNING before the run stops anything (unless the runbook says it may be), and a
host whose roles no tier of the runbook names (a misspelt role): each refuses, nothing changed on any host.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from helpers import overhaul_cli, plan_for, states_by_program, write

from overhaul.errors import ConfigError
from overhaul.inventory import load_inventory
from overhaul.lab import faults
from overhaul.plan import build_plan
from overhaul.runbook import load_runbook
from overhaul.state import SQLiteState
from overhaul.state.sql import KILL_AFTER_WRITES
from overhaul.step import Registry

HOSTS = ("db1", "worker1", "app1")
STOPPED_ALL = 1 + 2 * (1 + 3)  # journal writes of a 3-host upgrade up to the end of its "stop services" stage


def cli(lab, cwd: Path, *args: str, env: dict[str, str] | None = None):
    return overhaul_cli(cwd, *args, "--hosts-dir", str(lab.inventory.parent), env=env)


def version(lab, host: str) -> str:
    return lab.host(host).exec("dpkg-query -W -f '${Version}' scalr-server").stdout


def assert_nothing_changed(lab, expected: dict[str, dict[str, str]]) -> None:
    """Every host's programs as they were, the package at 1.0.0, no backup taken."""
    for host in HOSTS:
        assert states_by_program(lab, host) == expected[host], host
        assert version(lab, host) == "1.0.0", host
    backups = lab.host("db1").exec("ls /var/backups/overhaul 2>/dev/null | wc -l", check=False).stdout.strip()
    assert backups == "0", "a backup was taken"


def test_a_package_on_hold_refuses_the_upgrade_naming_the_host_and_how_to_release_it(fresh_lab, tmp_path):
    lab = fresh_lab(3)
    lab.host("app1").exec("apt-mark hold scalr-server")
    before = {host: states_by_program(lab, host) for host in HOSTS}
    reason = ("app1: stage 3 upgrade package: scalr-server 1.0.0 is on hold (apt-mark hold): apt will not upgrade it; "
              "release it first: apt-mark unhold scalr-server")

    planned = cli(lab, tmp_path, "plan", "upgrade", "--env", "lab", "--param", "version=1.1.0")
    assert planned.returncode == 3, planned.stdout + planned.stderr
    assert f"refused: {reason}" in planned.stdout

    proc = cli(lab, tmp_path, "upgrade", "--env", "lab", "--version", "1.1.0", "--yes")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "preflight" in proc.stdout.split("refused:")[0]  # the table comes first
    assert f"refused: {reason}" in proc.stdout
    assert [line for line in proc.stdout.splitlines() if line.startswith("refused: ")] == [f"refused: {reason}"]
    assert "nothing was changed on any host" in proc.stdout
    assert_nothing_changed(lab, before)
    [run] = SQLiteState(tmp_path / "journal.sqlite").runs("lab")
    assert run.status == "refused"


def test_a_program_not_running_refuses_the_upgrade_but_one_this_run_stopped_does_not(fresh_lab, tmp_path):
    lab = fresh_lab(3)
    faults.break_service(lab.host("app1"), "scalr-nginx")
    lab.host("worker1").exec("scalr-server-manage stop poller")
    before = {host: states_by_program(lab, host) for host in HOSTS}
    assert before["app1"]["scalr-nginx"] == "FATAL" and before["worker1"]["poller"] == "STOPPED"

    proc = cli(lab, tmp_path, "upgrade", "--env", "lab", "--version", "1.1.0", "--yes")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    advice = "repair it first, or say allow_not_running: true in this stage of the runbook"
    refused = [line for line in proc.stdout.splitlines() if line.startswith("refused: ")]
    assert refused == [f"refused: worker1: stage 2 stop services: not RUNNING before the run: poller STOPPED: {advice}",
                       f"refused: app1: stage 2 stop services: not RUNNING before the run: scalr-nginx FATAL: {advice}"]
    assert_nothing_changed(lab, before)

    # Repaired, the upgrade runs; killed once it stopped every program, its resume is not refused for them.
    faults.repair_service(lab.host("app1"), "scalr-nginx")
    lab.host("worker1").exec("scalr-server-manage start poller")
    killed = cli(lab, tmp_path, "upgrade", "--env", "lab", "--version", "1.1.0", "--yes",
                 env={KILL_AFTER_WRITES: str(STOPPED_ALL)})
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    for host in HOSTS:
        assert set(states_by_program(lab, host).values()) == {"STOPPED"}, host
    resumed = cli(lab, tmp_path, "resume", "--env", "lab")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "refused" not in resumed.stdout
    for host in HOSTS:
        assert version(lab, host) == "1.1.0" and set(states_by_program(lab, host).values()) == {"RUNNING"}, host


def test_a_runbook_may_say_a_program_may_be_not_running(fresh_lab, tmp_path):
    lab = fresh_lab(3)
    faults.break_service(lab.host("app1"), "scalr-nginx")
    runbooks = tmp_path / "runbooks"
    text = Path("runbooks/upgrade.yaml").read_text()
    stop = 'params: {package: "${package}", version: "${version}"}'
    assert text.count(stop) == 1
    write(runbooks / "upgrade.yaml", text.replace(stop, stop[:-1] + ", allow_not_running: true}"))
    proc = cli(lab, tmp_path, "plan", "upgrade", "--env", "lab", "-p", "version=1.1.0", "--runbooks-dir", str(runbooks))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "refused" not in proc.stdout
    assert states_by_program(lab, "app1")["scalr-nginx"] == "FATAL"  # a plan changes nothing


@pytest.fixture
def typo(lab):
    """The lab's inventory as environment `typo`, app2's role misspelt `ap`."""
    path = lab.inventory.parent / "typo.yaml"
    text = lab.inventory.read_text().replace("environment: lab", "environment: typo")
    lines = text.splitlines()
    at = lines.index("  - name: app2")
    assert lines[at + 2] == "    roles: [app]"
    lines[at + 2] = "    roles: [ap]"
    path.write_text("\n".join(lines) + "\n")
    yield path, at + 3  # the file, and the line of app2's roles
    path.unlink()


def test_a_host_whose_role_no_tier_of_the_runbook_names_is_an_input_error(lab, typo, tmp_path):
    path, line = typo
    said = (f"{path}:{line}: host 'app2' has roles ap: runbook 'upgrade' would take it through stop services, upgrade "
            "package, supervisor up, services running, disk usage, but never through app.reconfigure, which it runs by "
            "role ('reconfigure db', 'reconfigure worker', 'reconfigure app': roles app, db, worker): is a role "
            "misspelt? Give the host one of those roles")
    # A version no repository has: should the rule ever be lost, the preflight refuses (exit 3) and the shared lab
    # is still not upgraded.
    for args in (("upgrade", "--env", "typo", "--version", "9.9.9", "--yes"),
                 ("plan", "upgrade", "--env", "typo", "-p", "version=9.9.9")):
        proc = cli(lab, tmp_path, *args)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert said in proc.stderr
        assert "preflight" not in proc.stdout  # refused while reading input, before any host is touched
    assert version(lab, "app2") == "1.0.0" and set(states_by_program(lab, "app2").values()) == {"RUNNING"}

    # The rollback runs services.stop and app.reconfigure by tier: both are named.
    inventory = load_inventory("typo", path.parent)
    params = {"version": "1.0.0", "backup": "/b.sql.gz", "backup_sha256": "0" * 64, "backup_size": 1}
    with pytest.raises(ConfigError) as refused:
        build_plan(load_runbook("rollback"), inventory, Registry(), params)
    assert [problem.split("never through ")[1].split(",")[0] for problem in refused.value.problems] == [
        "services.stop", "app.reconfigure"]

    # Not of the run, the host is no problem: the verify runbook (no roles), a limited run, role stages of a step
    # that also runs without roles, a step run by role in one stage only.
    assert build_plan(load_runbook("verify"), inventory, Registry()).hosts == ["db1", "worker1", "app1", "app2"]
    limited = build_plan(load_runbook("upgrade"), inventory, Registry(), {"version": "1.1.0"}, limit="db1,worker1,app1")
    assert "app2" not in limited.hosts
    plan = plan_for("""
        name: mixed
        stages:
          - {name: everywhere, step: shell, params: {command: "true"}}
          - {name: app only, step: shell, roles: [app], params: {command: "true"}}
          - {name: db check, step: services.verify, roles: [db]}
    """, tmp_path, inventory)
    assert plan.hosts == ["db1", "worker1", "app1", "app2"]

