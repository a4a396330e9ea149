"""Errors that reach the operator as a clear message, never as a traceback."""

from __future__ import annotations

# The exit codes of the command line (a contract, see overhaul.cli.EXIT_CODES); 1 is a host that failed.
USAGE_EXIT = 2  # bad input or usage: nothing was touched
REFUSED_EXIT = 3  # refused before any change
INTERRUPTED_EXIT = 130  # interrupted: resumable


class OverhaulError(Exception):
    """A problem the operator can fix: the message says what and where."""


class ConfigError(OverhaulError):
    """Bad input in an inventory or runbook file: each problem names file, line, field and expectation."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class StepFailed(OverhaulError):
    """A step's work did not succeed on one host (a command failed, or verify did not hold)."""


class HostUnreachable(OverhaulError):
    """The host could not be reached over SSH, or the connection was lost during a command."""


class Refused(OverhaulError):
    """The run was refused before any change: preflight, drift, policy, a held lock or no confirmation."""
