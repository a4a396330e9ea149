"""What the way back reads from the journal is never a redacted value taken for a real one.

Redaction keeps secrets out of the journal; a value a secret was cut out of can no longer name a backup, a
version or a parameter. Rollback, undo and resume refuse it, naming the run and what to do, instead of
restoring from a path that does not exist or resuming with `********` in place of a value.
"""

from __future__ import annotations

import re
import time

import pytest
from helpers import overhaul_cli, write

from overhaul.errors import OverhaulError
from overhaul.history import History
from overhaul.secrets import REDACTED, Redactor, redacted_in
from overhaul.state import ResultRecord, RunRecord, SQLiteState


def test_a_long_secret_is_redacted_even_inside_a_word_a_short_one_only_on_its_own():
    redactor = Redactor()
    redactor.add("2026")
    redactor.add("Tr0ub4dor-and-3")
    walked = redactor.walk({"a": "xTr0ub4dor-and-3y", "b": "db-20261207", "c": "pin 2026", "d": "x2026"})
    assert walked == {"a": f"x{REDACTED}y", "b": "db-20261207", "c": f"pin {REDACTED}", "d": "x2026"}
    assert redactor("db-20261207") == f"db-{REDACTED}1207"  # text for people (logs, messages): every occurrence


def test_redacted_in_finds_the_mark_at_any_depth():
    assert redacted_in({"a": [1, {"b": f"x{REDACTED}"}], "c": "plain"}) == [f"x{REDACTED}"]
    assert redacted_in({"a": 2026, "b": None, "c": "plain"}) == []


def test_rollback_refuses_a_backup_path_the_journal_holds_redacted(tmp_path):
    state = SQLiteState(tmp_path / "journal.sqlite")
    now = time.time()
    record = RunRecord("20261207T000000-aaaaaa", "upgrade", "/x/upgrade.yaml", "0" * 64, "lab", {"version": "1.1.0"},
                       "me", now, now + 1, "succeeded")
    state.start_run(record)
    backup = {"path": f"/var/backups/{REDACTED}.sql.gz", "size": 10, "sha256": "a" * 64}
    state.record(ResultRecord(record.id, 0, "backup", "db1", "changed", 1, now, now + 1, "", "", backup))
    state.record(ResultRecord(record.id, 2, "upgrade package", "db1", "changed", 1, now, now + 1, "", "",
                              {"version": "1.1.0", "previous": "1.0.0"}))
    with pytest.raises(OverhaulError, match=f"run {record.id}: its journaled backup or version holds a secret's "
                                            r"value, redacted .*cannot be rolled back from the journal"):
        History(state, "lab").rollback_source(record)


RUNBOOK = """
    name: fetch
    params: {source: null}
    stages:
      - name: fetch
        step: shell
        hosts: [app1]
        params: {command: "test -e /tmp/overhaul-fetch-ok && echo ${q:source}"}
"""


def test_resume_asks_again_for_a_parameter_the_journal_holds_redacted(lab, tmp_path):
    """A URL with a password as --param is journaled without it; resume neither runs with the mark nor refuses
    the operator's real value: it asks for it, then uses it."""
    write(tmp_path / "runbooks/fetch.yaml", RUNBOOK)
    common = ["--env", "lab", "--hosts-dir", str(lab.inventory.parent), "--runbooks-dir", str(tmp_path / "runbooks")]
    source = "https://deploy:t0ken-value@git.example/x"
    app1 = lab.host("app1")
    try:
        failed = overhaul_cli(tmp_path, "run", "fetch", *common, "--param", f"source={source}")
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert "t0ken-value" not in failed.stdout + failed.stderr
        run_id = re.search(r"\d{8}T\d{6}-[0-9a-f]{6}", failed.stdout).group()
        app1.exec("touch /tmp/overhaul-fetch-ok")
        asked = overhaul_cli(tmp_path, "resume", *common[:4])
        assert asked.returncode == 2, asked.stdout + asked.stderr
        assert (f"run {run_id}: the journal holds source redacted (a secret's value was in it): cannot resume with "
                f"the mark in its place; give it again: `overhaul resume --run {run_id} --param source=VALUE`"
                in asked.stderr)
        resumed = overhaul_cli(tmp_path, "resume", *common[:4], "--run", run_id, "--param", f"source={source}")
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert "t0ken-value" not in resumed.stdout + resumed.stderr
        log = next((tmp_path / "runs" / run_id).glob("**/*app1*.log")).read_text()  # beside the journal
        assert "https://********@git.example/x" in log and "t0ken" not in log  # ran with the real value, redacted
    finally:
        app1.exec("rm -f /tmp/overhaul-fetch-ok")


def test_a_parameter_equal_to_a_secret_is_journaled_by_reference_and_resumed_with_the_secret(lab, tmp_path):
    write(tmp_path / "runbooks/fetch.yaml", RUNBOOK)
    common = ["--env", "lab", "--hosts-dir", str(lab.inventory.parent), "--runbooks-dir", str(tmp_path / "runbooks")]
    password = lab.secret_file("mysql-backup").read_text().strip()
    app1 = lab.host("app1")
    try:
        failed = overhaul_cli(tmp_path, "run", "fetch", *common, "--param", f"source={password}")
        assert failed.returncode == 1, failed.stdout + failed.stderr
        run_id = re.search(r"\d{8}T\d{6}-[0-9a-f]{6}", failed.stdout).group()
        assert SQLiteState(tmp_path / "journal.sqlite").run(run_id).params == {
            "source": {"secret": "mysql_backup_password"}}
        app1.exec("touch /tmp/overhaul-fetch-ok")
        resumed = overhaul_cli(tmp_path, "resume", *common[:4])
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        written = [path.read_text(errors="replace") for path in tmp_path.rglob("*") if path.is_file()]
        assert not [text for text in written if password in text]
        log = next((tmp_path / "runs" / run_id).glob("**/*app1*.log")).read_text()
        assert f"echo {REDACTED}" in log  # the resumed command had the secret's value, redacted in its log
    finally:
        app1.exec("rm -f /tmp/overhaul-fetch-ok")
