"""The run's lifecycle (overhaul.execution.Execution) and its console view on the fake connection: the engine prints
nothing, a failing subscriber never stops a run, and the view sends warnings and errors where errors go. No lab."""

from __future__ import annotations

import io
import re
from pathlib import Path

from test_fast_rules import Farm, Touch

from overhaul.command import sh
from overhaul.context import MARK, Probe, StepHost, file_probe
from overhaul.events import Notice, PairFinished, PreflightProgress, RunEnded, StageStarted
from overhaul.execution import Execution, Gate
from overhaul.plan import Plan, build_plan
from overhaul.report import ConsoleView, LiveReport, print_checks, print_preflight, summary
from overhaul.runbook import load_runbook
from overhaul.runner import log_name
from overhaul.state import SQLiteState, StateError
from overhaul.step import Registry
from overhaul.testing import Answer, FakeRemote
from overhaul.transport import CommandResult
from overhaul.verification import Case

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


# -- what runs now: commands told as the step wrote them --------------------------------------------------------------

def test_a_command_is_told_as_the_step_wrote_it_as_it_starts_its_reads_marked_and_logged_without_framing(tmp_path):
    remote = FakeRemote([("touch", Answer(stdout="made\n")), ("cat --", Answer(stdout="1.0\n")),
                         ("dpkg", Answer(stdout="ii\n"))], name="db1")
    started: list[tuple[str, bool]] = []
    done: list[CommandResult] = []
    log = tmp_path / "01-one-db1.log"
    host = StepHost(remote, timeout=60, run_id="r1", log=log, on_start=lambda command, read: started.append(
        (command, read)), on_command=done.append)  # type: ignore[arg-type]
    marker, version = file_probe("/m"), Probe("version", sh("dpkg -l x"), lambda r: r.stdout.strip())
    host.prefetch([marker, version])
    result = host.run_then_read(sh("touch -- {path}", path="/x"), [marker], durable="touch-x")
    host.run("touch -- /y", durable="touch-y")
    assert started == [("cat -- /m 2>/dev/null\ndpkg -l x", True), ("touch -- /x", False), ("touch -- /y", False)]
    assert [(r.command, r.read) for r in done] == [(command, read) for command, read in started] and done == host.history
    assert (result.stdout, done[0].stdout) == ("made\n", "1.0\nii\n")  # each answer, without the probes' marks
    assert log.read_text() == (
        "$ cat -- /m 2>/dev/null\n1.0\n[exit 0]\n$ dpkg -l x\nii\n[exit 0]\n[2 reads in one command: exit 0, 0 ms]\n"
        "$ touch -- /x\nmade\n[exit 0, 0 ms]\n# read after it, in the same command:\n$ cat -- /m 2>/dev/null\n1.0\n[exit 0]\n"
        "$ touch -- /y\nmade\n[exit 0, 0 ms]\n")
    assert "flock" in remote.sent[1] and MARK in remote.sent[0]  # (what went to the host was framed all the same)


def test_each_pairs_log_is_named_by_the_stage_number_as_printed_its_name_and_the_host(tmp_path, monkeypatch):
    assert log_name(3, "reconfigure db", "db1") == "04-reconfigure-db-db1.log"
    assert log_name(0, "../a b/", "app1") == "01-a-b-app1.log"
    monkeypatch.setenv("OVERHAUL_JOURNAL", str(tmp_path / "journal.sqlite"))  # (the runs' logs: beside it)
    farm = Farm()
    result = Execution(journaled_plan(farm, tmp_path), state=SQLiteState(tmp_path / "journal.sqlite"), gate=Gate(),
                       transport=farm.transport).run()
    logs = tmp_path / "runs" / result.run_id
    assert sorted(path.name for path in logs.iterdir()) == sorted(
        f"{number}-{stage}-{host}.log" for number, stage in (("01", "one"), ("02", "two"))
        for host in ("db1", "worker1", "app1", "app2"))
    assert "$ touch -- /b\n" in (logs / "02-two-app1.log").read_text()
    assert {r.output_path for r in SQLiteState(tmp_path / "journal.sqlite").results(result.run_id)} == {
        str(path) for path in logs.iterdir()}


def live(verbosity: int = 0) -> tuple[LiveReport, Plan]:
    farm = Farm()
    plan = farm.plan({"name": "one", "step": "touch", "params": {"path": "/a"}})
    report = LiveReport(io.StringIO(), verbosity=verbosity)
    report.stage_started(plan.stages[0], plan.stages[0].hosts)
    for host in plan.stages[0].hosts:
        report.host_started(plan.stages[0], host)
    report.command_started("db1", "test -e -- /a", False)
    report.command_done("db1", CommandResult("test -e -- /a", 0, "line one\nprogress 50%\rprogress 100%\n", "", 0.1))
    report.command_started("db1", "touch -- /a\necho done", False)  # what runs now, not what ran last
    report.command_started("app1", "cat -- /marker", True)  # a probe: what the step reads
    report.command_done("worker1", CommandResult("cat -- /m", 0, MARK + "\n1\n" + MARK + "0\n", "", 0.1, read=True))
    return report, plan


def test_the_live_view_shows_each_hosts_running_command_its_time_and_latest_output_never_a_probe_unless_v():
    report, _ = live()
    try:
        lines = report.lines(100, 30)
    finally:
        report.close()
    assert lines[0].startswith("stage 1 one: 0/4 done, 0 failed, 4 running, ")
    [db1] = [line for line in lines if line.startswith("  db1 ")]
    assert re.match(r"^  db1 +\d+\.\ds  \$ touch -- /a; echo done +\| progress 100%$", db1), db1
    assert [line.split()[0] for line in lines[1:]] == ["app1", "app2", "db1", "worker1"]
    assert not [line for line in lines if "cat --" in line or MARK in line or "test -e" in line]

    report, _ = live(verbosity=1)
    try:
        lines = report.lines(100, 30)
    finally:
        report.close()
    assert [line for line in lines if line.startswith("  app1 ") and "$ cat -- /marker" in line]


def test_the_live_view_never_outgrows_the_terminal_it_cuts_the_host_list_and_crops_each_line():
    report, _ = live()
    try:
        for width in range(10, 200, 7):
            for height in range(0, 30):
                lines = report.lines(width, height)
                assert len(lines) <= height and all(len(line) <= width for line in lines), (width, height, lines)
        assert report.lines(80, 3) == [report.lines(80, 3)[0], report.lines(80, 3)[1], "  ... and 3 more running"]
        report.preflight_progress(2, 4)
        assert re.match(r"^preflight: 2/4 hosts checked, \d+\.\ds$", report.lines(80, 24)[0])
    finally:
        report.close()


LONG = """\
name: long
stages:
  - {name: reconfigure the database tier first, step: touch, params: {path: /a}}
  - {name: reconfigure the worker tier second, step: touch, params: {path: /b}}
  - {name: reconfigure the app tier last of all, step: touch, params: {path: /c}}
"""


def test_the_preflight_table_and_the_summary_fit_80_columns_with_the_stages_by_number(tmp_path):
    farm = Farm()
    (tmp_path / "long.yaml").write_text(LONG)
    steps = Registry(local_dirs=[])
    steps.add(Touch)
    plan = build_plan(load_runbook(str(tmp_path / "long.yaml")), farm.inventory, steps, {})
    out = io.StringIO()
    with ConsoleView(out) as view:
        result = Execution(plan, state=SQLiteState(tmp_path / "journal.sqlite"), gate=Gate(), subscribers=[view],
                           transport=farm.transport).run()
    print_preflight(result.preflight, out := io.StringIO(), width=80)  # type: ignore[arg-type]
    table = out.getvalue().splitlines()
    assert max(len(line) for line in table) <= 80
    assert ["host", "ssh", "1", "2", "3"] in [line.split() for line in table]
    assert table[-2:] == ["stages: 1 reconfigure the database tier first,",  # (an item never cut in two)
                          "  2 reconfigure the worker tier second, 3 reconfigure the app tier last of all"]
    assert not [line for line in table if "…" in line]
    lines = summary(result, plan.stages).splitlines()
    assert max(len(line) for line in lines) <= 80
    assert [line.split()[:2] for line in lines[2:]] == [["1", "reconfigure"], ["2", "reconfigure"], ["3", "reconfigure"]]


def test_the_verdict_follows_the_summary_once_and_only_the_way_on_comes_after_it(tmp_path):
    farm = Farm()
    out = io.StringIO()
    with ConsoleView(out) as view:
        result = Execution(journaled_plan(farm, tmp_path), state=SQLiteState(tmp_path / "journal.sqlite"), gate=Gate(),
                           subscribers=[view], transport=farm.transport).run()
    lines = out.getvalue().strip().splitlines()
    assert lines[-1].startswith(f"run {result.run_id} succeeded in ") and lines[-1].endswith(
        f"; details: overhaul show {result.run_id}")
    assert sum("succeeded" in line for line in lines) == 1

    farm = Farm(replies={"app2": [("touch -- /b", lambda text: Answer(exited=1))]})
    out = io.StringIO()
    (tmp_path / "failed").mkdir()
    with ConsoleView(out) as view:
        result = Execution(journaled_plan(farm, tmp_path / "failed"), state=SQLiteState(tmp_path / "journal.sqlite"),
                           gate=Gate(), subscribers=[view], transport=farm.transport).run()
    lines = out.getvalue().strip().splitlines()
    verdict = lines.index(next(line for line in lines if line.startswith(f"run {result.run_id} failed in ")))
    assert lines[verdict - 2:verdict] == ["FAILED two on app2: touch /b: (no output)",  # the summary's end
                                          "run stopped at stage 'two': 1 of 4 hosts failed (max_failures 0)"]
    assert lines[verdict + 1].startswith("left part-way by this run") and lines[-1].startswith("  or take back")
    assert not [line for line in lines if "failed in" in line and line is not lines[verdict]]


def test_an_undo_ends_with_its_own_verdict_only(tmp_path):
    farm = Farm(replies={"app2": [("touch -- /b", lambda text: Answer(exited=1))]})
    path = tmp_path / "fast.yaml"
    path.write_text("on_failure: undo\n" + RUNBOOK)
    steps = Registry(local_dirs=[])
    steps.add(Touch)
    out = io.StringIO()
    with ConsoleView(out) as view:
        result = Execution(build_plan(load_runbook(str(path)), farm.inventory, steps, {}),
                           state=SQLiteState(tmp_path / "journal.sqlite"), gate=Gate(), subscribers=[view],
                           transport=farm.transport).run()
    assert result.status == "rolled back"
    lines = out.getvalue().strip().splitlines()
    assert lines[-2].startswith(f"run {result.run_id} rolled back in ")
    assert lines[-1] == "rolled back: every change this run made was taken back; the farm is as the run found it"
    assert not [line for line in lines if "succeeded" in line]


def test_quiet_prints_the_failures_the_verdict_and_the_way_on_only(tmp_path):
    farm = Farm(replies={"app2": [("touch -- /b", lambda text: Answer(exited=1, stderr="disk full"))]})
    out = io.StringIO()
    with ConsoleView(out, verbosity=-1) as view:
        result = Execution(journaled_plan(farm, tmp_path), state=SQLiteState(tmp_path / "journal.sqlite"), gate=Gate(),
                           subscribers=[view], transport=farm.transport).run()
    lines = out.getvalue().strip("\n").splitlines()
    assert lines[0] == "   app2           FAILED       touch /b: disk full"
    assert lines[1].startswith(f"run {result.run_id} failed in ") and lines[2].startswith("left part-way by this run")
    assert not [line for line in lines if line.startswith(("run " + result.run_id + ":", "preflight", " host", "== ",
                                                            "STAGE", "   db1"))]
    checks = io.StringIO()
    print_checks([Case("disk", "db1", "passed", source="checks"), Case("disk", "app1", "failed", "/ at 91%",
                                                                       source="checks")], checks, verbosity=-1)
    assert checks.getvalue().splitlines() == ["FAILED disk on app1: / at 91%",
                                              "verify: 1 passed, 1 failed, 0 skipped (2 checks x hosts)"]


def test_the_preflight_tells_its_progress_host_by_host(tmp_path):
    farm = Farm()
    told: list[PreflightProgress] = []
    Execution(journaled_plan(farm, tmp_path), state=SQLiteState(tmp_path / "journal.sqlite"), gate=Gate(),
              subscribers=[lambda e: told.append(e) if isinstance(e, PreflightProgress) else None],
              transport=farm.transport).run()
    assert [(e.checked, e.total) for e in told] == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]
