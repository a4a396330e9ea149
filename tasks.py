"""The tasks users run with `invoke` (the same collection is the `overhaul` console script)."""

from overhaul.cli import namespace

__all__ = ["namespace"]
