"""Helpers for engine tests: write a runbook, plan it against a lab inventory, run it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from overhaul.inventory import Inventory, load_inventory_file
from overhaul.lab import Lab
from overhaul.plan import Plan, build_plan
from overhaul.pytest_plugin import process_octet
from overhaul.runbook import load_runbook
from overhaul.runner import Runner, RunResult
from overhaul.state import RunRecord
from overhaul.step import Registry
from overhaul.transport import Transport

# Labs of the tests use 127.N.P.x, P from our process (see process_octet): two test runs at once (CI and a full
# sweep), or two workers of one run, never collide.
PROCESS_OCTET = process_octet()


def overhaul_cli(cwd: Path, *args: str, env: dict[str, str] | None = None,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the `overhaul` command in `cwd`, its journal in cwd/journal.sqlite, no standard input."""
    environ = {**os.environ, "OVERHAUL_JOURNAL": str(cwd / "journal.sqlite"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "overhaul", *args], cwd=cwd, env=environ, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=timeout)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def lab_inventory(lab: Lab) -> Inventory:
    return load_inventory_file(lab.inventory)


def plan_for(runbook_yaml: str, tmp_path: Path, inventory: Inventory, params: dict | None = None,
             registry: Registry | None = None) -> Plan:
    path = write(tmp_path / "runbook.yaml", runbook_yaml)
    return build_plan(load_runbook(str(path)), inventory, registry or Registry(), params)


def run(runbook_yaml: str, tmp_path: Path, inventory: Inventory, *, check_only: bool = False,
        confirm=None, params: dict | None = None, registry: Registry | None = None) -> RunResult:
    plan = plan_for(runbook_yaml, tmp_path, inventory, params, registry)
    transport = Transport(inventory)
    try:
        return Runner(plan, transport, check_only=check_only, confirm=confirm, sleep=lambda _: None).run()
    finally:
        transport.close()


def outcomes(result: RunResult, stage: str) -> dict[str, str]:
    return {r.host: r.outcome.value for r in result.results if r.stage == stage}


def installed_version(lab: Lab, host: str) -> str:
    """The scalr-server version installed on a lab host, as dpkg says."""
    return lab.host(host).exec("dpkg-query -W -f '${Version}' scalr-server").stdout


def program_states(lab: Lab, host: str) -> set[str]:
    """The states of a lab host's supervised programs (RUNNING, STOPPED, FATAL...), as a set."""
    return set(states_by_program(lab, host).values())


def states_by_program(lab: Lab, host: str) -> dict[str, str]:
    """program -> state (RUNNING, STARTING...) of a lab host's supervised programs."""
    lines = lab.host(host).exec("scalr-server-manage status", check=False).stdout.splitlines()
    return {line.split()[0]: line.split()[1] for line in lines if len(line.split()) > 1}


def failed_upgrade(lab: Lab, cwd: Path) -> RunRecord:
    """An upgrade to a 1.1.1 whose install fails on every host, after the backup and the stop: exit 1, the run."""
    from overhaul.lab import faults
    from overhaul.state import SQLiteState

    faults.publish_broken_package(lab.repo, "1.1.1")
    failed = overhaul_cli(cwd, "upgrade", "--env", "lab", "--version", "1.1.1", "--yes",
                          "--hosts-dir", str(lab.inventory.parent))
    assert failed.returncode == 1, failed.stdout + failed.stderr
    [run] = SQLiteState(cwd / "journal.sqlite").runs("lab")
    return run

