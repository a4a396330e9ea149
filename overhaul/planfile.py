"""A saved plan (`plan --out plan.json`) and the proof that `apply` runs exactly what was reviewed.

The file holds what the reviewer saw: the runbook and inventory (by SHA-256), the resolved parameters
(a concrete version, never `latest`), each host's preflight and check outcome per stage, who and when.
It is bound as a whole: `sha256` is the SHA-256 of the canonical JSON of every other field, and `digests`
holds one short digest per part (a field, a parameter, a stage, a stage's host) so that an edit is named
where it was made. `apply` refuses, before anything is journaled, a file that does not match its binding,
one made in the future, one whose stages or exclusions do not match the runbook it names, and one whose
runbook, inventory or any host's state (drift) changed since, or that is older than its limit.

A parameter whose value is one of the inventory's secrets is saved by reference (`{"secret": NAME}`), never
its value, and resolved again when the plan is applied.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from overhaul import __version__
from overhaul.errors import ConfigError, OverhaulError, Refused
from overhaul.files import read_regular, write_private
from overhaul.inventory import Inventory
from overhaul.plan import Plan
from overhaul.runner import RunResult
from overhaul.secrets import Redactor, SecretRef
from overhaul.step import Outcome

FORMAT = 2  # 2: bound by sha256 and digests; secret-valued parameters by reference
MAX_FILE_BYTES = 5 * 1024 * 1024
CLOCK_SKEW = 300.0  # seconds: a plan made "in the future" by more than this is refused
BINDING = ("digests", "sha256")  # the fields that bind the others
SHOWN = 10  # edits named in a refusal, at most


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class SecretParam(Strict):
    """A parameter whose value was the inventory secret `secret`: saved by name, resolved again at apply."""

    secret: str


class PlannedHost(Strict):
    outcome: str  # ok | changed (would change)
    message: str
    preflight: str


class SavedStage(Strict):
    index: int
    name: str
    step: str
    hosts: dict[str, PlannedHost]


class SavedPlan(Strict):
    format: int
    overhaul: str
    created: float
    created_by: str
    environment: str
    runbook: str
    runbook_path: str
    runbook_sha256: str
    inventory_path: str
    inventory_sha256: str
    params: dict[str, str | bool | int | float | SecretParam]
    excluded: dict[str, str]
    limit: str  # --limit the plan was made with
    stages: list[SavedStage]
    digests: dict[str, str] = {}  # part -> digest (see _parts); set by bind()
    sha256: str = ""  # of the canonical JSON of every other field; set by bind()

    def age_hours(self) -> float:
        return (time.time() - self.created) / 3600

    def shown_params(self) -> str:
        """The parameters as JSON, a secret-valued one by its reference (never its value)."""
        return json.dumps({name: value.model_dump() if isinstance(value, SecretParam) else value
                           for name, value in self.params.items()}, sort_keys=True)


# -- secret-valued parameters ----------------------------------------------------------------------------------------

def secret_refs(inventory: Inventory) -> dict[str, SecretRef]:
    """The inventory's secrets by name: its `secrets`, then the ones its settings hold (by their field)."""
    refs = dict(inventory.secrets)
    others = {"ssh.sudo_password": inventory.ssh.sudo_password}
    if inventory.notify and inventory.notify.webhook:
        others["notify.webhook.url_secret"] = inventory.notify.webhook.url_secret
    for name, ref in others.items():
        if ref is not None:
            refs.setdefault(name, ref)
    return refs


def _readable_secrets(inventory: Inventory) -> Iterator[tuple[str, str]]:
    for name, ref in secret_refs(inventory).items():
        try:
            value = ref.resolve()
        except Exception:  # a secret that cannot be read now is one no parameter was seen to equal
            continue
        if value:
            yield name, value


def by_reference(params: dict[str, Any], inventory: Inventory, redactor: Redactor) -> dict[str, Any]:
    """`params` as a plan file holds them: a value equal to one of the inventory's secrets by that secret's name.

    Each such value is also given to `redactor`, so that no output of the plan shows it.
    """
    if not any(isinstance(value, str) and value for value in params.values()):
        return dict(params)
    secrets = list(_readable_secrets(inventory))
    saved: dict[str, Any] = {}
    for name, value in params.items():
        secret = next((secret for secret, known in secrets if isinstance(value, str) and value == known), None)
        if secret is None:
            saved[name] = value
        else:
            redactor.add(value)
            saved[name] = SecretParam(secret=secret)
    return saved


def resolve_params(saved: SavedPlan, inventory: Inventory) -> tuple[dict[str, Any], list[str]]:
    """The plan's parameters with each secret reference read again; and the secret values read."""
    refs = secret_refs(inventory)
    params: dict[str, Any] = {}
    values = []
    for name, value in saved.params.items():
        if not isinstance(value, SecretParam):
            params[name] = value
            continue
        ref = refs.get(value.secret)
        if ref is None:
            raise Refused(f"params.{name}: the plan gives it the value of secret {value.secret!r}, which the "
                          f"inventory of {inventory.environment!r} does not have: refused before any change")
        try:
            params[name] = ref.resolve()
        except OverhaulError as exc:
            raise OverhaulError(f"params.{name} (the value of secret {value.secret!r}): {exc}") from None
        values.append(params[name])
    return params, values


# -- making, writing and reading a plan file ---------------------------------------------------------------------------

def saved_plan(plan: Plan, result: RunResult, operator: str, runbook_sha256: str, inventory_sha256: str,
               params: dict[str, Any] | None = None) -> SavedPlan:
    """What a check-only run found, as a plan file's content (bound: see `bind`).

    `params`: the parameters as the file holds them (see `by_reference`); the plan's own by default.
    """
    assert result.preflight is not None and plan.inventory.path is not None
    excluded = dict(result.preflight.excluded)
    stages = []
    for planned in plan.stages:
        found = {r.host: r for r in result.results if r.stage_index == planned.index}
        hosts = {}
        for host in planned.hosts:  # in the plan's order, so that apply compares like with like
            if host in excluded:  # left out of the whole run (unreachable, --skip-unreachable)
                continue
            preflight = result.preflight.checks.get((planned.index, host))
            hosts[host] = PlannedHost(outcome=found[host].outcome.value, message=found[host].message,
                                      preflight=preflight.message if preflight else "")
        stages.append(SavedStage(index=planned.index, name=planned.stage.name, step=planned.stage.step, hosts=hosts))
    saved = SavedPlan(
        format=FORMAT, overhaul=__version__, created=time.time(), created_by=operator,
        environment=plan.inventory.environment, runbook=plan.runbook.runbook.name,
        runbook_path=str(plan.runbook.path.resolve()), runbook_sha256=runbook_sha256,
        inventory_path=str(plan.inventory.path.resolve()), inventory_sha256=inventory_sha256,
        params=plan.run_params if params is None else params, excluded=excluded, limit=plan.limit, stages=stages,
    )
    return bind(saved)


def bind(saved: SavedPlan) -> SavedPlan:
    """`saved` with its digests and sha256 set from its other fields (as they read back from its JSON)."""
    document = json.loads(saved.model_dump_json(exclude=set(BINDING)))
    digests, whole = _binding(document)
    return saved.model_copy(update={"digests": digests, "sha256": whole})


def _binding(document: dict[str, Any]) -> tuple[dict[str, str], str]:
    """The digests of a plan document's parts, and the SHA-256 of everything but itself (digests included)."""
    body = {key: value for key, value in document.items() if key not in BINDING}
    digests = {part: _sha256(value)[:16] for part, value in _parts(body).items()}
    return digests, _sha256({**body, "digests": digests})


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _sha256(value: Any) -> str:
    return hashlib.sha256(_canonical(value)).hexdigest()


def _parts(body: dict[str, Any]) -> dict[str, Any]:
    """A plan document cut where an edit is worth naming: each field, parameter, exclusion, stage and stage host."""
    parts: dict[str, Any] = {}
    for key, value in body.items():
        if key in ("params", "excluded"):
            parts[key] = sorted(value)
            parts.update({f"{key}.{name}": item for name, item in value.items()})
        elif key == "stages":
            parts[key] = len(value)
            for position, stage in enumerate(value):
                parts[f"stages.{position}"] = {**{k: v for k, v in stage.items() if k != "hosts"},
                                               "hosts": list(stage["hosts"])}  # their order too
                parts.update({f"stages.{position}.hosts.{host}": entry for host, entry in stage["hosts"].items()})
        else:
            parts[key] = value
    return parts


def writable(out: str) -> Path:
    """Where `plan --out` will write, proven writable before the plan runs (else a ConfigError: exit 2)."""
    path = Path(out)
    problem = None
    if out.endswith(("/", os.sep)) or path.is_dir():
        problem = "is a folder: name a file (e.g. --out plan.json)"
    elif path.exists() or path.is_symlink():
        if not path.is_file():
            problem = "exists and is not a regular file"
        elif not os.access(path, os.W_OK):
            problem = "is not writable"
    else:
        folder = next(parent for parent in path.absolute().parents if parent.exists() or parent.is_symlink())
        if not folder.is_dir():
            problem = f"cannot be created: {folder} is not a folder"
        elif not os.access(folder, os.W_OK | os.X_OK):
            problem = f"cannot be created: {folder} is not writable"
    if problem:
        raise ConfigError([f"--out {out}: {problem}; nothing was run"])
    return path


def write_plan(saved: SavedPlan, path: Path) -> None:
    """Write the plan file whole (a reader never sees half of it); a failure is a ConfigError naming it."""
    try:
        write_private(path, saved.model_dump_json(indent=2) + "\n")  # 0600, in 0700 folders it makes
    except OSError as exc:
        raise ConfigError([f"--out {path}: cannot write the plan: {exc.strerror or exc}"]) from None


def read_plan(path: Path) -> SavedPlan:
    """Load a plan file and prove it is the file `plan --out` wrote.

    A file that is not a plan (not JSON, wrong shape, a missing field, a wrong type) is a ConfigError naming
    the file and the field (exit 2); one that does not match its binding, or that was made in the future, is
    refused (exit 3). Both before anything is journaled.
    """
    try:
        raw = read_regular(path, MAX_FILE_BYTES, "a saved plan")
        document = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such plan file (write one with `overhaul plan ... --out {path}`)"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a folder, not a plan file"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text: not a plan file"]) from None
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{path}:{exc.lineno}: not JSON: {exc.msg}"]) from None
    except _NotPlanJSON as exc:
        raise ConfigError([f"{path}: not a plan file: {exc}"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: nested too deeply: not a plan file"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    if not isinstance(document, dict):
        raise ConfigError([f"{path}: not a plan file: a JSON object is expected, not {type(document).__name__}"])
    if document.get("format") != FORMAT:
        found = document.get("format")
        said = f"format {found!r}" if "format" in document else "format: missing"
        raise ConfigError([f"{path}: {said}: this Overhaul reads plan format {FORMAT} (plan again)"])
    try:
        saved = SavedPlan.model_validate(document)
    except ValidationError as exc:
        raise ConfigError([f"{path}: {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]) from None
    for field in BINDING:
        if field not in document:
            raise ConfigError([f"{path}: {field}: missing (a plan file is bound by it; plan again)"])
    check_binding(document, path)
    if saved.created > time.time() + CLOCK_SKEW:
        made = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(saved.created))
        raise Refused(f"{path}: created: {made} is in the future (more than {CLOCK_SKEW / 60:g} min from now): "
                      "refused before any change; plan again")
    return saved


class _NotPlanJSON(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise _NotPlanJSON(f"the key {twice!r} appears twice in one object")
    return document


def _no_constant(name: str) -> Any:
    raise _NotPlanJSON(f"{name} is not a number a plan file holds")


def check_binding(document: dict[str, Any], path: Path) -> None:
    """Refuse a plan document whose fields do not match its sha256 and digests, naming the parts edited."""
    digests, whole = _binding(document)
    if whole == document["sha256"] and digests == document["digests"]:
        return
    stored = document["digests"]
    names = _part_names(document)
    edits = [f"{names(part)}: {'added' if part not in stored else 'edited'}"
             for part in digests if stored.get(part) != digests[part]]
    edits += [f"{names(part)}: removed" for part in stored if part not in digests]
    if not edits:
        edits = ["sha256: does not match the file's content"]
    shown = edits[:SHOWN] + ([f"and {len(edits) - SHOWN} more"] if len(edits) > SHOWN else [])
    raise Refused(f"{path} was changed after `overhaul plan` saved it ({'; '.join(shown)}): "
                  "refused before any change; plan again and review the new plan")


def _part_names(document: dict[str, Any]) -> Any:
    stages = document.get("stages", [])

    def name(part: str) -> str:
        if not part.startswith("stages."):
            return part
        position, _, rest = part[len("stages."):].partition(".")
        index = int(position)
        stage = stages[index] if index < len(stages) else {}
        label = f"stage {index + 1}" + (f" {stage['name']}" if stage.get("name") else "")
        if rest.startswith("hosts."):
            return f"{label}, host {rest[len('hosts.'):]}"
        return label

    return name


# -- checks of a plan file against the world now ---------------------------------------------------------------------

def check_unchanged(saved: SavedPlan, runbook_sha256: str, inventory_sha256: str, max_age_hours: float) -> None:
    """Refuse when the plan is too old, or its runbook or inventory file changed since it was made."""
    problems = []
    if saved.age_hours() > max_age_hours:
        problems.append(f"the plan is {saved.age_hours():.1f} h old (limit {max_age_hours:g} h): plan again")
    if runbook_sha256 != saved.runbook_sha256:
        problems.append(f"runbook {saved.runbook_path} changed since the plan was made")
    if inventory_sha256 != saved.inventory_sha256:
        problems.append(f"inventory {saved.inventory_path} changed since the plan was made")
    if problems:
        raise Refused("refusing to apply the plan: " + "; ".join(problems))


def check_matches(saved: SavedPlan, plan: Plan, path: Path) -> None:
    """Refuse a plan file whose stages, their hosts or its exclusions are not what its runbook and inventory
    give now (before anything is journaled; the gate then compares each host's state: see `drift`)."""
    lines = []
    names = [host.name for host in plan.inventory.hosts]
    for host in saved.excluded:
        if host not in names:
            lines.append(f"excluded: {host} is not a host of {plan.inventory.environment!r}")
    for stage, planned in zip(saved.stages, plan.stages, strict=False):
        label = f"stage {planned.index + 1} {planned.stage.name}"
        for field, mine, theirs in (("index", stage.index, planned.index), ("name", stage.name, planned.stage.name),
                                    ("step", stage.step, planned.stage.step)):
            if mine != theirs:
                lines.append(f"{label}: {field}: the plan file says {mine!r}, the runbook {theirs!r}")
        expected = [host for host in planned.hosts if host not in saved.excluded]
        if list(stage.hosts) != expected:
            lines.append(f"{label}: hosts: the plan file has {', '.join(stage.hosts) or 'none'}, "
                         f"the runbook selects {', '.join(expected) or 'none'}"
                         + (f" (excluded: {', '.join(saved.excluded)})" if saved.excluded else ""))
    for stage in saved.stages[len(plan.stages):]:
        lines.append(f"stage {stage.index + 1} {stage.name}: in the plan file, not in the runbook")
    for planned in plan.stages[len(saved.stages):]:
        lines.append(f"stage {planned.index + 1} {planned.stage.name}: in the runbook, not in the plan file")
    if lines:
        raise Refused(f"{path} does not match its runbook and inventory: {'; '.join(lines)}: "
                      "refused before any change; plan again")


def drift(saved: SavedPlan, plan: Plan, now: RunResult) -> list[str]:
    """What differs between the reviewed plan and a check of the farm now, one line per host and stage.

    Read-only steps (assertions) compare by outcome only; a changing step compares its whole finding, so
    a program stopped by hand shows even when the stage would change the host either way.
    """
    found = {(r.stage_index, r.host): r for r in now.results}
    lines = []
    if len(saved.stages) != len(plan.stages):
        return [f"the plan has {len(saved.stages)} stages, the runbook now {len(plan.stages)}"]
    for stage, planned in zip(saved.stages, plan.stages, strict=True):
        label = f"stage {stage.index + 1} {stage.name}"
        if list(stage.hosts) != planned.hosts:
            lines.append(f"{label}: hosts were {', '.join(stage.hosts) or 'none'}, now {', '.join(planned.hosts) or 'none'}")
            continue
        for host, before in stage.hosts.items():
            current = found.get((planned.index, host))
            if current is None:
                lines.append(f"{host}: {label}: not checked now")
                continue
            moved = current.outcome.value != before.outcome or (
                not planned.step.read_only and current.message != before.message)
            if moved:
                lines.append(f"{host}: {label}: planned {_said(before.outcome, before.message)!r}, "
                             f"now {_said(current.outcome.value, current.message)!r}")
    return lines


def _said(outcome: str, message: str) -> str:
    word = "would change" if outcome == Outcome.CHANGED.value else outcome
    return f"{word}: {message}"
