"""Team state on a real PostgreSQL server: one journal and one lease for every controller.

Controllers are separate `overhaul` processes; "another machine" is another machine identity
(OVERHAUL_MACHINE_ID) and another working folder, sharing only the database.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers import overhaul_cli, write

from overhaul.errors import STATE_EXIT
from overhaul.state import SQLiteState
from overhaul.state.sql import LATEST


def controller(cwd: Path, backend, machine: str, *args: str, **env: str) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    environ = {**os.environ, **backend.env, "OVERHAUL_MACHINE_ID": machine, **env}
    return subprocess.Popen([sys.executable, "-m", "overhaul", *args], cwd=cwd, env=environ, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def runbook(folder: Path, name: str, stages: str) -> Path:
    return write(folder / f"{name}.yaml", f"name: {name}\nstages:\n{stages}")


def wait_for(what: str, condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def pg(request, tmp_path):
    """The PostgreSQL backend alone (the `backend` fixture's second parameter)."""
    from conftest import Backend

    return Backend("postgresql", tmp_path, request.getfixturevalue("postgres"))


def test_two_controllers_race_for_one_environment_fifty_times(lab, tmp_path, pg):
    gate = f"/tmp/overhaul-race-{uuid.uuid4().hex[:8]}"
    books = tmp_path / "runbooks"
    # The winner holds the lease until the test opens the gate, so the loser always meets a held lease.
    runbook(books, "hold", f"  - {{name: hold, step: shell, hosts: [db1], params: {{command: "
                           f"'while ! test -e {gate}; do sleep 0.1; done'}}}}\n")
    args = ("run", "hold", "--env", "lab", "--hosts-dir", str(lab.inventory.parent), "--runbooks-dir", str(books))
    state = pg.open()
    try:
        for round_ in range(50):
            pair = [controller(tmp_path / "ci", pg, "ci-runner", *args), controller(tmp_path / "laptop", pg, "laptop", *args)]
            wait_for("one controller to be refused", lambda p=pair: any(proc.poll() is not None for proc in p))
            loser, winner = pair if pair[0].poll() is not None else pair[::-1]
            _, err = loser.communicate()
            holder = state.lock("lab")
            assert loser.returncode == 3, (round_, err)
            assert holder is not None and f"is locked by {holder.holder} (pid {winner.pid}, run {holder.run_id})" in err
            lab.host("db1").exec(f"touch {gate}")
            out, err = winner.communicate(timeout=120)
            assert winner.returncode == 0, (round_, out, err)
            lab.host("db1").exec(f"rm -f {gate}")
            assert state.lock("lab") is None
        assert [run.status for run in state.runs("lab", 100)] == ["succeeded"] * 50
    finally:
        lab.host("db1").exec(f"rm -f {gate}")


def test_a_holder_whose_lease_was_taken_over_starts_no_further_pair(lab, tmp_path, backend):
    marker = f"/tmp/overhaul-fenced-{uuid.uuid4().hex[:8]}"
    books = tmp_path / "runbooks"
    runbook(books, "two", f"  - {{name: first, step: shell, hosts: [db1], params: {{command: 'sleep 2'}}}}\n"
                          f"  - {{name: second, step: shell, hosts: [db1], params: {{command: 'touch {marker}'}}}}\n")
    runbook(books, "other", "  - {name: hold, step: shell, hosts: [db1], params: {command: 'sleep 6'}}\n")
    common = ("--env", "lab", "--hosts-dir", str(lab.inventory.parent), "--runbooks-dir", str(books))
    state = backend.open()
    old = controller(tmp_path / "laptop", backend, "laptop", "run", "two", *common, OVERHAUL_LOCK_LEASE="3")
    try:
        wait_for("the first pair to start", lambda: any(r.outcome == "running" for run in state.runs("lab")
                                                        for r in state.results(run.id)))
        os.kill(old.pid, signal.SIGSTOP)  # a suspended laptop
        [old_run] = state.runs("lab")
        wait_for("the lease to expire", lambda: not state.lock("lab").live, timeout=30)
        elsewhere = {**backend.env, "OVERHAUL_MACHINE_ID": "ci-runner"}
        gave_up = overhaul_cli(tmp_path, "abandon", "--run", old_run.id, env=elsewhere)
        assert gave_up.returncode == 0, gave_up.stderr
        new = controller(tmp_path / "ci", backend, "ci-runner", "run", "other", *common)
        wait_for("the other run to hold the lease",
                 lambda: (lock := state.lock("lab")) is not None and lock.run_id != old_run.id)
        os.kill(old.pid, signal.SIGCONT)
        out, err = old.communicate(timeout=120)
        assert old.returncode == 130, out + err
        assert "lost its lease" in err
        new_out, new_err = new.communicate(timeout=120)
        assert new.returncode == 0, new_out + new_err
    finally:
        if old.poll() is None:
            os.kill(old.pid, signal.SIGCONT)
            old.wait(timeout=60)
    assert lab.host("db1").exec(f"test -e {marker}", check=False).returncode != 0  # the old run's second stage never ran
    assert [r.stage for r in state.results(old_run.id)] == ["first"]
    assert state.run(old_run.id).status == "abandoned"  # the fenced-out holder did not overwrite it


def test_promotion_counts_a_staging_pass_from_another_controller(fresh_lab, tmp_path, pg):
    lab = fresh_lab(3)
    hosts = lab.inventory.parent
    text = lab.inventory.read_text().replace("environment: lab", "environment: production")
    write(hosts / "production.yaml", text + "policy: {protected: true, promotion_from: lab}\n")
    upgrade = ("upgrade", "--version", "1.1.0", "--yes", "--hosts-dir", str(hosts))
    ci = {**pg.env, "OVERHAUL_MACHINE_ID": "ci-runner", "OVERHAUL_JOURNAL": str(tmp_path / "ci" / "journal.sqlite")}
    laptop = {**pg.env, "OVERHAUL_MACHINE_ID": "laptop", "OVERHAUL_JOURNAL": str(tmp_path / "laptop" / "journal.sqlite")}
    (tmp_path / "ci").mkdir()
    (tmp_path / "laptop").mkdir()

    staged = overhaul_cli(tmp_path / "ci", *upgrade, "--env", "lab", env=ci)
    assert staged.returncode == 0, staged.stdout + staged.stderr
    pg.open()._write("DELETE FROM runs WHERE environment = ?", ("lab",))  # the staging pass, deleted: it no longer counts
    refused = overhaul_cli(tmp_path / "laptop", *upgrade, "--env", "production", env=laptop)
    assert refused.returncode == 3 and "version 1.1.0 has not passed on 'lab' yet" in refused.stderr

    again = overhaul_cli(tmp_path / "ci", *upgrade, "--env", "lab", env=ci)  # a full pass (no change needed)
    assert again.returncode == 0, again.stdout + again.stderr
    promoted = overhaul_cli(tmp_path / "laptop", *upgrade, "--env", "production", env=laptop)
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    assert not (tmp_path / "laptop" / "journal.sqlite").exists()  # nothing went to the laptop's own file


def marked_stages(folder: str, count: int) -> str:
    """Stages that each append their name to a log once (guarded by `creates`, so a resume repeats nothing)."""
    return "".join(
        f"  - {{name: s{n}, step: shell, hosts: [db1], params: {{command: 'sleep 2 && echo s{n} >> {folder}/log "
        f"&& touch {folder}/s{n}', creates: {folder}/s{n}}}}}\n" for n in range(1, count + 1))


def test_the_database_restarted_mid_run_is_waited_for(lab, tmp_path, pg, postgres):
    folder = f"/tmp/overhaul-pgrestart-{uuid.uuid4().hex[:8]}"
    lab.host("db1").exec(f"mkdir -p {folder}")
    books = tmp_path / "runbooks"
    runbook(books, "marked", marked_stages(folder, 3))
    state = pg.open()
    proc = controller(tmp_path, pg, "laptop", "run", "marked", "--env", "lab", "--hosts-dir", str(lab.inventory.parent),
                      "--runbooks-dir", str(books))
    try:
        wait_for("stage 1 to start", lambda: any(r.outcome == "running" for run in state.runs("lab")
                                                 for r in state.results(run.id)))
        postgres.stop()
        time.sleep(4)  # stage 1 ends while the database is down: its result waits, with backoff
        postgres.start()
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, out + err
        [run] = state.runs("lab")
        assert run.status == "succeeded"
        assert [(r.stage, r.outcome) for r in state.results(run.id)] == [("s1", "changed"), ("s2", "changed"),
                                                                          ("s3", "changed")]
        assert lab.host("db1").exec(f"cat {folder}/log").stdout.split() == ["s1", "s2", "s3"]
    finally:
        lab.host("db1").exec(f"rm -rf {folder}")


def test_a_database_down_too_long_stops_the_run_resumable(lab, tmp_path, pg, postgres):
    folder = f"/tmp/overhaul-pgdown-{uuid.uuid4().hex[:8]}"
    lab.host("db1").exec(f"mkdir -p {folder}")
    books = tmp_path / "runbooks"
    runbook(books, "marked", marked_stages(folder, 3))
    common = ("--env", "lab", "--hosts-dir", str(lab.inventory.parent), "--runbooks-dir", str(books))
    state = pg.open()
    proc = controller(tmp_path, pg, "laptop", "run", "marked", *common, OVERHAUL_STATE_RETRY="2")
    try:
        wait_for("stage 1 to start", lambda: any(r.outcome == "running" for run in state.runs("lab")
                                                 for r in state.results(run.id)))
        postgres.stop()
        try:
            out, err = proc.communicate(timeout=120)
        finally:
            postgres.start()
        assert proc.returncode == 130, out + err  # interrupted: nothing more started unrecorded
        assert "cannot write the journal" in err and "overhaul resume --env lab" in err
        assert lab.host("db1").exec(f"cat {folder}/log").stdout.split() == ["s1"]
        resumed = overhaul_cli(tmp_path, "resume", *common[:4], env={**pg.env, "OVERHAUL_MACHINE_ID": "laptop"})
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert lab.host("db1").exec(f"cat {folder}/log").stdout.split() == ["s1", "s2", "s3"]  # s1 not repeated
        [run] = state.runs("lab")
        assert run.status == "succeeded"
    finally:
        lab.host("db1").exec(f"rm -rf {folder}")


def test_the_state_is_found_at_the_project_root_and_chosen_by_overhaul_yaml(tmp_path, postgres):
    root = tmp_path / "project"
    (root / "hosts").mkdir(parents=True)
    deep = root / "runbooks" / "more"
    deep.mkdir(parents=True)
    env = {"OVERHAUL_JOURNAL": "", "OVERHAUL_STATE": ""}
    embedded = overhaul_cli(deep, "state.status", env=env)
    assert embedded.returncode == 0, embedded.stderr
    assert f"state: sqlite:///{root / '.overhaul' / 'journal.sqlite'}" in embedded.stdout

    url = postgres.database()
    secret = write(tmp_path / "pg-password", postgres.password)
    secret.chmod(0o600)
    write(root / "overhaul.yaml", f"state:\n  url: {url}\n  password: {{file: {secret}}}\n")
    team = overhaul_cli(deep, "state.status", env={**env, "PGPASSFILE": "/nonexistent"})
    assert team.returncode == 0, team.stderr
    assert f"state: {url}" in team.stdout and postgres.password not in team.stdout + team.stderr

    inline = url.replace("overhaul@", f"overhaul:{postgres.password}@")
    write(root / "overhaul.yaml", f"state: {inline}\n")
    refused = overhaul_cli(deep, "state.status", env=env)
    assert refused.returncode == 2 and "must not be in its URL" in refused.stderr
    assert postgres.password not in refused.stdout + refused.stderr

    write(root / "overhaul.yaml", "state: {url: sqlite, leese: 5}\n")
    typo = overhaul_cli(deep, "state.status", env=env)
    assert typo.returncode == 2 and f"{root / 'overhaul.yaml'}:1: state.leese: Extra inputs are not permitted" in typo.stderr


def test_a_shared_schema_is_migrated_only_when_asked_and_a_newer_one_is_refused(tmp_path, pg):
    state = pg.open()  # an empty database: created at the latest version
    assert state.schema_version() == LATEST
    state._write("DELETE FROM overhaul_schema WHERE version = ?", (LATEST,))
    state._write("DROP INDEX runs_by_runbook", ())  # (the last migration's)
    older = overhaul_cli(tmp_path, "history", env=pg.env)  # a journal this Overhaul cannot use yet: not bad input
    assert older.returncode == STATE_EXIT and "run `overhaul state migrate`" in older.stderr
    migrated = overhaul_cli(tmp_path, "state.migrate", env=pg.env)
    assert migrated.returncode == 0 and f"schema version {LATEST}" in migrated.stdout
    assert overhaul_cli(tmp_path, "history", env=pg.env).returncode == 0
    state._write("INSERT INTO overhaul_schema (version) VALUES (?)", (LATEST + 1,))
    newer = overhaul_cli(tmp_path, "history", env=pg.env)
    assert newer.returncode == STATE_EXIT and "newer than this Overhaul knows" in newer.stderr


def test_export_then_import_moves_the_whole_history(fresh_lab, tmp_path, pg):
    lab = fresh_lab(3)
    hosts = ("--hosts-dir", str(lab.inventory.parent))
    assert overhaul_cli(tmp_path, "upgrade", "--env", "lab", "--version", "1.1.0", "--yes", *hosts).returncode == 0
    assert overhaul_cli(tmp_path, "verify", "--env", "lab", *hosts).returncode == 0
    exported = overhaul_cli(tmp_path, "state.export", "--out", str(tmp_path / "journal.jsonl"))
    assert exported.returncode == 0, exported.stderr
    imported = overhaul_cli(tmp_path, "state.import", "--file", str(tmp_path / "journal.jsonl"), env=pg.env)
    lines = len((tmp_path / "journal.jsonl").read_text().splitlines())
    assert imported.returncode == 0 and f"{lines} of {lines} rows added" in imported.stdout
    again = overhaul_cli(tmp_path, "state.import", "--file", str(tmp_path / "journal.jsonl"), env=pg.env)
    assert f"0 of {lines} rows added" in again.stdout  # importing twice duplicates nothing
    def rows(state) -> list[str]:
        return sorted(json.dumps(row, sort_keys=True) for row in state.export())
    assert rows(SQLiteState(tmp_path / "journal.sqlite")) == rows(pg.open())
    history = overhaul_cli(tmp_path, "history", "--all", env=pg.env).stdout
    assert "upgrade" in history and "verify" in history and "succeeded" in history
    shutil.rmtree(tmp_path / "runs")  # as seen from another controller: the logs are not here, their index is
    shown = overhaul_cli(tmp_path, "show", "last", env=pg.env).stdout
    assert "$ " in shown and "[exit 0, " in shown and "log on " in shown
    write(tmp_path / "bad.jsonl", '{"table": "runs", "row": {}}\n')
    bad = overhaul_cli(tmp_path, "state.import", "--file", str(tmp_path / "bad.jsonl"), env=pg.env)
    assert bad.returncode == 2 and f"{tmp_path / 'bad.jsonl'}:1: runs: missing id, runbook," in bad.stderr

