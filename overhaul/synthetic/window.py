"""The synthetic test's window, in words: it runs at most once per window, whichever controller starts first.

Windows are `synthetic.window` seconds long and counted from the Unix epoch, so the default (86400) is the UTC
day, from 00:00 to 00:00 UTC. A window's number keys its claim; a person is told its times instead.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    number: int  # what the claim is keyed on
    length: float  # seconds

    @classmethod
    def at(cls, now: float, length: float) -> Window:
        """The window `now` (epoch seconds) falls in."""
        return cls(int(now // length), length)

    @property
    def start(self) -> float:
        return self.number * self.length

    @property
    def end(self) -> float:
        """When the next window opens (and this one's claim expires)."""
        return (self.number + 1) * self.length

    def span(self) -> str:
        """This window's times in UTC: `2026-11-23 00:00 to 2026-11-24 00:00 UTC`."""
        return f"{self._clock(self.start)} to {self._clock(self.end)} UTC"

    def rule(self) -> str:
        """What a window is, in words."""
        return f"at most one run per window of {duration(self.length)}, whichever controller starts first"

    def next_opens(self, now: float) -> str:
        """When the next window opens, local time first: `2026-11-24 01:00 CET (00:00 UTC), in 3h 12m`."""
        local = time.localtime(self.end)
        utc = "" if local.tm_gmtoff == 0 else f" ({self._clock(self.end, date=False)} UTC)"
        return f"{self._clock(self.end, local=True)} {local.tm_zone}{utc}, in {duration(self.end - now)}"

    def _clock(self, moment: float, local: bool = False, date: bool = True) -> str:
        """`moment` as a date and time (UTC unless `local`), to the second only when windows are not whole minutes."""
        form = ("%Y-%m-%d " if date else "") + ("%H:%M:%S" if self.length % 60 else "%H:%M")
        return time.strftime(form, time.localtime(moment) if local else time.gmtime(moment))


def duration(seconds: float) -> str:
    """A span a person reads at a glance: `45s`, `12m 5s`, `3h 12m`, `24h`, `2d 3h` (seconds rounded up)."""
    whole = max(0, math.ceil(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours >= 48:
        days, hours = divmod(hours, 24)
        return f"{days}d {hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m {secs}s" if secs else f"{minutes}m"
    return f"{secs}s"

