"""Runbooks: ordered stages, each one step on a selection of hosts with a strategy and a failure budget."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from overhaul.command import CONTEXTS, open_quote
from overhaul.config import Document, Location, dotted, load_document, plain_name
from overhaul.errors import ConfigError

PERCENT = re.compile(r"^(\d{1,3})%$")
QUOTED_REFERENCE = re.compile(r"\$\{q:[A-Za-z_][A-Za-z0-9_]*\}")
BUILTIN_RUNBOOKS = Path(str(resources.files("overhaul.runbooks")))


class Strict(BaseModel):
    """Unknown keys are errors; the docstring under each field is its description in the published schema."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class RetryPolicy(Strict):
    """How often a host's step is tried again after it failed (a command exited non-zero).

    Transport faults while connecting are retried by the transport regardless of this policy.
    """

    attempts: int = Field(1, ge=1, le=20)
    """Tries in all, the first included (1: no retry); each try starts again from the step's check."""
    delay: float = Field(2.0, ge=0, le=3600)
    """Seconds to wait before the first retry."""
    backoff: float = Field(2.0, ge=1, le=10)
    """Each further wait is the one before times this."""


Count = int | str  # a number of hosts, or "N%" of the stage's hosts


def _count(value: Count, allow_zero: bool) -> Count:
    if isinstance(value, int):
        if value < (0 if allow_zero else 1):
            raise ValueError(f"expected {'0 or more' if allow_zero else '1 or more'}, or a percentage like '25%'")
        return value
    match = PERCENT.match(value)
    if not match or not (0 if allow_zero else 1) <= int(match.group(1)) <= 100:
        raise ValueError(f"expected a number or a percentage like '25%', got {value!r}")
    return value


def resolve_count(value: Count, total: int, minimum: int) -> int:
    """A count of hosts: an int as is, 'N%' of total rounded down, never less than `minimum`."""
    if isinstance(value, int):
        return max(value, minimum)
    return max(total * int(value[:-1]) // 100, minimum)


class Stage(Strict):
    """One step, with its parameters, on a selection of hosts, with a strategy and a failure budget."""

    name: str = Field(min_length=1)
    """The stage's name in plans, progress and the journal; unique in the runbook."""
    step: str = Field(min_length=1)
    """The step to run, by name (e.g. mysql.backup): a built-in, an installed package's, or one of your steps/ folder."""
    params: dict[str, Any] = {}
    """The step's parameters; a value may be a ${name} reference to a run parameter or a host variable."""
    roles: list[str] = []
    """Run on the hosts having any of these roles (empty, and no `hosts`: every host)."""
    hosts: list[str] = []
    """Or run on exactly these hosts, by name (not together with `roles`)."""
    exclude: list[str] = []
    """Leave out these hosts, by name."""
    strategy: Literal["parallel", "serial", "rolling"] = "parallel"
    """parallel: every host at once (up to `concurrency`); serial: one host after another; rolling: `batch` hosts at a time."""
    concurrency: int | None = Field(None, ge=1, le=1000)
    """parallel: at most this many hosts at once (default: every host, up to 100)."""
    batch: Count | None = None
    """rolling (and only rolling): hosts per batch, a number or a percentage like '25%'."""
    max_failures: Count = 0
    """Failed hosts tolerated (a number or a percentage like '10%'); one more stops the run (with on_failure: stop)."""
    retry: RetryPolicy = RetryPolicy()
    """How often a host's failed step is tried again."""
    timeout: float = Field(300, gt=0, le=86400)
    """Seconds each command may take; at the end it is killed on the host too."""
    confirm: bool = False
    """true: ask for a yes before this stage starts (or --yes)."""
    on_failure: Literal["stop", "continue"] = "stop"
    """stop: failures beyond max_failures stop the run; continue: record them and go on everywhere."""
    optional: bool = False
    """true: a stage that selects no host is skipped (otherwise that is an input error)."""

    @field_validator("batch")
    @classmethod
    def _batch(cls, value: Count | None) -> Count | None:
        return None if value is None else _count(value, allow_zero=False)

    @field_validator("max_failures")
    @classmethod
    def _max_failures(cls, value: Count) -> Count:
        return _count(value, allow_zero=True)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.strategy == "rolling" and self.batch is None:
            raise ValueError("strategy 'rolling' needs `batch` (a number of hosts or a percentage)")
        if self.strategy != "rolling" and self.batch is not None:
            raise ValueError(f"`batch` only applies to strategy 'rolling' (this stage is {self.strategy!r})")
        if self.roles and self.hosts:
            raise ValueError("select hosts by `roles` or by `hosts`, not both")
        return self


class PreflightPolicy(Strict):
    """What the preflight gate tolerates: by default nothing (every host must be reachable)."""

    unreachable: Literal["refuse", "skip"] = "refuse"
    """refuse: one unreachable host refuses the run; skip: leave unreachable hosts out of the whole run."""


class Hooks(Strict):
    """Stages of ordinary steps around the runbook's own (a load balancer's maintenance mode, a status page), run
    with the same preflight, journal and retries."""

    before: list[Stage] = []
    """Run before the first stage (preflighted with the run's stages: a refusal changes nothing)."""
    after: list[Stage] = []
    """Run after the last stage, when every stage before passed."""
    on_failure: list[Stage] = []
    """Run when the run failed (after its undo, with on_failure: undo), on the hosts they select."""


class Runbook(Strict):
    """An ordered list of stages: runbooks/<name>.yaml."""

    name: str = Field(min_length=1)
    """The runbook's name as the journal, `history --runbook` and prompts show it (keep it the file's name)."""
    description: str = ""
    """What the runbook does, in a line."""
    preflight: PreflightPolicy = PreflightPolicy()
    """What the preflight gate tolerates before the first change."""
    params: dict[str, Any] = {}
    """Run parameters and their defaults, referenced as ${name}; null: must be given (--param name=V, --version)."""
    stages: list[Stage] = Field(min_length=1)
    """The stages, run in order: each one starts after the one before it finished."""
    on_failure: Literal["stop", "undo"] = "stop"
    """stop: a failed run stops where it failed (resume or undo it later); undo: it takes back what its stages
    changed, in reverse order, and ends `rolled back` (refused, nothing undone, if a changed stage is irreversible)."""

    hooks: Hooks = Hooks()
    """Stages before, after, and on failure of the runbook's own."""

    def sequence(self) -> list[tuple[Location, Stage]]:
        """The stages a run goes through in order (hooks.before, stages, hooks.after), then those of hooks.on_failure,
        each with its place in the file."""
        hooks = self.hooks
        return [*[(("hooks", "before", i), stage) for i, stage in enumerate(hooks.before)],
                *[(("stages", i), stage) for i, stage in enumerate(self.stages)],
                *[(("hooks", "after", i), stage) for i, stage in enumerate(hooks.after)],
                *[(("hooks", "on_failure", i), stage) for i, stage in enumerate(hooks.on_failure)]]

    def conflicts(self) -> list[tuple[Location, str]]:
        """Problems across stages, each with the location it is about."""
        seen: dict[str, Location] = {}
        found = []
        for place, stage in self.sequence():
            if stage.name in seen:
                found.append(((*place, "name"), f"another stage is named {stage.name!r} ({dotted(seen[stage.name])})"))
            seen.setdefault(stage.name, place)
            found += _quoted_references(stage.params, (*place, "params"))
        return found


def _quoted_references(value: Any, where: Location) -> list[tuple[Location, str]]:
    """Each `${q:name}` written inside quotes: the value, quoted already, would keep its quotes (inside "...") or
    end them and run as shell (inside '...'). It must stand alone as a word."""
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in _quoted_references(item, (*where, key))]
    if isinstance(value, list):
        return [found for i, item in enumerate(value) for found in _quoted_references(item, (*where, i))]
    if not isinstance(value, str):
        return []
    return [(where, f"{match.group()} stands inside {CONTEXTS[quote]}: write it as a word of its own, outside (it is "
                    "quoted for the shell already)")
            for match in QUOTED_REFERENCE.finditer(value) if (quote := open_quote(value[:match.start()]))]


class LoadedRunbook:
    """A validated runbook and the document it came from (for line numbers in later errors)."""

    def __init__(self, runbook: Runbook, document: Document):
        self.runbook = runbook
        self.document = document

    @property
    def path(self) -> Path:
        return self.document.path

    def place(self, stage_index: int) -> Location:
        """Where the plan's stage `stage_index` is in the file, e.g. ("stages", 2) or ("hooks", "before", 0)."""
        return self.runbook.sequence()[stage_index][0]

    def where(self, stage_index: int, *field: str | int) -> str:
        return self.document.where((*self.place(stage_index), *field))

    def label(self, stage_index: int) -> str:
        """The stage's place as errors name it: stages[2], hooks.before[0]."""
        return dotted(self.place(stage_index))


def runbook_path(name: str, runbooks_dir: Path = Path("runbooks")) -> Path:
    """A runbook by path, or by name in the operator's runbooks/ folder, then among the built-ins."""
    as_path = Path(name)
    if as_path.suffix in (".yaml", ".yml") and as_path.exists():
        return as_path
    if as_path.suffix in (".yaml", ".yml") and len(as_path.parts) > 1:
        raise ConfigError([f"runbook {name}: no such file"])
    plain_name(name, "runbook")  # a name, not a path: it must not lead out of the runbook folders
    for folder in (runbooks_dir, BUILTIN_RUNBOOKS):
        candidate = folder / f"{name}.yaml"
        if candidate.exists():
            return candidate
    known = sorted({p.stem for folder in (runbooks_dir, BUILTIN_RUNBOOKS) for p in folder.glob("*.yaml")})
    raise ConfigError([f"unknown runbook {name!r}: no {runbooks_dir}/{name}.yaml (runbooks: {', '.join(known)})"])


def load_runbook(name: str, runbooks_dir: Path = Path("runbooks")) -> LoadedRunbook:
    document = load_document(runbook_path(name, runbooks_dir))
    runbook = document.validate(Runbook)
    problems = [f"{document.where(loc)}: {dotted(loc)}: {message}" for loc, message in runbook.conflicts()]
    if problems:
        raise ConfigError(problems)
    return LoadedRunbook(runbook, document)
