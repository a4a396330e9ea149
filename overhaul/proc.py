"""Facts about local processes from /proc: is a PID still the process we think it is?"""

from __future__ import annotations

from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()  # fields from 3 (state) on; the name may hold spaces


def process_state(pid: int) -> str | None:
    """The state letter of a process (R, S, T stopped, Z zombie...), None when it is gone."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of proc(5)): with the PID, an identity."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def alive(pid: int, started: int | None) -> bool:
    """True while `pid` runs and (when `started` is known) is the same process that started then."""
    return process_state(pid) not in (None, "Z", "X") and (started is None or start_time(pid) == started)
