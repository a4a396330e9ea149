"""The plan: a runbook resolved against an inventory, checked completely before any host is touched."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from overhaul.command import quote
from overhaul.config import load_document
from overhaul.errors import ConfigError, OverhaulError
from overhaul.inventory import Host, Inventory
from overhaul.runbook import LoadedRunbook, Stage
from overhaul.secrets import Redactor
from overhaul.step import Params, Registry, Step

REFERENCE = re.compile(r"\$\{(q:)?([A-Za-z_][A-Za-z0-9_]*)\}")  # ${name}, or ${q:name} quoted for a shell


@dataclass
class PlannedStage:
    index: int
    stage: Stage
    step: type[Step]
    params: dict[str, Params] = field(default_factory=dict)  # host name -> validated params
    hook: bool = False  # one of the runbook's hooks, not of its own stages: an undo leaves it alone

    @property
    def hosts(self) -> list[str]:
        return list(self.params)


@dataclass
class Plan:
    runbook: LoadedRunbook
    inventory: Inventory
    run_params: dict[str, Any]  # the parameters the operator gave (defaults and inventory vars apart)
    stages: list[PlannedStage]
    redactor: Redactor = field(default_factory=Redactor)  # knows every secret the run's steps read
    limit: str = ""  # --limit: the run is kept to these hosts (journaled; never a full pass for promotion)
    on_failure: list[PlannedStage] = field(default_factory=list)  # hooks.on_failure: run when the run failed

    @property
    def next_index(self) -> int:
        """The index of a stage added after all of the runbook's (an undo's)."""
        return len(self.stages) + len(self.on_failure)

    @property
    def hosts(self) -> list[str]:
        """Every host some stage targets, in inventory order."""
        return list(dict.fromkeys(host for planned in self.stages for host in planned.hosts))

    def without(self, excluded: set[str]) -> Plan:
        """The same plan with some hosts left out of every stage."""
        def kept(stages: list[PlannedStage]) -> list[PlannedStage]:
            return [replace(p, params={h: v for h, v in p.params.items() if h not in excluded}) for p in stages]

        return Plan(self.runbook, self.inventory, self.run_params, kept(self.stages), self.redactor, self.limit,
                    kept(self.on_failure))


def build_plan(
    loaded: LoadedRunbook, inventory: Inventory, registry: Registry, given: dict[str, Any] | None = None,
    flags: dict[str, str] | None = None, limit: str = "",
) -> Plan:
    """Resolve every stage's hosts and params; raise ConfigError listing every problem found.

    `flags` names the command-line flag of a parameter where it is not `--param NAME=VALUE`; `limit`
    keeps the run to some hosts (see `limited_to`).
    """
    runbook = loaded.runbook
    problems: list[str] = []
    allowed = limited_to(inventory, limit) if limit else None
    given = {name: value for name, value in (given or {}).items() if value is not None}
    flags = flags or {}
    _unknown_params(loaded, given, problems)
    for name, value in given.items():
        if isinstance(value, str) and (not value.strip() or value != value.strip()):
            problems.append(f"{flags.get(name, f'--param {name}')}: {value!r}: an empty value "
                            f"or one with surrounding blanks is not a {name} (is a shell variable unset?)")
    stages = []
    for index, (place, stage) in enumerate(runbook.sequence()):
        label = loaded.label(index)
        try:
            step = registry.get(stage.step)
        except KeyError as exc:
            problems.append(f"{loaded.where(index, 'step')}: {label}.step: {exc.args[0]}")
            continue
        except ConfigError as exc:  # a plug-in that cannot be loaded: named where the runbook uses it
            problems.append(f"{loaded.where(index, 'step')}: {label}.step: {exc}")
            continue
        planned = PlannedStage(index, stage, step, hook=place[0] == "hooks")
        selected = select_hosts(stage, inventory, loaded, index, problems)
        if not selected and not stage.optional:
            problems.append(f"{loaded.where(index)}: {label} ({stage.name!r}): selects no host of "
                            f"{inventory.environment!r}: check roles/hosts/exclude, or say `optional: true`")
        if allowed is not None:
            before, selected = selected, [host for host in selected if host.name in allowed]
            if before and not selected and not stage.optional and not step.read_only:
                # A limited run must not skip a changing stage (the backup, say) while it runs the ones after it.
                problems.append(f"{loaded.where(index)}: {label} ({stage.name!r}): --limit {limit!r} leaves it no "
                                f"host, but it changes hosts ({', '.join(h.name for h in before)}): include one of them, "
                                "or say `optional: true` in the runbook")
        for host in selected:
            # Precedence: runbook defaults < inventory vars (host over role over environment) < given.
            values = {**runbook.params, **inventory.host_vars(host), **given, "host": host.name, "address": host.address}
            for name in [name for name in runbook.params if values[name] is None]:
                problems.append(
                    f"{loaded.document.where(('params', name))}: params.{name}: required: give it with "
                    f"{flags.get(name, f'--param {name}=VALUE')}"
                )
            try:
                raw = substitute(stage.params, values)
                planned.params[host.name] = step.Params.model_validate(raw)
            except KeyError as exc:
                problems.append(
                    f"{loaded.where(index, 'params')}: {label}.params: unknown reference ${{{exc.args[0]}}} "
                    f"for host {host.name} (known: {', '.join(sorted(values))})"
                )
            except ValidationError as exc:
                problems += [
                    f"{line} (step {stage.step!r})"
                    for line in loaded.document.explain(exc, prefix=(*place, "params"))
                ]
        stages.append(planned)
    failing = len(runbook.hooks.on_failure)
    if not problems:
        _untiered_hosts(loaded, inventory, stages[:len(stages) - failing], problems)
    redactor = Redactor()
    if not problems:
        _resolve_secrets(stages, inventory, redactor, problems)
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))  # one line per problem, not per host
    return Plan(loaded, inventory, given, stages[:len(stages) - failing], redactor, limit, stages[len(stages) - failing:])


def _untiered_hosts(loaded: LoadedRunbook, inventory: Inventory, stages: list[PlannedStage],
                    problems: list[str]) -> None:
    """A host of the run that misses a step the runbook runs tier by tier is an input error.

    A step the runbook runs in several stages, each selecting by role (the upgrade's `app.reconfigure` for db,
    worker, then app), is run tier by tier: every host of the run must be in one of those tiers. A host whose roles
    none of them names (a misspelt role, `roles: [ap]`) would go through the run's other stages, stopped and
    upgraded, but never reconfigured. Hosts a runbook leaves out on purpose are not of the run: a step run by role
    in one stage only, or also without roles, is no tiering (and a runbook without roles has none).
    """
    steps: dict[str, list[PlannedStage]] = {}
    for planned in stages:
        if not planned.hook:  # a hook (maintenance mode on the app tier, say) is around the change, not a tier of it
            steps.setdefault(planned.stage.step, []).append(planned)
    in_run = {host for planned in stages for host in planned.hosts}
    for step, tiers in steps.items():
        if len(tiers) < 2 or not all(planned.stage.roles for planned in tiers):
            continue
        roles = sorted({role for planned in tiers for role in planned.stage.roles})
        for host in inventory.hosts:
            if host.name not in in_run or set(roles) & set(host.roles):
                continue
            through = ", ".join(planned.stage.name for planned in stages if host.name in planned.params)
            problems.append(
                f"{_host_where(inventory, host.name)}: host {host.name!r} has roles {', '.join(host.roles)}: runbook "
                f"{loaded.runbook.name!r} would take it through {through}, but never through {step}, which it runs by "
                f"role ({', '.join(repr(planned.stage.name) for planned in tiers)}: roles {', '.join(roles)}): is a role "
                "misspelt? Give the host one of those roles"
            )


def _host_where(inventory: Inventory, name: str) -> str:
    """The inventory file and line of a host's roles (the file alone for a host its `source:` found)."""
    if inventory.path is None:
        return f"the inventory of {inventory.environment!r}"
    try:
        document = load_document(inventory.path)
        listed = document.data.get("hosts") or []
        index = [entry.get("name") if isinstance(entry, dict) else None for entry in listed].index(name)
        return document.where(("hosts", index, "roles"))
    except (OverhaulError, ValueError, AttributeError, OSError):
        return str(inventory.path)


def limited_to(inventory: Inventory, limit: str) -> set[str]:
    """`--limit`, as Ansible's: comma-separated host names, globs (`app*`) and roles (`role:app`)."""
    chosen: set[str] = set()
    for pattern in (part.strip() for part in limit.split(",")):
        if not pattern:
            continue
        if pattern.startswith("role:"):
            matched = {host.name for host in inventory.hosts if pattern[5:] in host.roles}
        else:
            matched = {host.name for host in inventory.hosts if fnmatch.fnmatchcase(host.name, pattern)}
        if not matched:
            names = ", ".join(host.name for host in inventory.hosts)
            roles = ", ".join(f"role:{role}" for role in sorted({role for host in inventory.hosts for role in host.roles}))
            raise ConfigError([f"--limit {pattern!r}: matches no host of {inventory.environment!r} (hosts: {names}; "
                               f"roles: {roles or 'none'})"])
        chosen |= matched
    if not chosen:
        raise ConfigError([f"--limit {limit!r}: names no host"])
    return chosen


def _resolve_secrets(stages: list[PlannedStage], inventory: Inventory, redactor: Redactor, problems: list[str]) -> None:
    """Read every secret a stage's step needs now, so a missing one is an input error before anything connects."""
    names = {name for planned in stages for params in planned.params.values() for name in planned.step(params).secrets()}
    for name in sorted(names):
        ref = inventory.secrets.get(name)
        if ref is None:
            known = ", ".join(sorted(inventory.secrets)) or "none"
            problems.append(f"secret {name!r} is not in the inventory of {inventory.environment!r} (secrets: {known})")
            continue
        try:
            redactor.add(ref.resolve())
        except OverhaulError as exc:
            problems.append(str(exc))


def _unknown_params(loaded: LoadedRunbook, given: dict[str, Any], problems: list[str]) -> None:
    declared = loaded.runbook.params
    for name in given:
        if name not in declared:
            known = ", ".join(sorted(declared)) or "none"
            problems.append(f"{loaded.path}: runbook {loaded.runbook.name!r} has no parameter {name!r} (parameters: {known})")


def select_hosts(
    stage: Stage, inventory: Inventory, loaded: LoadedRunbook, index: int, problems: list[str]
) -> list[Host]:
    """The stage's hosts in inventory order: by role or by name, minus exclusions."""
    names = {host.name for host in inventory.hosts}
    for field_name, wanted, known in (
        ("roles", stage.roles, inventory.roles), ("hosts", stage.hosts, names), ("exclude", stage.exclude, names)
    ):
        for item in wanted:
            if item not in known:
                problems.append(
                    f"{loaded.where(index, field_name)}: {loaded.label(index)}.{field_name}: {item!r} is not in the inventory "
                    f"of {inventory.environment!r} (known: {', '.join(sorted(known))})"
                )
    return [
        host for host in inventory.hosts
        if (not stage.roles or set(stage.roles) & set(host.roles))
        and (not stage.hosts or host.name in stage.hosts)
        and host.name not in stage.exclude
    ]


def substitute(value: Any, values: dict[str, Any]) -> Any:
    """Replace ${name} references in strings (recursively); a whole-string reference keeps its type.

    `${q:name}` inserts the value quoted for a POSIX shell (overhaul.command.quote): the form to use inside a
    `shell` step's command, where a plain `${name}` would let the value's own characters be shell syntax. It stands
    as a word of its own, never inside quotes (the runbook's load refuses that).
    """
    if isinstance(value, str):
        whole = REFERENCE.fullmatch(value)
        if whole and not whole.group(1):
            return values[whole.group(2)]
        return REFERENCE.sub(lambda m: _insert(values[m.group(2)], quoted=bool(m.group(1))), value)
    if isinstance(value, dict):
        return {key: substitute(item, values) for key, item in value.items()}
    if isinstance(value, list):
        return [substitute(item, values) for item in value]
    return value


def _insert(value: Any, quoted: bool) -> str:
    return quote(str(value)) if quoted else str(value)
