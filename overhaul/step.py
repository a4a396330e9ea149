"""The step contract and the step registry.

A step proves in `preflight` that its work could be done (before the run changes anything anywhere),
reads state in `check` (never changes anything), changes it in `apply`, and proves the change in
`verify`. The runner calls `apply` only when `check` says the work is not done, so a runbook run
twice in a row reports no change the second time.

The way back follows the same contract: `undone` reads whether a pair's change was taken back, `undo`
takes it back from what `apply` put in `remembered` (journaled with the pair, whatever its outcome).
A step that changes hosts says whether its change can be taken back: `reversible = True` (with
`undone`/`undo`, or a change harmless to keep), or `reversible = False` and why, in `irreversible`.
One that says neither is undecided, and an undo of a run it changed a host in refuses, naming it.

`check` and `apply` are the contract's core: a step class that does not define them is refused when it
is registered. Its parameters are declared once, as the generic argument (`Step[TouchParams]` sets
`Params`). Installed steps (entry points) are imported when a runbook first names them, so a broken
plug-in fails only the runbooks that use it, as an input error naming it.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict

from overhaul.errors import ConfigError, StepFailed

if TYPE_CHECKING:
    from overhaul.context import Probe, StepHost

ENTRY_POINT_GROUP = "overhaul.steps"
BUILTIN_PACKAGE = "overhaul.steps"  # the built-in steps' package (in the checkout: its steps/ folder)
LOCAL_MODULES = "overhaul_local_steps"  # the module names an operator's own steps/ folder is imported under
BUILTIN_DISTRIBUTION = "overhaul"  # entry points of this distribution are the built-in steps (the reference page)
UNDECIDED = ("set reversible = True with undone/undo, or reversible = False with irreversible")


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
    """Subclass as `Step[MyParams]` with a `name`, and check/apply (verify, undone/undo, preflight optional)."""

    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params  # set from the generic argument: `class X(Step[XParams])`
    read_only: ClassVar[bool] = False  # True: an assertion that never changes a host (apply only reports)
    # Whether an undo can take this step's change back: True (undone/undo do, or the change is harmless to keep),
    # False (say what is lost in `irreversible`), None: undecided, and an undo of a run it changed refuses.
    reversible: ClassVar[bool | None] = None
    irreversible: ClassVar[str] = ""  # what is lost for good once the step applied, shown in plans and undo refusals

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """`class X(Step[XParams])` sets `X.Params = XParams`; a `Params = Other` that disagrees is an error."""
        super().__init_subclass__(**kwargs)
        generic = _generic_params(cls)
        if generic is None:
            return
        declared = cls.__dict__.get("Params")
        if declared is None:
            cls.Params = generic
        elif declared is not generic:
            raise TypeError(f"step class {cls.__qualname__} ({getattr(cls, 'name', '?')}): its generic argument "
                            f"says its parameters are {generic.__name__} (Step[{generic.__name__}]) but it declares "
                            f"Params = {getattr(declared, '__name__', declared)!s}: declare them once, as the "
                            "generic argument")

    def __init__(self, params: P):
        self.params = params
        self.remembered: dict[str, Any] = {}  # what `undo` will need, set by apply before it changes anything

    def secrets(self) -> list[str]:
        """Names of the inventory secrets this step reads: resolved when the run is loaded (a missing one is an
        input error before anything connects) and redacted from everything the run prints or journals."""
        return []

    def probes(self) -> list[Probe[Any]]:
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


def _generic_params(cls: type) -> type[Params] | None:
    """The parameters model `cls` names as its generic argument (`class X(Step[XParams])`), if it names one."""
    for base in cls.__dict__.get("__orig_bases__", ()):
        origin, args = get_origin(base), get_args(base)
        named = args[0] if args else None
        if isinstance(origin, type) and issubclass(origin, Step) and isinstance(named, type) and issubclass(named, Params):
            return named
    return None


def missing_methods(step: type[Step[Any]]) -> list[str]:
    """The contract's methods `step` does not define (inherited from Step itself): `check`, `apply`."""
    return [method for method in ("check", "apply") if getattr(step, method) is getattr(Step, method)]


def _package_folder(package: str) -> Path | None:
    """Where the modules of an importable package are (its first folder); None when it cannot be found."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]).resolve() if locations else None


class AssertionStep(Step[P]):
    """A read-only step (a check of the farm, as `services.verify`): `check` is the whole of it, and `apply` only
    reports why it does not hold. Subclass it with a `name` and a `check`."""

    read_only = True

    def apply(self, host: StepHost) -> str:
        raise StepFailed(self.check(host).message)


class Registry:
    """Step classes by name: built-ins and other packages (entry points), and a local steps/ folder.

    Entry points are kept by name and imported when `get` first asks for one: a plug-in that cannot be
    imported is an input error naming it, for the runbooks that use it only. `packages` maps a folder that
    is also an importable package (the checkout's steps/, which is the built-in package) to its name: its
    modules that entry points name are left to them, the others load as local steps (see load_folder).
    """

    def __init__(self, local_dirs: list[Path] | None = None, entries: Iterable[EntryPoint] | None = None,
                 packages: dict[Path, str] | None = None):
        self._steps: dict[str, type[Step[Any]]] = {}
        self._entries: dict[str, EntryPoint] = {}
        for entry in entry_points(group=ENTRY_POINT_GROUP) if entries is None else entries:
            self._entries[entry.name] = entry
        self._packages = packages
        for folder in local_dirs or []:
            self.load_folder(folder)

    def add(self, step: type[Step[Any]]) -> None:
        """Register a step class by its name; refused (ConfigError) when it is not a whole step."""
        if not (isinstance(step, type) and issubclass(step, Step) and getattr(step, "name", None)):
            raise ConfigError([f"{step!r} is not a Step subclass with a name"])
        missing = missing_methods(step)
        if missing:
            raise ConfigError([f"step {step.name!r} ({step.__module__}.{step.__qualname__}) does not define "
                               f"{' and '.join(missing)}: every step says how it reads a host (check) and how it "
                               "changes it (apply; a read-only step derives from AssertionStep)"])
        self._steps[step.name] = step

    def builtin_names(self) -> list[str]:
        """The names of the built-in steps: entry points of Overhaul's own distribution (not plug-ins')."""
        return sorted(name for name, entry in self._entries.items()
                      if entry.dist is not None and entry.dist.name == BUILTIN_DISTRIBUTION)

    def load_folder(self, folder: Path) -> None:
        """Import every *.py of an operator's steps/ folder and register the Step subclasses in it.

        A folder that is also a package (the checkout's steps/ is the built-in one): a module an entry point
        names is left to it (imported once, when a runbook uses one of its steps); another is imported as a
        module of that package and its steps are registered, as a local folder's are.
        """
        if not folder.is_dir():
            return
        package = self._package_of(folder)
        if package is not None:
            self._load_package_folder(folder, package)
            return
        for path in sorted(folder.glob("*.py")):
            if path.name.startswith("_"):
                continue
            module_name = f"{LOCAL_MODULES}.{path.stem}"
            spec = importlib.util.spec_from_file_location(module_name, path)
            assert spec and spec.loader
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as exc:
                raise ConfigError([f"{path}: cannot load this step module: {type(exc).__name__}: {exc}"]) from None
            self._add_defined_in(module, module_name, path)

    def _package_of(self, folder: Path) -> str | None:
        packages = self._packages
        if packages is None:  # by default: the built-in package's folder (the checkout's steps/)
            builtin = _package_folder(BUILTIN_PACKAGE)
            packages = {builtin: BUILTIN_PACKAGE} if builtin is not None else {}
        resolved = folder.resolve()
        return next((name for where, name in packages.items() if Path(where).resolve() == resolved), None)

    def _load_package_folder(self, folder: Path, package: str) -> None:
        named = {entry.module for entry in self._entries.values()}
        for path in sorted(folder.glob("*.py")):
            module_name = f"{package}.{path.stem}"
            if path.name.startswith("_") or module_name in named:
                continue
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:
                raise ConfigError([f"{path}: cannot load this step module: {type(exc).__name__}: {exc}"]) from None
            self._add_defined_in(module, module_name, path)

    def _add_defined_in(self, module: Any, module_name: str, path: Path) -> None:
        for value in vars(module).values():
            defined_here = isinstance(value, type) and value.__module__ == module_name
            if defined_here and issubclass(value, Step) and getattr(value, "name", None):
                try:
                    self.add(value)
                except ConfigError as exc:
                    raise ConfigError([f"{path}: {problem}" for problem in exc.problems]) from None

    def names(self) -> list[str]:
        """Every known step name, loaded or not (an unknown name's "did you mean" draws on them)."""
        return sorted({*self._steps, *self._entries})

    def get(self, name: str) -> type[Step[Any]]:
        """The step class named `name`: an entry point is imported now, the first time it is asked for.

        KeyError: no such step. ConfigError: its plug-in cannot be loaded, or is not a whole step (named).
        """
        if name in self._steps:
            return self._steps[name]
        if name in self._entries:
            return self._load(self._entries[name])
        close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else f"known steps: {', '.join(self.names())}"
        raise KeyError(f"unknown step {name!r}: {hint}")

    def _load(self, entry: EntryPoint) -> type[Step[Any]]:
        source = f" (package {entry.dist.name})" if entry.dist is not None else ""
        plugin = f"the plug-in of step {entry.name!r}, entry point {entry.name} = {entry.value}{source}"
        try:
            step = entry.load()
        except Exception as exc:
            raise ConfigError([f"{plugin}: cannot be loaded: {type(exc).__name__}: {exc}"]) from None
        named = getattr(step, "name", None) if isinstance(step, type) else None
        if named and named != entry.name:
            raise ConfigError([f"{plugin}: its class names itself {named!r}: an entry point's name is its step's name"])
        try:
            self.add(step)
        except ConfigError as exc:
            raise ConfigError([f"{plugin}: {problem}" for problem in exc.problems]) from None
        return self._steps[step.name]
