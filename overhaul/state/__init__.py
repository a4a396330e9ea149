"""State: the journal (runs, per-host results, events, the command index) and the environment leases.

`SQLiteState` is the embedded default (one file under the project's .overhaul/); `PostgresState`
(overhaul.state.postgresql, imported only when configured) is a team's shared one. Both implement
`State`; `overhaul.settings.open_state` picks the configured one.
"""

from overhaul.state.records import (
    CommandRecord,
    LockHeld,
    LockInfo,
    LockLost,
    ResultRecord,
    RunRecord,
    State,
    StateError,
    StateSettingError,
)
from overhaul.state.sqlite import SQLiteState

__all__ = ["CommandRecord", "LockHeld", "LockInfo", "LockLost", "ResultRecord", "RunRecord", "SQLiteState", "State",
           "StateError", "StateSettingError"]
