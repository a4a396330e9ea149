"""What each page shows, read from the journal (the same `State` the command line uses; nothing is written).

Each function returns plain data for a template; the JSON beside a page is the command line's own document
(`history --json`, `show --json`, see overhaul.documents).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from overhaul.execution import PREFLIGHT_EVENT
from overhaul.files import last_lines
from overhaul.state.records import ResultRecord, RunRecord, State

SYNTHETIC = "synthetic"
HOSTS_PER_PAGE = 100  # a run's matrix is shown this many hosts at a time
COMMANDS_PER_PAIR = 50  # the newest commands of a pair shown on its page (the rest are in its log)


def local(at: float | None) -> str:
    """A journal time as the operator's local time (the page says the zone); "-" when there is none."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at else "-"


@dataclass
class Environment:
    """One environment as the front page shows it."""

    name: str
    expected_version: str | None
    lock: dict[str, Any] | None
    last_upgrade: RunRecord | None
    backup: dict[str, Any] | None
    last_synthetic: RunRecord | None
    promotion: str
    hosts: list[dict[str, Any]] = field(default_factory=list)


def environments(state: State, hosts_dir: Path | None) -> list[Environment]:
    """Every environment the journal knows (and every inventory of `hosts_dir`), with what an operator checks
    first: the version it should run, each host's last outcome, the lock, the last upgrade and its backup,
    promotion, the last synthetic test."""
    from overhaul.history import UPGRADE, History

    names = set(state.environments())
    if hosts_dir is not None and hosts_dir.is_dir():
        from overhaul.inventory import environments as inventories

        names |= set(inventories(hosts_dir))
    shown = []
    for name in sorted(names):
        upgrades = state.whole_runs(name, UPGRADE, "succeeded")
        last = upgrades[0] if upgrades else None
        backup = last_backup(state, last) if last is not None else None
        synthetic = next(iter(state.runs_of(name, SYNTHETIC, 1)), None)
        lock = state.lock(name)
        shown.append(Environment(
            name=name, expected_version=History(state, name).expected_version(),
            lock=None if lock is None else {"holder": lock.holder, "run_id": lock.run_id, "since": local(lock.acquired),
                                            "live": lock.live},
            last_upgrade=last, backup=backup, last_synthetic=synthetic,
            promotion=promotion(state, name, hosts_dir), hosts=last_outcomes(state, name)))
    return shown


def last_backup(state: State, upgrade: RunRecord) -> dict[str, Any] | None:
    """The verified backup `upgrade` relies on (its file, size and dump time), as a rollback would read it."""
    from overhaul.errors import OverhaulError
    from overhaul.history import rollback_source, when

    try:
        backup = rollback_source(state, upgrade, None).backup
    except OverhaulError:
        return None
    return {"path": backup.path, "size": backup.size, "dumped": when(backup.taken)}


def environment_document(env: Environment) -> dict[str, Any]:
    """An environment as /environments.json gives it (its runs as `history --json` gives them)."""
    from overhaul.documents import run_document

    return {"name": env.name, "expected_version": env.expected_version, "lock": env.lock, "backup": env.backup,
            "last_upgrade": run_document(env.last_upgrade) if env.last_upgrade else None,
            "last_synthetic": run_document(env.last_synthetic) if env.last_synthetic else None,
            "promotion": env.promotion, "hosts": env.hosts}


def promotion(state: State, name: str, hosts_dir: Path | None) -> str:
    """What the environment's policy.promotion_from says now, in words ("" without such a policy)."""
    if hosts_dir is None or not (hosts_dir / f"{name}.yaml").is_file():
        return ""
    from overhaul.errors import OverhaulError
    from overhaul.history import History
    from overhaul.inventory import human_duration, load_inventory

    try:
        policy = load_inventory(name, hosts_dir, offline=True).policy
    except OverhaulError:
        return "its inventory does not load: see `overhaul inventory --env " + name + " --offline`"
    if not policy.promotion_from:
        return ""
    source = History(state, policy.promotion_from)
    version = source.expected_version()
    if version is None:
        return f"takes versions that passed on {policy.promotion_from}; none has yet"
    passes = source.passed(version)
    left = policy.soak - (time.time() - min(passes)) if passes else policy.soak
    soak = f", soak left {human_duration(left)}" if left > 0 else (", soaked" if policy.soak else "")
    return f"takes versions that passed on {policy.promotion_from}: {version} passed there{soak}"


def last_outcomes(state: State, name: str, looked: int = 50) -> list[dict[str, Any]]:
    """Each host of the environment's newest run: its last pair's outcome; and the version the newest run that read
    one (a verify, an upgrade: among the last `looked` runs) found on it."""
    runs = state.runs(name, looked)
    if not runs:
        return []
    newest = state.results(runs[0].id)
    hosts = {result.host: {"host": result.host, "outcome": result.outcome, "run_id": runs[0].id, "version": None}
             for result in newest}
    for record in runs:
        results = newest if record is runs[0] else state.results(record.id)
        versions = {r.host: str(r.facts["version"]) for r in results if r.facts.get("version")}
        if versions:
            for host, row in hosts.items():
                row["version"] = versions.get(host)
            break
    return list(hosts.values())


@dataclass
class HistoryFilter:
    """`history`'s filters, from a page's query string."""

    env: str = ""
    runbook: str = ""
    status: str = ""
    since: float | None = None
    all: bool = False

    def keeps(self, record: RunRecord) -> bool:
        return ((self.all or record.mutating) and (not self.runbook or record.runbook == self.runbook)
                and (not self.status or record.status == self.status)
                and (self.since is None or record.started >= self.since))


def history(state: State, chosen: HistoryFilter, page: int, size: int = 50) -> tuple[list[RunRecord], bool]:
    """One page of runs, newest first, and whether there is another after it."""
    wanted = (page + 1) * size + 1
    runs = [record for record in state.runs(chosen.env or None, wanted * 4 if not chosen.all else wanted)
            if chosen.keeps(record)]
    return runs[page * size:(page + 1) * size], len(runs) > (page + 1) * size


@dataclass
class RunPage:
    """A run: its header, the stage x host matrix (a page of hosts), each pair's commands and the events."""

    run: RunRecord
    stages: list[str]
    hosts: list[str]
    cells: dict[tuple[int, str], ResultRecord]
    commands: dict[tuple[int, str], list[dict[str, Any]]]
    events: list[dict[str, Any]]
    host_page: int
    host_pages: int
    preflight: dict[str, dict[str, str]] = field(default_factory=dict)  # host -> {"ssh" or stage number: "ok" or why}
    versions_from: list[str] = field(default_factory=list)  # what its package changes found (an upgrade's "from")

    @property
    def preflight_columns(self) -> list[str]:
        numbers = sorted({column for row in self.preflight.values() for column in row if column != "ssh"}, key=int)
        return ["ssh", *numbers]


def run_page(state: State, record: RunRecord, host_page: int = 0) -> RunPage:
    """The run's page; its matrix shows HOSTS_PER_PAGE hosts of the `host_page`-th page."""
    results = state.results(record.id)
    stages: dict[int, str] = {}
    every_host: dict[str, None] = {}
    for result in results:
        stages.setdefault(result.stage_index, result.stage)
        every_host.setdefault(result.host)
    names = list(every_host)
    pages = max(1, -(-len(names) // HOSTS_PER_PAGE))
    host_page = min(max(host_page, 0), pages - 1)
    hosts = names[host_page * HOSTS_PER_PAGE:(host_page + 1) * HOSTS_PER_PAGE]
    shown = set(hosts)
    commands: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for ran in state.commands(record.id, hosts):  # (the shown hosts' only)
        commands.setdefault((ran.stage_index, ran.host), []).append(
            {"at": local(ran.at), "command": ran.command, "exit_code": ran.exit_code,
             "duration_ms": round(ran.duration * 1000)})
    for key, pair in commands.items():
        commands[key] = pair[-COMMANDS_PER_PAIR:]
    events, preflight = [], {}
    for at, kind, detail in state.run_events(record.id):
        if kind == PREFLIGHT_EVENT:  # the gate's table, shown as one (its hosts of this page)
            preflight = {host: row for host, row in json.loads(detail).items() if host in shown or not hosts}
        else:
            events.append({"at": local(at), "kind": kind, "detail": detail})
    from overhaul.history import versions_found

    return RunPage(record, [stages[index] for index in sorted(stages)], hosts,
                   {(r.stage_index, r.host): r for r in results if r.host in shown}, commands, events, host_page, pages,
                   preflight, sorted(versions_found(state, record, results)))


def last_output(result: ResultRecord, lines: int = 12) -> str:
    """The end of a pair's log (its last commands and what they printed), when this controller has it."""
    if not result.output_path or not Path(result.output_path).is_file():
        return ""
    return "\n".join(last_lines(Path(result.output_path), lines))


def fingerprint(state: State, record: RunRecord) -> tuple[str, RunRecord]:
    """What changes when anything on the run's page would (its status and end, each pair's outcome and end), and
    the run as it is now."""
    run = state.run(record.id)
    pairs = state.results(record.id)
    return f"{run.status}|{run.ended}|{len(pairs)}|" + ",".join(f"{p.outcome}:{p.ended}" for p in pairs), run


__all__ = ["Environment", "HistoryFilter", "RunPage", "environment_document", "environments", "fingerprint", "history",
           "last_output", "local", "run_page"]
