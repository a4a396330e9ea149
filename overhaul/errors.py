"""Errors that reach the operator as a clear message, never as a traceback.

Every error class carries its exit code (the command line's contract, see overhaul.cli.EXIT_CODES) and the word
its message starts with; a subclass says its own where it differs.
"""

from __future__ import annotations

from typing import ClassVar

# The exit codes of the command line (a contract, see overhaul.cli.EXIT_CODES).
FAILED_EXIT = 1  # a host failed during the run
USAGE_EXIT = 2  # bad input or usage: nothing was touched
REFUSED_EXIT = 3  # refused before any change
STATE_EXIT = 4  # the journal (state backend) cannot be used: nothing was touched
INTERNAL_EXIT = 70  # a bug in Overhaul (sysexits' EX_SOFTWARE): one line, the traceback in a log
INTERRUPTED_EXIT = 130  # interrupted: resumable


class OverhaulError(Exception):
    """A problem the operator can fix: the message says what and where."""

    exit_code: ClassVar[int] = USAGE_EXIT
    label: ClassVar[str] = "error"


class ConfigError(OverhaulError):
    """Bad input in an inventory or runbook file: each problem names file, line, field and expectation."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class StepFailed(OverhaulError):
    """A step's work did not succeed on one host (a command failed, or verify did not hold)."""

    exit_code = FAILED_EXIT


class HostUnreachable(OverhaulError):
    """The host could not be reached over SSH, or the connection was lost during a command."""

    exit_code = FAILED_EXIT


class Refused(OverhaulError):
    """The run was refused before any change: preflight, drift, policy, a held lock or no confirmation."""

    exit_code = REFUSED_EXIT
    label = "refused"
