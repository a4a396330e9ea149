"""The journal's records as JSON documents (`history --json`, `show --json`), as a reader outside Python wants them.

Times are ISO 8601 in UTC (`2026-12-07T18:02:11.482Z`), never epoch floats; stages are numbered from 1, as the
text output prints them (`stage_number`); durations are seconds.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from overhaul.state.records import CommandRecord, ResultRecord, RunRecord, State

TIMES = ("started", "ended", "at")


def iso(timestamp: float | None) -> str | None:
    """A journal time (seconds since the epoch) as ISO 8601 UTC with milliseconds; None (not yet) stays None.

    A pair that never started has 0.0 for its start: that is no time either."""
    if not timestamp:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _document(record: RunRecord | ResultRecord | CommandRecord) -> dict[str, Any]:
    document = asdict(record)
    for name in TIMES:
        if name in document:
            document[name] = iso(document[name])
    if "stage_index" in document:
        document["stage_number"] = document.pop("stage_index") + 1
    return document


def run_document(record: RunRecord) -> dict[str, Any]:
    """A run: its id, runbook, environment, parameters (as journaled: redacted), status, times and duration."""
    return {**_document(record), "duration": round(record.duration, 3)}


def pair_document(record: ResultRecord) -> dict[str, Any]:
    """A (stage, host) pair: outcome, attempts, message, facts, times, and the log of its commands."""
    return _document(record)


def command_document(record: CommandRecord) -> dict[str, Any]:
    """One remote command of a pair: when, its (redacted) command line, exit code, duration and log."""
    return _document(record)


def event_document(at: float, kind: str, detail: str) -> dict[str, Any]:
    """A journal event of the run."""
    return {"at": iso(at), "kind": kind, "detail": detail}


def show_document(state: State, record: RunRecord) -> dict[str, Any]:
    """A run as `overhaul show --json` gives it: the run, its pairs, their commands and the run's events."""
    return {"run": run_document(record), "pairs": [pair_document(result) for result in state.results(record.id)],
            "commands": [command_document(ran) for ran in state.commands(record.id)],
            "events": [event_document(*event) for event in state.run_events(record.id)]}
