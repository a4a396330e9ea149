"""Overhaul as a library: load or compose a runbook, plan it on an environment, run it, resume it.

    from overhaul import api

    book = api.Runbook(name="reload-app", stages=[
        api.Stage(name="stop", step="services.stop", roles=["app"]),
        api.Stage(name="start", step="supervisor.up", roles=["app"]),
    ])
    result = api.run(api.plan(book, "staging"), yes=True)
    print(result.status, result.run_id, [(r.stage, r.host, r.outcome) for r in result.results])

The command line is built on these functions: a run started here passes the same gate (every preflight on
every host before the first change, the environment's promotion policy, its protection), takes the same
lock, is journaled the same way, and `overhaul resume`, `undo`, `show` and `history` know it. A runbook
composed in Python is validated as a YAML one is, and kept (0600) beside the journal, so that a resume
finds it unchanged. Progress reaches the caller as typed events (overhaul.events) given to `subscribers`;
nothing here prints. Refusals and bad input raise `overhaul.errors.OverhaulError` subclasses, each with
its `exit_code`; a run that started returns its `RunResult` (status, exit code, run id, every pair).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from overhaul.errors import ConfigError, HostUnreachable, OverhaulError, Refused, StepFailed
from overhaul.events import RunStarted, Subscriber
from overhaul.execution import COMPOSED, COMPOSED_EVENT, Execution, Gate
from overhaul.inventory import Inventory
from overhaul.plan import Plan, PlannedStage
from overhaul.report import ConsoleView
from overhaul.runbook import Hooks, LoadedRunbook, PreflightPolicy, RetryPolicy, Runbook, Stage
from overhaul.runner import HostResult, RunResult
from overhaul.settings import open_state, outputs_dir
from overhaul.state import RunRecord, State
from overhaul.step import Outcome, Registry

if TYPE_CHECKING:
    from overhaul.planfile import SavedPlan

__all__ = ["ConsoleView", "Hooks", "HostResult", "Outcome", "Plan", "PreflightPolicy", "RetryPolicy", "RunResult",
           "Runbook", "Stage", "load_runbook", "plan", "preview", "resume", "run"]

Approve = Callable[[RunResult, list[PlannedStage]], bool]
RESERVED = ("upgrade", "rollback", "verify")  # the built-in runbooks whose runs the environment's history reads


def load_runbook(name: str | Path, runbooks_dir: str | Path = "runbooks") -> Runbook:
    """A runbook by name (`runbooks_dir`/NAME.yaml, else a built-in one) or path, validated (errors name the line)."""
    from overhaul import runbook

    return runbook.load_runbook(str(name), Path(runbooks_dir)).runbook


def plan(runbook: Runbook | LoadedRunbook | str | Path, env: str, *, params: Mapping[str, Any] | None = None, limit: str = "",
         hosts_dir: str | Path = "hosts", runbooks_dir: str | Path = "runbooks", steps_dir: str | Path = "steps",
         flags: Mapping[str, str] | None = None) -> Plan:
    """Everything that can be checked without touching a host, checked: the runbook (a `Runbook` composed in
    Python, or a name or path), `env`'s inventory, the steps and their parameters; `limit` keeps the run to some
    hosts (as --limit). A `version` parameter of `latest` is resolved once, on the first host that answers.

    `flags`: how the caller calls a parameter in its errors (the command line: `{"version": "--version"}`)."""
    from overhaul.inventory import load_inventory
    from overhaul.plan import build_plan

    inventory = load_inventory(env, Path(hosts_dir))
    loaded = _loaded(runbook, Path(runbooks_dir))
    steps = registry(steps_dir)
    given, named = dict(params or {}), dict(flags or {})
    planned = build_plan(loaded, inventory, steps, given, named, limit)
    if planned.run_params.get("version") == "latest":
        planned = build_plan(loaded, inventory, steps, {**given, "version": newest_available(inventory)}, named, limit)
    return planned


def preview(planned: Plan, *, skip_unreachable: bool = False, subscribers: Iterable[Subscriber] = ()) -> RunResult:
    """What a run would do, changing nothing: every preflight on every host, then each stage's check."""
    return Execution(planned, subscribers=subscribers, gate=Gate(skip_unreachable=skip_unreachable)).preview()


def run(planned: Plan, *, yes: bool = False, approve: Approve | None = None,
        confirm: Callable[[PlannedStage], bool] | None = None, skip_unreachable: bool = False,
        subscribers: Iterable[Subscriber] = (), state: State | None = None, reviewed: SavedPlan | None = None) -> RunResult:
    """Run `planned` under the environment's lock, journaled, after every preflight passed on every host.

    A protected environment runs only with `yes`, or when `approve` (shown the preview of what would change and
    its stages) says yes; a stage that asks for confirmation runs when `confirm` says yes (default: `yes`).
    `reviewed`: a plan saved by `overhaul plan --out` that this run must match exactly (any drift refuses it).
    Raises `Refused` (nothing changed) when the promotion policy, the lock or an unfinished run is in the way."""
    from overhaul.history import ROLLBACK

    state = state or open_state()
    env = planned.inventory.environment
    if "version" in planned.run_params and planned.runbook.runbook.name != ROLLBACK:  # back to what it ran: no promotion
        check_promotion(planned.inventory, str(planned.run_params["version"]), state)
    if planned.inventory.policy.protected and not yes and approve is None:
        raise Refused(f"environment {env!r} is protected: give approve= (shown what the run would change) or yes=True")
    if reviewed is not None:
        subscribers = [*subscribers, applying(reviewed, state)]
    gate = Gate(skip_unreachable=skip_unreachable, reviewed=reviewed, approve=None if yes else approve)
    execution = Execution(planned, state=state, subscribers=subscribers, confirm=confirm or (lambda stage: yes), gate=gate)
    return execution.run(version_from=expected_version(state, env))


APPLIED_EVENT = "applied-plan"  # a run that applies a saved plan: the plan's SHA-256


def applying(reviewed: SavedPlan, state: State) -> Subscriber:
    """Refuse a saved plan some run applied already (that run changed the farm: its plan no longer says what a
    run would do); else journal, as the run starts, that it applies this plan."""
    for record in state.runs_with_event(reviewed.environment, APPLIED_EVENT, reviewed.sha256):
        if record.status in ("refused", "rolled back"):
            continue  # nothing it changed is left: the gate's drift check says whether the plan still holds
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(record.started))
        if record.status in ("succeeded", "abandoned"):
            raise Refused(f"already applied: this plan was applied by run {record.id} ({record.status}, {started}); "
                          "a plan is applied once: plan again to see what a run would change now")
        raise Refused(f"already applied: this plan was applied by run {record.id}, which is {record.status} "
                      f"({started}): go on with `overhaul resume --run {record.id}`, or undo it "
                      f"(`overhaul undo --run {record.id}`) and plan again")

    def journal(event: object) -> None:
        if isinstance(event, RunStarted) and event.resuming is None:
            state.event(event.environment, APPLIED_EVENT, reviewed.sha256, event.run_id)

    return journal


def resume(env: str = "", *, run_id: str = "", yes: bool = False, approve: Approve | None = None,
           confirm: Callable[[PlannedStage], bool] | None = None, skip_unreachable: bool = False,
           subscribers: Iterable[Subscriber] = (), hosts_dir: str | Path = "hosts", steps_dir: str | Path = "steps",
           params: Mapping[str, str] | None = None, state: State | None = None) -> RunResult:
    """Go on with an interrupted, failed or partial run (`run_id`, or the newest such run of `env`): what it did is
    skipped once its check confirms it still holds. A run that was being undone is not resumed here (its way on
    is `overhaul undo`). `params`: the values of parameters the journal holds redacted (a secret's value was in
    them), given again; every other parameter is the run's own."""
    from overhaul.execution import UNDO
    from overhaul.history import find_run

    state = state or open_state()
    if run_id:
        record = find_run(state, run_id)
    else:
        found = state.resumable(env) if env else None
        if found is None:
            raise OverhaulError(f"no unfinished or failed run of {env!r} to resume in {state.url}" if env
                                else "give env (resume its newest unfinished run) or run_id")
        record = found
    if env and record.environment != env:
        raise OverhaulError(f"run {record.id} is of environment {record.environment!r}, not {env!r}")
    if record.status in ("succeeded", "abandoned", "rolled back", "refused"):
        raise OverhaulError(f"run {record.id} is {record.status}: there is nothing to resume")
    if state.run_event(record.id, UNDO) is not None:
        raise Refused(f"run {record.id} was being undone: continue its undo with `overhaul undo --run {record.id}`")
    planned = journaled_plan(state, record, hosts_dir, steps_dir, "resume", dict(params or {}))
    if planned.inventory.policy.protected and not yes and approve is None:
        raise Refused(f"environment {record.environment!r} is protected: give approve= or yes=True")
    gate = Gate(skip_unreachable=skip_unreachable, approve=None if yes else approve)
    execution = Execution(planned, state=state, subscribers=subscribers, confirm=confirm or (lambda stage: yes), gate=gate)
    return execution.run(resume=record, version_from=expected_version(state, record.environment))


def _loaded(runbook: Runbook | LoadedRunbook | str | Path, runbooks_dir: Path) -> LoadedRunbook:
    """A runbook as the engine takes it: from its file, or a composed one written to a file of its own (0600, named
    by its content) that the journal names, so that a resume or an undo finds exactly it."""
    from overhaul import runbook as runbooks

    if isinstance(runbook, LoadedRunbook):
        return runbook
    if not isinstance(runbook, Runbook):
        return runbooks.load_runbook(str(runbook), runbooks_dir)
    if runbook.name in RESERVED:
        raise ConfigError([f"runbook {runbook.name!r} composed in Python: {runbook.name!r} is a built-in runbook's name, "
                           "which the environment's history reads as that runbook (promotion, rollback, the expected "
                           "version): name yours otherwise"])
    text = COMPOSED + yaml.safe_dump(runbook.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
    return runbooks.load_runbook(str(keep_composed(text)), runbooks_dir)


def keep_composed(text: str) -> Path:
    """The file of a composed runbook's `text` (written, 0600, unless it is there already), named by its content."""
    from overhaul.files import write_private

    name = yaml.safe_load(text).get("name", "runbook")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(name)).strip(".-")[:60] or "runbook"
    path = outputs_dir().parent / "runbooks" / f"{slug}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    if not path.is_file() or path.read_text() != text:
        write_private(path, text)
    return path


def registry(steps_dir: str | Path = "steps", *more: str | Path) -> Registry:
    """The steps a runbook may use: the built-in ones, installed plug-ins (entry points), and the own steps of
    `steps_dir` and of the `more` folders (each folder once)."""
    # In the checkout, steps/ is also the built-in package (installed editable): its modules that entry points name
    # are left to them (imported once, when a runbook uses them); an operator's own module there loads as a local step.
    from overhaul import step

    builtin = Path(str(resources.files(step.BUILTIN_PACKAGE))).resolve()
    folders = {Path(folder).resolve(): Path(folder) for folder in (*more, steps_dir)}
    return Registry(list(folders.values()), packages={builtin: step.BUILTIN_PACKAGE})



def newest_available(inventory: Inventory) -> str:
    """Resolve "latest" once, on the first host that answers, so every host gets the same, journaled version."""
    from overhaul.context import StepHost
    from overhaul.steps.package import newest_version, package_manager  # type: ignore[import-not-found]
    from overhaul.transport import Transport

    transport = Transport(inventory)
    problems = []
    try:
        for entry in inventory.hosts:
            try:
                host = StepHost(transport.host(entry.name), timeout=120, run_id="latest")
                package = str(inventory.host_vars(entry).get("package", "scalr-server"))
                return str(newest_version(host, package_manager(host), package))
            except (HostUnreachable, StepFailed) as exc:
                problems.append(str(exc))
    finally:
        transport.close()
    raise Refused("cannot resolve version 'latest': " + "; ".join(problems))



def check_promotion(inventory: Inventory, version: str, state: State | None = None) -> None:
    """policy.promotion_from: the version must have been upgraded to, successfully, on that environment first,
    and (policy.soak) have been there long enough."""
    from overhaul.inventory import human_duration

    policy = inventory.policy
    source = policy.promotion_from
    if not source:
        return
    if version == "latest":
        raise Refused(f"{inventory.environment!r} takes only versions promoted from {source!r}: give --version")
    from overhaul.history import History

    passes = History(state or open_state(), source).passed(version)
    if not passes:
        raise Refused(
            f"version {version} has not passed on {source!r} yet ({inventory.environment!r} has policy.promotion_from: "
            f"{source}): upgrade {source} to {version} first"
        )
    waited = time.time() - min(passes)
    if waited < policy.soak:
        ready = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(min(passes) + policy.soak))
        raise Refused(f"version {version} has been on {source!r} for {waited / 3600:.1f} h; "
                      f"{inventory.environment!r} has policy.soak: {human_duration(policy.soak)}: promote it after {ready}")



def journaled_plan(state: State, record: RunRecord, hosts_dir: str | Path, steps_dir: str | Path, doing: str,
                   given: dict[str, str] | None = None) -> Plan:
    """The plan a journaled run ran: its runbook (unchanged since, by SHA-256), parameters, hosts and limit.

    A parameter the journal holds redacted (a secret's value was in it) must be `given` again: the run is never
    rebuilt with the mark in place of the value."""
    from overhaul.execution import LIMIT, LOCAL_STEPS, file_sha256, recorded_hosts
    from overhaul.inventory import load_inventory
    from overhaul.plan import build_plan
    from overhaul.runbook import load_runbook
    from overhaul.secrets import redacted_in

    given = given or {}
    missing = [name for name, value in record.params.items() if redacted_in(value) and name not in given]
    if missing:
        flags = " ".join(f"--param {name}=VALUE" for name in missing)
        how = f"give it again: `overhaul resume --run {record.id} {flags}`" if doing == "resume" else "do it by hand"
        raise OverhaulError(f"run {record.id}: the journal holds {', '.join(missing)} redacted (a secret's value was "
                            f"in it): cannot {doing} with the mark in its place; {how}")
    params = {**record.params, **{name: given[name] for name in given if redacted_in(record.params.get(name))}}
    inventory = load_inventory(record.environment, Path(hosts_dir), found=recorded_hosts(state, record))
    params = {name: secret_param(inventory, value) for name, value in params.items()}

    path = Path(record.runbook_path)
    composed = state.run_event(record.id, COMPOSED_EVENT)
    if composed is not None and (not path.exists() or file_sha256(path) != record.runbook_sha256):
        path = keep_composed(composed)  # composed in Python on another controller: its text is in the journal
    if not path.exists() or file_sha256(path) != record.runbook_sha256:
        raise OverhaulError(f"runbook {path} changed (or is gone) since run {record.id} started: refusing to {doing}")
    own = [folder for folder in json.loads(state.run_event(record.id, LOCAL_STEPS) or "[]") if Path(folder).is_dir()]
    planned = build_plan(load_runbook(str(path)), inventory, registry(steps_dir, *own), params,
                         limit=state.run_event(record.id, LIMIT) or "")
    for name, value in record.params.items():
        if secret_name(value):
            planned.redactor.add(params[name])
    return planned


def secret_name(value: Any) -> str | None:
    """The secret a journaled parameter refers to (`{"secret": NAME}`), or None for a plain value."""
    return value["secret"] if isinstance(value, dict) and set(value) == {"secret"} else None


def secret_param(inventory: Inventory, value: Any) -> Any:
    """A journaled parameter: `{"secret": NAME}` (a --param that was an inventory secret) read again now."""
    from overhaul.planfile import secret_refs

    name = secret_name(value)
    if name is None:
        return value
    ref = secret_refs(inventory).get(name)
    if ref is None:
        raise OverhaulError(f"a parameter of the run was the value of secret {name!r}, which the inventory "
                            f"of {inventory.environment!r} no longer has")
    return ref.resolve()



def expected_version(state: State, env: str) -> str | None:
    """The version `env` should run, as far as its journal knows (None: unknown)."""
    from overhaul.history import History

    return History(state, env).expected_version()


