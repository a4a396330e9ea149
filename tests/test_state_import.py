"""`overhaul state.import` on hostile input (issue 23): streamed, each row validated by the journal's own records,
linear, all or nothing, and a clean exit 2 naming the file and line of a bad row.

Every malformed kind is tried against both backends holding a journal already: the import is refused, that
journal is exactly as it was, and `overhaul history` and `overhaul show` still read it. Linearity is shown
without a clock: statements per import (one per batch of rows, never one per row), and, for SQLite, the
database's own count of the work it did for 5,000 and for 20,000 rows (bench/state_import.py times it).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import overhaul_cli

from overhaul.state import CommandRecord, ResultRecord, RunRecord, SQLiteState, State
from overhaul.state.exported import BadExport, Reader
from overhaul.state.sql import IMPORT_BATCH

T0 = 1_800_000_000.0


def fill(state: State, prefix: str = "run", runs: int = 3) -> None:
    """A journal with rows in every table: runs (one read-only, one unfinished), pairs (one still running),
    commands (one without exit code), events (a check, a limit, one of no run) and a claim."""
    for n in range(runs):
        run_id, at = f"{prefix}-{n}", T0 + n * 100
        state.start_run(RunRecord(run_id, "upgrade", "/srv/ops/runbooks/upgrade.yaml", "ab" * 32, "lab",
                                  {"version": f"1.{n}.0", "note": "héhé ✓"}, "ops@controller", at, mutating=n != 1))
        state.record(ResultRecord(run_id, 0, "backup", "db1", "changed", 1, at, at + 5, "dump taken", "/srv/out/db1.log",
                                  {"backup": "/var/backups/all.sql.gz", "bytes": 1234}),
                     [CommandRecord(run_id, 0, "db1", at + 1, "mysqldump --all-databases | gzip", 0, 3.25,
                                    "/srv/runs/db1.log", "controller:boot")])
        state.record(ResultRecord(run_id, 1, "stop", "app1", "running", 0, at + 6),
                     [CommandRecord(run_id, 1, "app1", at + 7, "app-manage stop all", None, 0.5, "/srv/runs/app1.log",
                                    "controller:boot")])
        state.event("lab", "check", json.dumps({"check": "test_ports", "host": "db1", "status": "passed", "message": ""}),
                    run_id)
        state.event("lab", "limit", "app*", run_id)
        state.set_status(run_id, ("succeeded", "succeeded", "interrupted")[n % 3],
                         None if n % 3 == 2 else at + 50)
    state.event("lab", "rebuilt", "1.0.0")
    state.claim(f"nightly:{prefix}", "ops@controller", f"{prefix}-0", T0 + 3600)


def rows(state: State) -> list[str]:
    return sorted(json.dumps(row, sort_keys=True) for row in state.export())


def cli_stdin(cwd: Path, data: bytes, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    environ = {**os.environ, "OVERHAUL_JOURNAL": str(cwd / "journal.sqlite"), **env}
    return subprocess.run([sys.executable, "-m", "overhaul", *args], cwd=cwd, env=environ, input=data,
                          capture_output=True, timeout=300)


@pytest.fixture
def source(tmp_path: Path) -> SQLiteState:
    state = SQLiteState(tmp_path / "source" / "journal.sqlite")
    fill(state)
    return state


@pytest.fixture
def export_file(tmp_path: Path, source: SQLiteState) -> Path:
    """The source journal as `overhaul state.export` writes it."""
    path = tmp_path / "export.jsonl"
    done = overhaul_cli(tmp_path, "state.export", "--out", str(path), env={"OVERHAUL_JOURNAL": str(source.path)})
    assert done.returncode == 0, done.stderr
    return path


def still_readable(tmp_path: Path, env: dict[str, str], run_id: str) -> None:
    history = overhaul_cli(tmp_path, "history", "--all", env=env)
    assert history.returncode == 0 and run_id in history.stdout, history.stdout + history.stderr
    shown = overhaul_cli(tmp_path, "show", run_id, env=env)
    assert shown.returncode == 0 and f"run {run_id}: upgrade on lab" in shown.stdout, shown.stdout + shown.stderr
    assert "check db1" in shown.stdout and "$ mysqldump --all-databases | gzip" in shown.stdout


# -- the round trip -------------------------------------------------------------------------------------------------

def test_an_export_imports_whole_and_importing_it_again_adds_nothing(tmp_path, backend, source, export_file):
    lines = export_file.read_text().splitlines()
    assert [json.loads(line)["table"] for line in lines] == ["runs"] * 3 + ["results"] * 6 + ["events"] * 7 + \
        ["claims"] + ["commands"] * 6  # what export writes, in that order: every table has rows here
    imported = overhaul_cli(tmp_path, "state.import", "--file", str(export_file), env=backend.env)
    assert imported.returncode == 0, imported.stderr
    assert f"{len(lines)} of {len(lines)} rows added" in imported.stdout
    assert rows(backend.open()) == rows(source)
    again = overhaul_cli(tmp_path, "state.import", "--file", str(export_file), env=backend.env)
    assert again.returncode == 0 and f"0 of {len(lines)} rows added" in again.stdout, again.stderr
    assert rows(backend.open()) == rows(source)
    still_readable(tmp_path, backend.env, "run-0")

    back = tmp_path / "back.jsonl"  # and from this backend to another SQLite file: the same journal again
    assert overhaul_cli(tmp_path, "state.export", "--out", str(back), env=backend.env).returncode == 0
    other = {"OVERHAUL_JOURNAL": str(tmp_path / "other" / "journal.sqlite"), "OVERHAUL_STATE": ""}
    moved = overhaul_cli(tmp_path, "state.import", "--file", str(back), env=other)
    assert moved.returncode == 0 and f"{len(lines)} of {len(lines)} rows added" in moved.stdout, moved.stderr
    assert rows(SQLiteState(tmp_path / "other" / "journal.sqlite")) == rows(source)


def test_an_import_adds_to_a_journal_and_reads_standard_input(tmp_path, backend, export_file, source):
    here = backend.open()
    fill(here, "here", runs=2)
    before = rows(here)
    imported = cli_stdin(tmp_path, export_file.read_bytes(), "state.import", "--file", "-", env=backend.env)
    assert imported.returncode == 0, imported.stderr
    assert sorted(before + rows(source)) == rows(backend.open())
    still_readable(tmp_path, backend.env, "here-1")
    still_readable(tmp_path, backend.env, "run-2")


def test_rows_given_as_export_yields_them_are_validated_too(backend, source):
    state = backend.open()
    assert state.import_rows(source.export()) == len(list(source.export()))
    assert rows(state) == rows(source)
    first, second, *_ = source.export()
    bad = [first, second, {"table": "runs", "row": {**first["row"], "id": "x", "started": "1"}}]
    with pytest.raises(BadExport, match=r"^rows:3: runs.started: Input should be a valid number \(got '1'\)$"):
        state.import_rows(bad)
    assert rows(state) == rows(source)


# -- malformed input: exit 2, the file and line named, nothing imported ------------------------------------------

def edit(lines: list[str], table: str, change: Callable[[dict], object], nth: int = 0) -> tuple[bytes, int]:
    """The export with the `nth` row of `table` changed by `change` (on the whole line's object); its line."""
    index = [n for n, line in enumerate(lines) if json.loads(line)["table"] == table][nth]
    item = json.loads(lines[index])
    change(item)
    changed = [*lines[:index], json.dumps(item), *lines[index + 1:]]
    return ("\n".join(changed) + "\n").encode(), index + 1


def put(column: str, value: object) -> Callable[[dict], object]:
    return lambda item: item["row"].__setitem__(column, value)


def raw_value(lines: list[str], table: str, column: str, text: str) -> tuple[bytes, int]:
    """A value written as raw JSON text (1e999: a number no float holds)."""
    data, line = edit(lines, table, put(column, "@@RAW@@"))
    return data.replace(b'"@@RAW@@"', text.encode()), line


def appended(lines: list[str], *more: str) -> tuple[bytes, int]:
    return ("\n".join([*lines, *more]) + "\n").encode(), len(lines) + len(more)


def twice(lines: list[str]) -> tuple[bytes, int]:
    copy = json.loads(lines[0])
    copy["row"]["operator"] = "someone@else"  # the same run id, another run
    return appended(lines, json.dumps(copy))


def many_then_bad(lines: list[str]) -> tuple[bytes, int]:
    events = [json.dumps({"table": "events", "row": {"at": T0 + n / 8, "environment": "lab", "run_id": "run-0",
                                                     "kind": "notify", "detail": f"event {n}"}}) for n in range(1200)]
    return appended(lines, *events, '{"table": "events", "row": {"at": "soon"}}')


def cut_short(lines: list[str]) -> tuple[bytes, int]:
    text = "\n".join(lines)
    return text[:len(text) - len(lines[-1]) // 2].encode(), len(lines)


MALFORMED: list[tuple[str, Callable[[list[str]], tuple[bytes, int | None]], str]] = [
    ("empty file", lambda lines: (b"", None), "no journal rows"),
    ("only blank lines", lambda lines: (b"\n  \n", None), "no journal rows"),
    ("not JSON", lambda lines: (("\n".join([lines[0], "this is not JSON", *lines[2:]]) + "\n").encode(), 2),
     "not a JSON line"),
    ("JSON of the wrong shape: a list", lambda lines: (("\n".join([lines[0], "[1, 2, 3]", *lines[1:]]) + "\n").encode(), 2),
     'not an exported journal row: expected {"table": TABLE, "row": {COLUMN: VALUE, ...}}'),
    ("JSON of the wrong shape: no table", lambda lines: edit(lines, "runs", lambda item: item.pop("table")),
     "not an exported journal row"),
    ("JSON of the wrong shape: the row a list", lambda lines: edit(lines, "runs", lambda item: item.update(row=[1])),
     "runs: the row should be an object of the columns id, runbook,"),
    ("a missing column", lambda lines: edit(lines, "runs", lambda item: item["row"].pop("ended")),
     "runs: missing ended (every runs row has: id, runbook, runbook_path, runbook_sha256, environment, params, operator, "
     "started, ended, status, mutating)"),
    ("a column of no table", lambda lines: edit(lines, "results", put("colour", "red")),
     "results.colour: no column of results"),
    ("a wrong type: a time as text", lambda lines: edit(lines, "runs", put("started", "yesterday"), nth=1),
     "runs.started: Input should be a valid number (got 'yesterday')"),
    ("a wrong type: a number as text", lambda lines: edit(lines, "results", put("stage_index", "0")),
     "results.stage_index: Input should be a valid integer (got '0')"),
    ("a wrong type: 1 for true", lambda lines: edit(lines, "runs", put("mutating", 1)),
     "runs.mutating: Input should be a valid boolean (got 1)"),
    ("a wrong type: params not JSON of an object", lambda lines: edit(lines, "runs", put("params", '["1.1.0"]')),
     "runs.params: Text should be the JSON of an object (got '[\"1.1.0\"]')"),
    ("a wrong type: facts no JSON", lambda lines: edit(lines, "results", put("facts", "{backup: x}")),
     "results.facts: Text should be the JSON of an object"),
    ("a wrong type: a check event's detail no JSON", lambda lines: edit(lines, "events", put("detail", "passed")),
     "events.detail: A check event's detail should be the JSON of an object with the strings check, host, status and "
     "message (got 'passed')"),
    ("an unknown kind of row", lambda lines: edit(lines, "claims", lambda item: item.update(table="leases")),
     "table 'leases' is no journal table (expected one of: runs, results, events, claims, commands)"),
    ("an unknown status", lambda lines: edit(lines, "runs", put("status", "exploded")),
     "runs.status: Input should be 'running', 'interrupted', 'succeeded', 'partial', 'failed', 'rolled back', 'refused' or "
     "'abandoned' (got 'exploded')"),
    ("an unknown outcome", lambda lines: edit(lines, "results", put("outcome", "meh")),
     "results.outcome: Input should be 'running', 'ok', 'changed', 'failed' or 'skipped' (got 'meh')"),
    ("a time no date holds", lambda lines: raw_value(lines, "events", "at", "1e999"),
     "events.at: Input should be a finite number (got inf)"),
    ("an integer no database holds", lambda lines: edit(lines, "commands", put("exit_code", 10**30)),
     "commands.exit_code: Input should be less than or equal to 2147483647"),
    ("a NUL character", lambda lines: edit(lines, "results", put("message", "dump\x00taken")),
     "results.message: Text should hold no NUL character (PostgreSQL cannot store one)"),
    ("a duplicate run id", twice, "runs: id 'run-0' again (first on line 1): a journal holds each run once"),
    ("binary garbage", lambda lines: (("\n".join(lines[:3]) + "\n").encode() + b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\n"
                                      + ("\n".join(lines[3:]) + "\n").encode(), 4),
     "not UTF-8 text (byte 0xff at offset"),
    ("a truncated last line", cut_short,
     "not a JSON line (EOF while parsing"),
    ("a bad row after 1,200 good ones", many_then_bad, "events.at: Input should be a valid number (got 'soon')"),
]


@pytest.mark.parametrize("make, expected", [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_malformed_input_is_exit_2_naming_the_line_and_nothing_is_imported(tmp_path, backend, export_file, make,
                                                                             expected):
    here = backend.open()
    fill(here, "here", runs=1)
    before = rows(here)
    data, line = make(export_file.read_text().splitlines())
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(data)
    refused = overhaul_cli(tmp_path, "state.import", "--file", str(bad), env=backend.env)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr and refused.stdout == ""
    where = f"error: {bad}:{line}: " if line is not None else f"error: {bad}: "
    assert refused.stderr.startswith(where), refused.stderr
    assert expected in refused.stderr, refused.stderr
    assert rows(backend.open()) == before  # all or nothing
    still_readable(tmp_path, backend.env, "here-0")


def test_the_last_line_cut_short_is_said_to_be(tmp_path, export_file):
    data, line = cut_short(export_file.read_text().splitlines())
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(data)
    refused = overhaul_cli(tmp_path, "state.import", "--file", str(bad))
    assert refused.returncode == 2 and refused.stderr.startswith(f"error: {bad}:{line}: not a JSON line")
    assert refused.stderr.rstrip().endswith("(the file's last line ends without a newline: it was cut short?)")


def test_a_file_that_is_not_there_or_no_file_is_exit_2(tmp_path):
    missing = overhaul_cli(tmp_path, "state.import", "--file", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and f"{tmp_path / 'nope.jsonl'}: cannot read: No such file" in missing.stderr
    folder = overhaul_cli(tmp_path, "state.import", "--file", str(tmp_path))
    assert folder.returncode == 2 and f"{tmp_path}: not a regular file (a directory)" in folder.stderr
    none = overhaul_cli(tmp_path, "state.import")
    assert none.returncode == 2 and "--file is required" in none.stderr


# -- linear: a statement per batch of rows, and work in proportion to the rows --------------------------------------

def events_export(path: Path, count: int) -> Path:
    """An export of one run and `count` events of it."""
    run = {"id": "big", "runbook": "upgrade", "runbook_path": "/srv/upgrade.yaml", "runbook_sha256": "0" * 64,
           "environment": "lab", "params": "{}", "operator": "ops@controller", "started": T0, "ended": T0 + 1,
           "status": "succeeded", "mutating": True}
    with path.open("w") as out:
        out.write(json.dumps({"table": "runs", "row": run}) + "\n")
        for n in range(count):
            out.write(json.dumps({"table": "events", "row": {"at": T0 + n / 16, "environment": "lab", "run_id": "big",
                                                             "kind": "notify", "detail": f"event {n}"}}) + "\n")
    return path


def test_twenty_thousand_events_are_imported_whole(tmp_path, backend):
    path = events_export(tmp_path / "big.jsonl", 20_000)
    imported = overhaul_cli(tmp_path, "state.import", "--file", str(path), env=backend.env)
    assert imported.returncode == 0 and "20001 of 20001 rows added" in imported.stdout, imported.stderr
    assert len(backend.open().events("lab")) == 20_000
    again = overhaul_cli(tmp_path, "state.import", "--file", str(path), env=backend.env)
    assert again.returncode == 0 and "0 of 20001 rows added" in again.stdout, again.stderr
    assert len(backend.open().events("lab")) == 20_000


def test_an_import_runs_a_statement_per_batch_of_rows_never_one_per_row(tmp_path, backend, monkeypatch):
    state = backend.open()
    statements: list[str] = []
    transaction = state._transaction  # type: ignore[attr-defined]

    def counting(work):
        def counted(execute):
            def execute_counted(sql, args):
                statements.append(sql)
                return execute(sql, args)
            return work(execute_counted)
        return transaction(counted)

    monkeypatch.setattr(state, "_transaction", counting)
    path = events_export(tmp_path / "big.jsonl", 20_000)
    bound = 20_001 // IMPORT_BATCH + 30  # the batches, and a few per table (stage, check, add, drop)
    with path.open("rb") as stream:
        assert state.import_rows(Reader(stream, str(path))) == 20_001
    assert len(statements) <= bound, len(statements)
    statements.clear()
    with path.open("rb") as stream:  # every row is there already: no lookup per row either
        assert state.import_rows(Reader(stream, str(path))) == 0
    assert len(statements) <= bound, len(statements)


def sqlite_work(tmp_path: Path, count: int) -> tuple[int, int]:
    """SQLite's own count of the work (virtual machine steps, in thousands) to import `count` events, then again."""
    state = SQLiteState(tmp_path / f"work-{count}" / "journal.sqlite")
    data = events_export(tmp_path / f"work-{count}.jsonl", count).read_bytes()
    steps = [0]

    def step() -> int:
        steps[0] += 1
        return 0

    state._db.set_progress_handler(step, 1000)
    work = []
    for expected in (count + 1, 0):
        steps[0] = 0
        assert state.import_rows(Reader(io.BytesIO(data), "work")) == expected
        work.append(steps[0])
    return work[0], work[1]


def test_sqlite_does_work_in_proportion_to_the_rows(tmp_path):
    small, large = sqlite_work(tmp_path, 5_000), sqlite_work(tmp_path, 20_000)
    # Four times the rows: about four times the work (sorting adds a little); a scan per row would be sixteen times.
    for fresh_or_again in (0, 1):
        ratio = large[fresh_or_again] / small[fresh_or_again]
        assert 3 < ratio < 6, (small, large)
