"""The library's face: a runbook composed in Python runs on the lab with the command line's gate, journal, lock and
resume, reports through typed events, prints nothing itself; the example tasks.py upgrades the lab."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import installed_version, overhaul_cli, program_states

from overhaul import api
from overhaul.errors import ConfigError, OverhaulError, Refused
from overhaul.events import (
    CommandDone,
    PairFinished,
    PairStarted,
    PreflightChecked,
    PreflightProgress,
    RunEnded,
    RunStarted,
    StageStarted,
)
from overhaul.state import SQLiteState
from overhaul.state.sql import KILL_AFTER_WRITES
from overhaul.step import Outcome

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "python-upgrade"


def touch_book(path: str) -> api.Runbook:
    return api.Runbook(name="touch-it", stages=[
        api.Stage(name="disk", step="disk.usage", params={"mounts": ["/"], "threshold": 100}),
        api.Stage(name="touch", step="local.touch", roles=["app"], strategy="serial", params={"path": path}),
    ])


def test_a_runbook_composed_in_python_runs_gated_journaled_and_told_as_events(lab, tmp_path, tag, monkeypatch, capfd):
    monkeypatch.setenv("OVERHAUL_JOURNAL", str(tmp_path / "journal.sqlite"))
    path = f"/root/api-{tag}"
    planned = api.plan(touch_book(path), "lab", hosts_dir=lab.inventory.parent, steps_dir=EXAMPLE / "steps")
    events: list[object] = []
    try:
        result = api.run(planned, yes=True, subscribers=[events.append])
        assert (result.status, result.exit_code) == ("succeeded", 0), result.refused
        assert {(r.stage, r.host, r.outcome) for r in result.results if r.stage == "touch"} == {
            ("touch", "app1", Outcome.CHANGED), ("touch", "app2", Outcome.CHANGED)}
        kinds = [type(event) for event in events]
        assert kinds[:2] == [RunStarted, PreflightProgress] and kinds[-1] is RunEnded
        assert kinds.index(PreflightChecked) < kinds.index(StageStarted)  # every host's preflight before any stage
        assert {StageStarted, PairStarted, CommandDone, PairFinished} <= set(kinds)
        ended = events[-1]
        assert isinstance(ended, RunEnded) and ended.status == "succeeded" and ended.run is not None
        assert ended.run.id == result.run_id == events[0].run_id
        assert [e.planned.stage.name for e in events if isinstance(e, StageStarted)] == ["disk", "touch"]
        out, err = capfd.readouterr()
        assert (out, err) == ("", ""), "nothing below the command line prints"

        state = SQLiteState(tmp_path / "journal.sqlite")
        record = state.run(result.run_id)
        assert record.status == "succeeded" and record.runbook == "touch-it"
        kept = Path(record.runbook_path)  # the composed runbook, kept for resume and undo, the operator's only
        assert kept.is_file() and oct(kept.stat().st_mode & 0o777) == "0o600" and path in kept.read_text()

        again = api.run(planned, yes=True)  # a second run changes nothing
        assert {r.outcome for r in again.results} == {Outcome.OK}
    finally:
        for host in ("app1", "app2"):
            lab.host(host).exec(f"rm -f {path}")


def protected_copy(inventory: Path, folder: Path) -> Path:
    """The lab's inventory, protected, in a folder of its own (its files' paths made absolute)."""
    data = yaml.safe_load(inventory.read_text())
    base = inventory.parent
    data["ssh"] = {**data["ssh"], **{key: str(base / data["ssh"][key]) for key in ("key_file", "known_hosts")}}
    data["secrets"] = {name: {"file": str(base / ref["file"])} for name, ref in data["secrets"].items()}
    data["policy"] = {"protected": True}
    folder.mkdir()
    (folder / "lab.yaml").write_text(yaml.safe_dump(data))
    return folder


def test_the_api_keeps_the_command_lines_policy(lab, tmp_path, monkeypatch):
    monkeypatch.setenv("OVERHAUL_JOURNAL", str(tmp_path / "journal.sqlite"))
    hosts = protected_copy(lab.inventory, tmp_path / "hosts")
    planned = api.plan(touch_book("/root/never"), "lab", hosts_dir=hosts, steps_dir=EXAMPLE / "steps")
    assert planned.inventory.policy.protected
    with pytest.raises(Refused, match="protected") as refused:
        api.run(planned)
    assert refused.value.exit_code == 3
    shown: list[list[str]] = []

    def say_no(preview: api.RunResult, stages: list) -> bool:  # shown what would change, before any change
        shown.append([r.host for r in preview.results if r.outcome is Outcome.CHANGED])
        return False

    no = api.run(planned, approve=say_no)
    assert (no.status, no.exit_code, no.refused) == ("refused", 3, ["not confirmed"])
    assert shown == [["app1", "app2"]]
    with pytest.raises(ConfigError, match=r"no\.such"):
        api.plan(api.Runbook(name="bad", stages=[api.Stage(name="x", step="no.such")]), "lab",
                 hosts_dir=lab.inventory.parent)
    assert lab.host("app1").exec("test -e /root/never", check=False).returncode == 1


def test_the_example_tasks_py_upgrades_the_lab_composed_in_python_and_the_command_line_resumes_it(fresh_lab, tmp_path):
    """examples/python-upgrade/tasks.py, killed in the middle of its upgrade (after its 12th journal write, in
    `reconfigure db`), is finished by `overhaul resume`: the same journal, lock and resume as the command line's."""
    lab = fresh_lab(3)
    env = {**os.environ, "OVERHAUL_JOURNAL": str(tmp_path / "journal.sqlite")}
    killed = subprocess.run([sys.executable, "-m", "invoke", "upgrade", "--env", "lab", "--version", "1.1.0", "--yes",
                             "--hosts-dir", str(lab.inventory.parent)], cwd=EXAMPLE, env={**env, KILL_AFTER_WRITES: "12"},
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert "preflight" in killed.stdout and "== stage 2: stop services" in killed.stdout  # the console view subscribed
    resumed = overhaul_cli(tmp_path, "resume", "--env", "lab", "--hosts-dir", str(lab.inventory.parent),
                           env=env)  # (from another folder: the journal says where the run's own steps are)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming run" in resumed.stdout and re.search(r"^run \S+ succeeded in ", resumed.stdout, re.M)
    for host in ("db1", "worker1", "app1"):
        assert installed_version(lab, host) == "1.1.0"
        assert program_states(lab, host) == {"RUNNING"}
    assert lab.host("app1").exec("test -e /root/upgraded-to-1.1.0", check=False).returncode == 0
    history = overhaul_cli(tmp_path, "history", "--env", "lab")
    assert "upgrade-marked" in history.stdout and "succeeded" in history.stdout
    # The environment's history reads it as the upgrade it is: verify expects 1.1.0, a rollback takes it back.
    verified = overhaul_cli(tmp_path, "verify", "--env", "lab", "--no-checks", "--hosts-dir", str(lab.inventory.parent))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    back = overhaul_cli(tmp_path, "rollback", "--env", "lab", "--yes", "--hosts-dir", str(lab.inventory.parent))
    assert back.returncode == 0, back.stdout + back.stderr
    assert "upgrade-marked to 1.1.0): back to 1.0.0" in back.stdout
    assert installed_version(lab, "app1") == "1.0.0"


def test_the_docs_runbook_composed_in_python_is_valid_and_plans_on_the_lab(lab):
    """The first example of docs/python-api.md, up to its plan, on the lab instead of staging."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "python-api.md").read_text()
    code = page.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.split("with api.ConsoleView()")[0].replace('"staging"', f'"lab", hosts_dir={str(lab.inventory.parent)!r}')
    scope: dict[str, object] = {}
    exec(code, scope)
    planned = scope["planned"]
    assert [(p.stage.name, p.hosts) for p in planned.stages] == [
        ("stop", ["app1", "app2"]), ("start", ["app1", "app2"]), ("check", ["app1", "app2"])]


def test_the_example_tasks_own_step_is_the_one_writing_a_step_teaches():
    """examples/python-upgrade/steps/touch.py is the docs' step as printed (the tests run both: they must not drift)."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "writing-steps.md").read_text()
    [block] = [b.split("```", 1)[0] for b in page.split("```python\n")[1:] if b.startswith("# steps/touch.py")]
    assert (EXAMPLE / "steps" / "touch.py").read_text() == block


def test_api_resume_finishes_a_failed_run_after_the_repair(lab, tmp_path, tag, monkeypatch):
    monkeypatch.setenv("OVERHAUL_JOURNAL", str(tmp_path / "journal.sqlite"))
    made, ready = f"/root/made-{tag}", f"/root/ready-{tag}"
    book = api.Runbook(name="two-steps", stages=[
        api.Stage(name="make", step="local.touch", hosts=["app1"], params={"path": made}),
        api.Stage(name="needs", step="shell", hosts=["app1"], params={"command": f"test -e {ready}"}),
    ])
    planned = api.plan(book, "lab", hosts_dir=lab.inventory.parent, steps_dir=EXAMPLE / "steps")
    try:
        failed = api.run(planned, yes=True)
        assert (failed.status, failed.exit_code) == ("failed", 1)
        with pytest.raises(OverhaulError, match="not 'staging'"):
            api.resume("staging", run_id=failed.run_id, hosts_dir=lab.inventory.parent, steps_dir=EXAMPLE / "steps")
        lab.host("app1").exec(f"touch {ready}")  # the repair
        resumed = api.resume("lab", hosts_dir=lab.inventory.parent, steps_dir=EXAMPLE / "steps", yes=True)
        assert (resumed.status, resumed.run_id) == ("succeeded", failed.run_id)
        [make] = [r for r in resumed.results if r.stage == "make"]
        assert make.message.startswith("(done before resume)")  # not made again
        with pytest.raises(OverhaulError, match="nothing to resume"):
            api.resume("lab", run_id=failed.run_id, hosts_dir=lab.inventory.parent, steps_dir=EXAMPLE / "steps")
    finally:
        lab.host("app1").exec(f"rm -f {made} {ready}")
