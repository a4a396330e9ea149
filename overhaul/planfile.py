"""A saved plan (`plan --out plan.json`) and the proof that `apply` runs exactly what was reviewed.

The file holds what the reviewer saw: the runbook and inventory (by SHA-256), the resolved parameters
(a concrete version, never `latest`), each host's preflight and check outcome per stage, who and when.
`apply` refuses when any of it changed since: a different runbook, inventory or parameter, a host
whose state moved (drift), or a plan older than its limit.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from overhaul import __version__
from overhaul.errors import ConfigError, Refused
from overhaul.plan import Plan
from overhaul.runner import RunResult
from overhaul.step import Outcome

FORMAT = 1
MAX_FILE_BYTES = 5 * 1024 * 1024


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PlannedHost(Strict):
    outcome: str  # ok | changed (would change)
    message: str
    preflight: str = ""


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
    params: dict[str, Any]
    excluded: dict[str, str] = {}
    limit: str = ""  # --limit the plan was made with
    stages: list[SavedStage]

    def age_hours(self) -> float:
        return (time.time() - self.created) / 3600


def saved_plan(plan: Plan, result: RunResult, operator: str, runbook_sha256: str, inventory_sha256: str) -> SavedPlan:
    """What a check-only run found, as a plan file's content."""
    assert result.preflight is not None and plan.inventory.path is not None
    stages = []
    for planned in plan.stages:
        found = {r.host: r for r in result.results if r.stage_index == planned.index}
        hosts = {}
        for host in planned.hosts:  # in the plan's order, so that apply compares like with like
            preflight = result.preflight.checks.get((planned.index, host))
            hosts[host] = PlannedHost(outcome=found[host].outcome.value, message=found[host].message,
                                      preflight=preflight.message if preflight else "")
        stages.append(SavedStage(index=planned.index, name=planned.stage.name, step=planned.stage.step, hosts=hosts))
    return SavedPlan(
        format=FORMAT, overhaul=__version__, created=time.time(), created_by=operator,
        environment=plan.inventory.environment, runbook=plan.runbook.runbook.name,
        runbook_path=str(plan.runbook.path.resolve()), runbook_sha256=runbook_sha256,
        inventory_path=str(plan.inventory.path.resolve()), inventory_sha256=inventory_sha256,
        params=plan.run_params, excluded=dict(result.preflight.excluded), limit=plan.limit, stages=stages,
    )


def write_plan(saved: SavedPlan, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(saved.model_dump_json(indent=2) + "\n")


def read_plan(path: Path) -> SavedPlan:
    """Load a plan file; every problem is a ConfigError naming the file (and the line, for bad JSON)."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError([f"{path}: {size} bytes: a plan file is at most {MAX_FILE_BYTES} bytes"])
        document = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such plan file (write one with `overhaul plan ... --out {path}`)"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text: not a plan file"]) from None
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{path}:{exc.lineno}: not JSON: {exc.msg}"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: nested too deeply: not a plan file"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        saved = SavedPlan.model_validate(document)
    except ValidationError as exc:
        raise ConfigError([f"{path}: {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]) from None
    if saved.format != FORMAT:
        raise ConfigError([f"{path}: format {saved.format}: this Overhaul reads plan format {FORMAT} (re-plan)"])
    return saved


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


def drift(saved: SavedPlan, plan: Plan, now: RunResult) -> list[str]:
    """What differs between the reviewed plan and a check of the farm now, one line per host and stage.

    Read-only steps (assertions) compare by outcome only; a changing step compares its whole finding, so
    a program stopped by hand shows even when the stage would change the host either way.
    """
    found = {(r.stage_index, r.host): r for r in now.results}
    lines = []
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
