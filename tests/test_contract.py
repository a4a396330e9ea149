"""The step contract kit (overhaul.contract, the `step_contract` fixture) on every built-in step, and on the example
third-party package (examples/acme-steps), on real lab hosts: preflight honest, a second run changes nothing, a
SIGKILL after a journal write then `overhaul resume` repeats nothing, and the undo round trip."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from overhaul.contract import ContractBroken, StepContract
from overhaul.lab import Lab
from overhaul.pytest_plugin import next_lab_subnet, start_lab

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "acme-steps"
BACKUPS = "/var/backups/contract"  # the built-in backup's folder here, and the dump the restore restores
DUMP = f"{BACKUPS}/restore.sql.gz"
# A one-host run makes 4 journal writes: its start, its pair's start and end, its end. `make test` kills each built-in
# step's run after write 2 (the pair started, not ended: the resume finishes it) and 3 (the pair's end journaled:
# the resume must not do it again); a read-only step after write 3 only. Write 1 (only the run's start) and every
# write of every step are in the full sweep (`pytest -m full_sweep`); the example package's contract kills every write.
SPREAD = [2, 3]
READ_ONLY_SPREAD = [3]


@pytest.fixture(scope="module")
def contract_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """One lab (db1, worker1, app1) for this module's tests in this process: each check leaves it as it found it."""
    lab = start_lab(tmp_path_factory.mktemp("contract-lab"), next_lab_subnet(), 3)
    yield lab
    lab.down()


@pytest.fixture
def contract(contract_lab: Lab, tmp_path: Path) -> StepContract:
    return StepContract(contract_lab, tmp_path)


def shell_on(lab: Lab, host: str, command: str) -> Callable[[], None]:
    """A reset: `command` as root on one lab host."""

    def reset() -> None:
        lab.host(host).exec(command)

    return reset


def restore_setup(lab: Lab) -> dict[str, object]:
    """mysql.restore needs a backup the run did not make: a dump taken here, its size and SHA-256 as a backup journals."""
    db = lab.host("db1")
    db.exec(f"mkdir -p -m 700 {BACKUPS} && mysqldump --protocol=socket -uroot --all-databases --single-transaction "
            f"--routines --events | gzip > {DUMP}")
    size, sha256 = db.exec(f"stat -c %s {DUMP} && sha256sum {DUMP} | cut -d' ' -f1").stdout.split()
    return {"backup": DUMP, "size": int(size), "sha256": sha256}


# step, params (or how to make them on the lab), hosts, reset (for a step without an undo of its own), undo said
BUILT_IN: dict[str, tuple[dict | Callable[[Lab], dict], list[str], Callable[[Lab], Callable[[], None]] | None, str]] = {
    "shell": ({"command": "touch /tmp/contract-marker", "creates": "/tmp/contract-marker"}, ["app1"],
              lambda lab: shell_on(lab, "app1", "rm -f /tmp/contract-marker"), "refused"),
    "mysql.backup": ({"label": "contract", "backup_dir": f"{BACKUPS}-backup"}, ["db1"],
                     lambda lab: shell_on(lab, "db1", f"rm -rf {BACKUPS}-backup"), "kept (harmless)"),
    "mysql.restore": (restore_setup, ["db1"], lambda lab: shell_on(lab, "db1", f"rm -f {DUMP}.restored"), "refused"),
    "services.stop": ({}, ["app1"], None, "taken back"),
    "package.upgrade": ({"version": "1.1.0"}, ["app1"], None, "taken back"),
    # Irreversible (schema migrations); on the worker, whose reconfigure is quick. Its reset: the marker that says
    # for which version the host was reconfigured, removed (the reconfigure itself is convergent).
    "app.reconfigure": ({}, ["worker1"],
                        lambda lab: shell_on(lab, "worker1", "rm -f /var/lib/overhaul/reconfigured-scalr-server"), "refused"),
    "services.verify": ({}, ["worker1"], None, "read-only"),
    "supervisor.up": ({}, ["db1"], None, "read-only"),
    "package.version": ({"version": "1.0.0"}, ["app1"], None, "read-only"),
    "disk.usage": ({"mounts": ["/opt/scalr-server"]}, ["app1"], None, "read-only"),
}


def prove(contract: StepContract, step: str, kill_points: list[int] | None) -> None:
    params, hosts, reset, undo = BUILT_IN[step]
    lab = contract.lab
    report = contract.check(step, params(lab) if callable(params) else params, hosts=hosts,
                            reset=reset(lab) if reset else None, kill_points=kill_points)
    assert report.undo == undo
    assert report.kill_points == (kill_points or list(range(1, 4)))


def test_every_built_in_step_is_in_the_contract():
    """A new built-in step (an entry point of Overhaul's own distribution) is added to BUILT_IN, or this fails."""
    from overhaul.step import Registry

    assert sorted(BUILT_IN) == Registry([]).builtin_names()


@pytest.mark.parametrize("step", sorted(BUILT_IN))
def test_a_built_in_step_keeps_the_contract(contract, step):
    prove(contract, step, READ_ONLY_SPREAD if BUILT_IN[step][3] == "read-only" else SPREAD)


@pytest.mark.full_sweep
@pytest.mark.parametrize("step", sorted(BUILT_IN))
def test_a_built_in_step_keeps_the_contract_at_every_kill_point(contract, step):
    prove(contract, step, None)


BROKEN_STEP = '''
from overhaul.command import sh
from overhaul.step import Check, Params, Step


class Counter(Step[Params]):
    """Appends a line to a file on every run: its check never finds its work done (not idempotent)."""

    name = "broken.counter"
    reversible = False
    irreversible = "lines appended"

    def check(self, host):
        return Check(False, "always work to do")

    def apply(self, host):
        host.run(sh("echo x >> /tmp/contract-counter"))
        return "appended"

    def verify(self, host):
        return Check(True, "appended")
'''


def test_the_contract_catches_a_step_that_is_not_idempotent(contract_lab, tmp_path):
    (tmp_path / "steps").mkdir()
    (tmp_path / "steps" / "counter.py").write_text(BROKEN_STEP)
    contract = StepContract(contract_lab, tmp_path / "work", steps_dir=tmp_path / "steps")
    with pytest.raises(ContractBroken, match=r"step broken.counter: a second run must change nothing .*not idempotent"):
        contract.check("broken.counter", {}, hosts=["app1"], reset=shell_on(contract_lab, "app1", "rm -f /tmp/contract-counter"))
    contract_lab.host("app1").exec("rm -f /tmp/contract-counter")


def test_the_example_step_package_passes_its_own_contract_tests():
    """examples/acme-steps, installed (make deps) as a third party's package is: its tests, with the step_contract
    fixture Overhaul's pytest plugin gives (a lab of their own), pass as a step author would run them."""
    from importlib.metadata import entry_points

    assert [entry.value for entry in entry_points(group="overhaul.steps", name="acme.program")] == ["acme_steps.program:Program"]
    env = {name: value for name, value in os.environ.items() if name != "OVERHAUL_JOURNAL"}
    tested = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                            cwd=EXAMPLE, env=env, capture_output=True, text=True, timeout=600)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "4 passed" in tested.stdout
