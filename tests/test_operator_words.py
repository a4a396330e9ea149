"""The words an operator reads: exact, and an input error where the input makes no sense (no lab needed)."""

from __future__ import annotations

import io
import time
from pathlib import Path

from helpers import overhaul_cli

from overhaul.events import RunStarted
from overhaul.report import ConsoleView
from overhaul.state import RunRecord, SQLiteState


def test_history_count_zero_is_an_input_error(tmp_path):
    shown = overhaul_cli(tmp_path, "history", "--count", "0")
    assert shown.returncode == 2 and "--count 0: how many runs to show, 1 or more" in shown.stderr


def test_abandon_last_names_the_run_it_found(tmp_path):
    state = SQLiteState(tmp_path / "journal.sqlite")
    state.start_run(RunRecord("20261207T000000-abcdef", "upgrade", "/x.yaml", "0" * 64, "lab", {}, "me@here",
                              time.time(), status="succeeded"))
    refused = overhaul_cli(tmp_path, "abandon", "--run", "last")
    assert refused.returncode == 2
    assert "run 20261207T000000-abcdef is succeeded: only an unfinished or failed run" in refused.stderr


def test_the_run_header_counts_one_host_as_one_host():
    out = io.StringIO()
    ConsoleView(out)(RunStarted("r1", "verify", "lab", 1, Path("/tmp/logs")))
    assert out.getvalue().startswith("run r1: verify on lab, 1 host, logs in /tmp/logs")
