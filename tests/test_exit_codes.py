"""Every error class carries its exit code: bad input 2, refused 3, a journal that cannot be used 4, a bug 70 (one
line, the traceback in a log only the operator reads), never 1, which means a host failed."""

from __future__ import annotations

import stat

from helpers import overhaul_cli, write

from overhaul.errors import (
    FAILED_EXIT,
    INTERNAL_EXIT,
    REFUSED_EXIT,
    STATE_EXIT,
    USAGE_EXIT,
    ConfigError,
    HostUnreachable,
    OverhaulError,
    Refused,
    StepFailed,
)
from overhaul.state import LockLost, StateError, StateSettingError
from overhaul.state.exported import BadExport


def test_each_error_class_carries_its_exit_code():
    codes = {cls: cls.exit_code for cls in (OverhaulError, ConfigError, Refused, StepFailed, HostUnreachable,
                                             StateError, LockLost, StateSettingError, BadExport)}
    assert codes == {OverhaulError: USAGE_EXIT, ConfigError: USAGE_EXIT, Refused: REFUSED_EXIT, StepFailed: FAILED_EXIT,
                     HostUnreachable: FAILED_EXIT, StateError: STATE_EXIT, LockLost: STATE_EXIT,
                     StateSettingError: USAGE_EXIT, BadExport: USAGE_EXIT}
    assert len({USAGE_EXIT, REFUSED_EXIT, STATE_EXIT, INTERNAL_EXIT, FAILED_EXIT}) == 5


def test_a_journal_that_cannot_be_opened_is_exit_4_not_bad_input(tmp_path):
    folder = tmp_path / "not-a-file"
    folder.mkdir()
    proc = overhaul_cli(tmp_path, "history", env={"OVERHAUL_JOURNAL": str(folder)})
    assert proc.returncode == STATE_EXIT, proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"error: the journal {folder}: ")


def test_an_unknown_state_backend_is_bad_input(tmp_path):
    proc = overhaul_cli(tmp_path, "history", env={"OVERHAUL_STATE": "mongodb://127.0.0.1/x"})
    assert proc.returncode == USAGE_EXIT, proc.stdout + proc.stderr
    assert "unknown backend 'mongodb'" in proc.stderr


BUGGY_STEP = """
    from overhaul.step import Check, Params, Step


    class Buggy(Step[Params]):
        name = "acme.buggy"
        Params = Params
        reversible = False
        irreversible = "nothing, it is a test"

        def secrets(self):
            return 1 / 0  # a bug, met while the plan is built

        def check(self, host):
            return Check(True)

        def apply(self, host):
            return "never"
"""

BUGGY_RUNBOOK = """
    name: buggy
    stages:
      - name: buggy
        step: acme.buggy
        hosts: [app1]
"""


def test_a_bug_is_one_line_exit_70_and_its_traceback_in_a_private_log(lab, tmp_path):
    write(tmp_path / "mysteps/buggy.py", BUGGY_STEP)
    write(tmp_path / "runbooks/buggy.yaml", BUGGY_RUNBOOK)
    proc = overhaul_cli(tmp_path, "plan", "buggy", "--env", "lab", "--hosts-dir", str(lab.inventory.parent),
                        "--runbooks-dir", str(tmp_path / "runbooks"), "--steps-dir", str(tmp_path / "mysteps"))
    assert proc.returncode == INTERNAL_EXIT, proc.stdout + proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith("error: internal error (a bug in Overhaul, please report it): ZeroDivisionError: "
                           "division by zero; the traceback is in ")
    log = tmp_path / line.rsplit(" ", 1)[1]
    assert log.parent == tmp_path / "crashes"  # beside the journal (OVERHAUL_JOURNAL is tmp_path/journal.sqlite)
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "return 1 / 0" in text
    assert stat.S_IMODE(log.stat().st_mode) == 0o600 and stat.S_IMODE(log.parent.stat().st_mode) == 0o700
    assert "Traceback" not in proc.stdout + proc.stderr



def test_the_crash_log_keeps_the_command_line_without_its_values():
    from overhaul.cli import argv_shape

    assert argv_shape(["upgrade", "--env", "lab", "-p", "db_password=s3cret", "--param=token=abc", "--yes"]) == [
        "upgrade", "--env", "<value>", "-p", "<value>", "--param=<value>", "--yes"]
