"""An environment's history: what its runs did, read with indexed queries on the journal, never from a window of
recent runs (a monitor's verify every five minutes must not make an environment forget its last upgrade).

Everything that reasons over more than one run lives here: the version an environment should run, promotion
evidence, which upgrade a rollback takes back and the backup it relies on, whether a later run superseded one
that is to be undone, and which run `last` or an id prefix names. The command line asks; this module answers.
"""

from __future__ import annotations

import calendar
import re
import time
from dataclasses import dataclass, replace

from overhaul.errors import OverhaulError
from overhaul.state import RunRecord, State
from overhaul.state.records import KIND_EVENT

UPGRADE = "upgrade"  # the built-in runbooks the history knows by name
ROLLBACK = "rollback"
REBUILT = "rebuilt"  # journal event: the environment's hosts were built anew, at the version its detail says
PREVIOUS = "previous"  # the fact a package change remembers: the version it found (overhaul's package.upgrade)
BACKUP_NAME = re.compile(r"-(\d{8}T\d{6}Z)-(\d{8}T\d{6}-[0-9a-f]+)\.sql\.gz$")  # LABEL-<UTC start>-<run id>.sql.gz


@dataclass(frozen=True)
class Backup:
    """A verified database backup an upgrade relies on, as its journal says."""

    path: str
    sha256: str
    size: int
    taken: float | None  # when the dump began (its data is as of then); None: not known from its name
    taken_by: str  # the run that dumped it ("" when not known); an upgrade may rely on an earlier run's backup

    def describe(self) -> str:
        return f"{self.path} dumped {when(self.taken)}" + (f" by run {self.taken_by}" if self.taken_by else "")


@dataclass(frozen=True)
class RollbackSource:
    """What a rollback of `upgrade` goes back to: the version it found, and the backup it relies on."""

    upgrade: RunRecord
    version: str
    backup: Backup
    already: RunRecord | None = None  # a successful rollback of it since (its backup restored then: not again)

    def lost(self) -> str:
        """The exact loss, said before asking."""
        if self.already is not None:
            return (f"Already rolled back by run {self.already.id}: the backup was restored then and is not restored "
                    "again (nothing written since is lost); the rest is checked and repaired where it drifted.")
        if self.backup.taken is None:
            return (f"LOST: everything written to the database after {self.backup.path} was dumped (its dump time is "
                    "not in its name; check the file's time on the host before answering)")
        return f"LOST: everything written to the database after {when(self.backup.taken)} (the dump's start)."


def is_upgrade(state: State, record: RunRecord) -> bool:
    """Whether `record` is an upgrade: the built-in runbook, or one composed in Python that upgrades a package."""
    return record.runbook == UPGRADE or state.run_event(record.id, KIND_EVENT) == UPGRADE


def when(at: float | None) -> str:
    return "at an unknown time" if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


class History:
    """One environment's history in the journal."""

    def __init__(self, state: State, environment: str):
        self.state = state
        self.environment = environment

    def passed_upgrades(self) -> list[tuple[float, str, str]]:
        """(when it ended, version, run id) of each successful upgrade of the whole environment, newest first
        (a --limit run is no pass)."""
        return [(record.ended or record.started, str(record.params["version"]), record.id)
                for record in self.state.whole_runs(self.environment, UPGRADE, "succeeded")
                if record.params.get("version")]

    def passed(self, version: str) -> list[float]:
        """When each successful whole upgrade to `version` ended: promotion evidence."""
        return [ended for ended, passed, _ in self.passed_upgrades() if passed == version]

    def expected_version(self) -> str | None:
        """The version the environment should run: that of its newest whole successful upgrade, rollback or rebuild
        (None: not known)."""
        candidates = [(ended, version) for ended, version, _ in self.passed_upgrades()[:1]]
        rollbacks = self.state.whole_runs(self.environment, ROLLBACK, "succeeded")
        candidates += [(r.ended or r.started, str(r.params["version"])) for r in rollbacks[:1] if r.params.get("version")]
        rebuilt = self.state.last_event(self.environment, REBUILT)
        candidates += [rebuilt] if rebuilt else []
        newest = max(candidates, default=None)
        return newest[1] if newest and newest[1] != "latest" else None

    def rollback_source(self, record: RunRecord | None = None) -> RollbackSource:
        """What a rollback takes back: `record` if given, else the newest upgrade that changed a package (a no-op
        re-run changed nothing: it is never the one). A rollback repeated changes nothing (its restore is done once)."""
        rebuilt = self.state.last_event(self.environment, REBUILT)
        since = rebuilt[0] if rebuilt else 0.0  # a rebuilt farm's hosts (and backups) are new: older runs are moot
        candidates = self.state.changing_runs(self.environment, UPGRADE, PREVIOUS, 5)
        newest = next((run for run in candidates if run.started > since and versions_found(self.state, run)), None)
        if record is None:
            if newest is None:
                after = f" since it was rebuilt {when(since)}" if rebuilt else ""
                raise OverhaulError(f"no upgrade of {self.environment!r} changed a package{after} in "
                                    f"{self.state.url}: nothing to roll back")
            record = newest
        elif record.started < since:
            raise OverhaulError(f"run {record.id} is older than the rebuild of {self.environment!r} ({when(since)}): "
                                "its hosts and backups are gone; nothing to roll back")
        elif not is_upgrade(self.state, record):
            raise OverhaulError(f"run {record.id} is a {record.runbook!r} run: only an upgrade is rolled back")
        elif record.status in ("rolled back", "refused"):
            raise OverhaulError(f"run {record.id} is {record.status}: it left nothing to roll back")
        source = rollback_source(self.state, record, newest)
        done = [run for run in self.state.whole_runs(self.environment, ROLLBACK, "succeeded")
                if run.started > record.started and run.params.get("backup") == source.backup.path]
        return replace(source, already=done[0]) if done else source

    def superseded(self, record: RunRecord, hosts: set[str]) -> dict[str, list[str]]:
        """Later runs that changed any of `hosts` (those `record` changed): later run id -> the hosts, newest first.
        Undoing `record` then would take back what it found, under what they did since."""
        later: dict[str, list[str]] = {}
        for run_id, host in self.state.later_changes(self.environment, record.started, sorted(hosts), record.id):
            if host not in later.setdefault(run_id, []):
                later[run_id].append(host)
        return later


def rollback_source(state: State, record: RunRecord, newest: RunRecord | None) -> RollbackSource:
    """The version `record` found and the verified backup it relies on, from its journal."""
    from overhaul.secrets import redacted_in

    results = state.results(record.id)
    found = versions_found(state, record, results)
    if not found:
        better = f"; the last upgrade that changed one is run {newest.id} (`overhaul rollback --run {newest.id}`)" \
            if newest is not None and newest.id != record.id else ""
        raise OverhaulError(f"run {record.id} changed no package (a re-run that found every host done?): there is "
                            f"nothing to roll back to from it{better}")
    if len(found) != 1:
        raise OverhaulError(f"run {record.id} found different versions on its hosts ({', '.join(sorted(found))}): "
                            "the version to go back to is not one; roll back by hand")
    backups = [r for r in results if r.facts.get("sha256") and r.facts.get("path")]
    if not backups:
        raise OverhaulError(f"run {record.id} journaled no verified backup: it cannot be rolled back (restore by hand)")
    facts = backups[-1].facts
    cut = redacted_in([facts["path"], facts["sha256"], *found])
    if cut:
        raise OverhaulError(f"run {record.id}: its journaled backup or version holds a secret's value, redacted "
                            f"({', '.join(cut)}): it cannot be rolled back from the journal (restore by hand)")
    named = BACKUP_NAME.search(str(facts["path"]))
    taken = float(calendar.timegm(time.strptime(named.group(1), "%Y%m%dT%H%M%SZ"))) if named else None
    backup = Backup(str(facts["path"]), str(facts["sha256"]), int(facts["size"]), taken, named.group(2) if named else "")
    return RollbackSource(record, found.pop(), backup)


def versions_found(state: State, record: RunRecord, results: list | None = None) -> set[str]:
    """The versions `record`'s package changes found on its hosts (what a rollback goes back to)."""
    return {str(version) for r in (state.results(record.id) if results is None else results)
            for version in (r.facts.get(PREVIOUS), remembered(r.facts).get(PREVIOUS)) if version}


def rollback_way(state: State, environment: str, record: RunRecord | None = None) -> str | None:
    """The command that rolls back `record` (or the environment's last upgrade that changed a package), or None
    when the journal holds no such way back: never a hint that would restore some older upgrade's backup."""
    try:
        source = History(state, environment).rollback_source(record)
    except OverhaulError:
        return None
    return f"overhaul rollback --run {source.upgrade.id}"


def remembered(facts: dict) -> dict:
    """What a pair's step remembered for its undo (overhaul.runner.UNDO_FACTS), if anything."""
    from overhaul.runner import UNDO_FACTS

    kept = facts.get(UNDO_FACTS)
    return kept if isinstance(kept, dict) else {}


def find_run(state: State, run_id: str) -> RunRecord:
    """A run by its id, a unique prefix of it, or `last` (the newest run journaled)."""
    if run_id == "last":
        newest = state.runs(None, 1)
        if not newest:
            raise OverhaulError(f"no run journaled in {state.url}")
        return newest[0]
    try:
        return state.run(run_id)
    except KeyError:
        matches = state.runs_starting(run_id, 6)
        if len(matches) == 1:
            return matches[0]
        if matches:
            shown = ", ".join(r.id for r in matches[:5])
            raise OverhaulError(f"{run_id!r} matches more than one run ({shown}): give more of the id") from None
        raise OverhaulError(f"no run {run_id!r} in {state.url}") from None
