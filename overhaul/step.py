"""The step contract and the step registry.

A step proves in `preflight` that its work could be done (before the run changes anything anywhere),
reads state in `check` (never changes anything), changes it in `apply`, and proves the change in
`verify`. The runner calls `apply` only when `check` says the work is not done, so a runbook run
twice in a row reports no change the second time.

The way back follows the same contract: `undone` reads whether a pair's change was taken back, `undo`
takes it back from what `apply` put in `remembered` (journaled with the pair, whatever its outcome).
A step whose change cannot be taken back says so (`reversible = False` and why, in `irreversible`).
"""

from __future__ import annotations

import difflib
import importlib.util
import sys
from dataclasses import dataclass
from enum import StrEnum
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from overhaul.errors import ConfigError, OverhaulError

if TYPE_CHECKING:
    from overhaul.context import Probe, StepHost

ENTRY_POINT_GROUP = "overhaul.steps"


class Outcome(StrEnum):
    OK = "ok"  # nothing to do: check found the work already done
    CHANGED = "changed"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Check:
    """What `check` or `verify` found: is the state as wanted, and a short word on it."""

    done: bool
    message: str = ""
    facts: dict[str, Any] | None = None


class Params(BaseModel):
    """Base of every step's parameters: unknown keys are errors, not silently ignored.

    The docstring under each field is its description: in the runbook schema and the steps reference.
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


P = TypeVar("P", bound=Params)


class Step(Generic[P]):
    """Subclass with a `name`, a `Params` model, and check/apply/verify."""

    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params
    read_only: ClassVar[bool] = False  # True: an assertion that never changes a host (apply only reports)
    reversible: ClassVar[bool] = True  # False: an undo cannot take this step's change back (say why in `irreversible`)
    irreversible: ClassVar[str] = ""  # what is lost for good once the step applied, shown in plans and undo refusals

    def __init__(self, params: P):
        self.params = params
        self.remembered: dict[str, Any] = {}  # what `undo` will need, set by apply before it changes anything

    def secrets(self) -> list[str]:
        """Names of the inventory secrets this step reads: resolved when the run is loaded (a missing one is an
        input error before anything connects) and redacted from everything the run prints or journals."""
        return []

    def probes(self) -> list[Probe]:
        """What this step reads about a host, as probes: the runner reads those not yet known in one command
        before the step's check (and after an apply), with those of the host's later stages."""
        return []

    def preflight(self, host: StepHost) -> Check:
        """Read-only: could `apply` succeed on this host, now? Run for every stage before the first change.

        Prove what can be proven before anything stops (a version exists, a database answers, a command
        exists); the default proves nothing and passes.
        """
        return Check(True, "nothing to prove")

    def check(self, host: StepHost) -> Check:
        """Read-only: is the work already done on this host?"""
        raise NotImplementedError

    def apply(self, host: StepHost) -> str:
        """Do the work; return a short message. Raise StepFailed when it cannot be done."""
        raise NotImplementedError

    def verify(self, host: StepHost) -> Check:
        """Prove the work holds. By default: check again."""
        return self.check(host)

    def undone(self, host: StepHost, remembered: dict[str, Any]) -> Check:
        """Read-only: is this host's change taken back (from what apply remembered)? Default: nothing to take back
        (a read-only step, or a change harmless to keep, such as a backup)."""
        return Check(True, "nothing to undo")

    def undo(self, host: StepHost, remembered: dict[str, Any]) -> str:
        """Take this host's change back; return a short message. Called only when `undone` says it is not."""
        raise NotImplementedError(f"{self.name} has nothing to undo")


class Registry:
    """Step classes by name: built-ins and other packages (entry points), and a local steps/ folder."""

    def __init__(self, local_dirs: list[Path] | None = None):
        self._steps: dict[str, type[Step]] = {}
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            self.add(entry.load())
        for folder in local_dirs or []:
            self.load_folder(folder)

    def add(self, step: type[Step]) -> None:
        if not (isinstance(step, type) and issubclass(step, Step) and getattr(step, "name", None)):
            raise OverhaulError(f"{step!r} is not a Step subclass with a name")
        self._steps[step.name] = step

    def load_folder(self, folder: Path) -> None:
        """Import every *.py of an operator's steps/ folder and register the Step subclasses in it."""
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("*.py")):
            if path.name.startswith("_"):
                continue
            module_name = f"overhaul_local_steps.{path.stem}"
            spec = importlib.util.spec_from_file_location(module_name, path)
            assert spec and spec.loader
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as exc:
                raise ConfigError([f"{path}: cannot load this step module: {type(exc).__name__}: {exc}"]) from None
            for value in vars(module).values():
                defined_here = isinstance(value, type) and value.__module__ == module_name
                if defined_here and issubclass(value, Step) and getattr(value, "name", None):
                    self.add(value)

    def names(self) -> list[str]:
        return sorted(self._steps)

    def get(self, name: str) -> type[Step]:
        if name in self._steps:
            return self._steps[name]
        close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else f"known steps: {', '.join(self.names())}"
        raise KeyError(f"unknown step {name!r}: {hint}")
