"""State: the journal (runs and per-host results) and the per-environment lock.

`SQLiteState` is the embedded default (one file under .overhaul/). A shared backend for a team
implements the same methods (see `State`).
"""

from overhaul.state.records import LockHeld, LockInfo, ResultRecord, RunRecord, State
from overhaul.state.sqlite import SQLiteState

__all__ = ["LockHeld", "LockInfo", "ResultRecord", "RunRecord", "SQLiteState", "State"]
