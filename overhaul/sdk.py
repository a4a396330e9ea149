"""Everything a step author imports, from one module (see the docs' "Writing a step")::

    from overhaul.sdk import Check, Field, Params, Step, StepFailed, StepHost, sh

    class TouchParams(Params):
        path: str = Field(pattern="^/")

    class Touch(Step[TouchParams]):
        name = "local.touch"
        reversible = True
        ...

The contract (overhaul.step): `check` and `apply` are required (a class without them is refused when it is
registered); a step that changes hosts says whether its change can be undone (`reversible`: True with
`undone`/`undo`, False with `irreversible`; undecided, an undo refuses naming the step); what `apply` keeps in
`remembered` and returns as facts must be JSON. Commands are built with `sh` (every value quoted by construction),
never pasted into a string. Facts a step reads are `Probe`s, cached for the run by what they ask. A read-only
check of the farm derives from `AssertionStep`. Test a step with overhaul.testing (a fake host, then the lab).
"""

from __future__ import annotations

from pydantic import Field

from overhaul.command import Command, bash, join, quote, sh
from overhaul.context import Probe, StepHost, file_probe
from overhaul.errors import HostUnreachable, StepFailed
from overhaul.step import AssertionStep, Check, Outcome, Params, Step
from overhaul.transport import CommandResult

__all__ = ["AssertionStep", "Check", "Command", "CommandResult", "Field", "HostUnreachable", "Outcome", "Params", "Probe",
           "Step", "StepFailed", "StepHost", "bash", "file_probe", "join", "quote", "sh"]
