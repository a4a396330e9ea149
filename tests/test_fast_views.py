"""The run's lifecycle (overhaul.execution.Execution) and its console view on the fake connection: the engine prints
nothing, a failing subscriber never stops a run, and the view sends warnings and errors where errors go. No lab."""

from __future__ import annotations

import io
from pathlib import Path

from test_fast_rules import Farm, Touch

from overhaul.events import Notice, PairFinished, RunEnded, StageStarted
from overhaul.execution import Execution, Gate
from overhaul.plan import Plan, build_plan
from overhaul.report import ConsoleView
from overhaul.runbook import load_runbook
from overhaul.state import SQLiteState, StateError
from overhaul.step import Registry
from overhaul.testing import Answer

RUNBOOK = """\
name: fast
stages:
  - {name: one, step: touch, params: {path: /a}}
  - {name: two, step: touch, params: {path: /b}}
"""


def journaled_plan(farm: Farm, tmp_path: Path) -> Plan:
    """The runbook from a file (a journaled run names its runbook's file and its SHA-256), on the fake farm."""
    path = tmp_path / "fast.yaml"
    path.write_text(RUNBOOK)
    steps = Registry(local_dirs=[])
    steps.add(Touch)
    return build_plan(load_runbook(str(path)), farm.inventory, steps, {})


def test_a_subscriber_that_raises_is_told_nothing_more_and_the_run_goes_on_journaled(tmp_path):
    farm = Farm()
    told: list[object] = []

    def chat_is_down(event: object) -> None:
        told.append(event)
        if isinstance(event, PairFinished):
            raise ConnectionError("chat is down")

    state = SQLiteState(tmp_path / "journal.sqlite")
    execution = Execution(journaled_plan(farm, tmp_path), state=state, subscribers=[chat_is_down], gate=Gate(),
                          transport=farm.transport)
    result = execution.run()
    assert result.status == "succeeded"
    assert {(r.stage, r.outcome) for r in state.results(result.run_id)} == {("one", "changed"), ("two", "changed")}
    assert [type(exc) for _, exc in execution.publish.dropped] == [ConnectionError]
    assert sum(isinstance(event, PairFinished) for event in told) == 1  # dropped at its first failure
    assert all(disk.files == {"/a", "/b"} for disk in farm.disks.values())


def test_the_engine_prints_nothing_and_tells_a_failed_runs_ways_on_as_data(tmp_path, capfd):
    farm = Farm(replies={"app2": [("touch -- /b", lambda text: Answer(exited=1))]})
    ended: list[RunEnded] = []
    result = Execution(journaled_plan(farm, tmp_path), state=SQLiteState(tmp_path / "journal.sqlite"), gate=Gate(),
                       subscribers=[lambda e: ended.append(e) if isinstance(e, RunEnded) else None],
                       transport=farm.transport).run()
    assert (result.status, result.exit_code) == ("failed", 1)
    assert capfd.readouterr() == ("", "")
    [end] = ended
    assert end.ways_on is not None and end.ways_on.left == {"app2": (["one"], ["two (failed)"])}
    assert end.ways_on.undo_blocked == []  # (touch can be undone: the way on names `overhaul undo`)


def test_the_console_view_sends_warnings_and_errors_to_standard_error():
    out, err = io.StringIO(), io.StringIO()
    view = ConsoleView(out, errors=err)
    view(Notice("undoing: 2 stage(s) to take back, latest first"))
    view(Notice("warning: took over the lock of someone", "warning"))
    view(Notice("error: the lock was taken from this run", "error"))
    assert out.getvalue() == "undoing: 2 stage(s) to take back, latest first\n"
    assert err.getvalue().splitlines() == ["warning: took over the lock of someone",
                                           "error: the lock was taken from this run"]


def test_a_journal_write_that_failed_is_said_on_standard_error_with_the_way_on(tmp_path):
    farm = Farm()
    out, err = io.StringIO(), io.StringIO()

    class FullDisk(SQLiteState):
        def record(self, *args, **kwargs):  # the pairs' writes fail: the run stops, resumable
            raise StateError("database or disk is full")

    with ConsoleView(out, errors=err) as view:
        result = Execution(journaled_plan(farm, tmp_path), state=FullDisk(tmp_path / "journal.sqlite"), gate=Gate(),
                           subscribers=[view], transport=farm.transport).run()
    assert (result.status, result.exit_code) == ("interrupted", 130)
    assert "error: cannot write the journal: database or disk is full" in err.getvalue()
    assert "overhaul resume --env fake" in err.getvalue()
    assert "database or disk is full" not in out.getvalue() and "resume with: overhaul resume --env fake" in out.getvalue()


def test_the_console_view_shows_a_stage_as_it_starts():
    farm = Farm()
    out = io.StringIO()
    plan = farm.plan({"name": "one", "step": "touch", "params": {"path": "/a"}})
    ConsoleView(out)(StageStarted(plan.stages[0], plan.stages[0].hosts))
    assert "== stage 1: one (touch on 4 hosts, parallel)" in out.getvalue()


def test_a_composed_runbook_cannot_take_a_built_in_runbooks_name_and_its_file_stays_in_its_folder(tmp_path,
                                                                                                   monkeypatch):
    from overhaul import api
    from overhaul.errors import ConfigError

    monkeypatch.setenv("OVERHAUL_JOURNAL", str(tmp_path / "journal.sqlite"))
    stage = api.Stage(name="t", step="touch", params={"path": "/a"})
    for reserved in ("upgrade", "rollback", "verify"):
        try:
            api._loaded(api.Runbook(name=reserved, stages=[stage]), tmp_path)
        except ConfigError as exc:
            assert "built-in runbook's name" in str(exc)
        else:
            raise AssertionError(f"{reserved!r} was taken")
    loaded = api._loaded(api.Runbook(name="../../escape/me", stages=[stage]), tmp_path)
    assert loaded.path.parent == tmp_path / "runbooks" and loaded.path.name.startswith("escape-me-")
