"""The command line: invoke tasks, used both by `invoke` (through tasks.py) and the `overhaul` script.

Exit codes: 0 success, 1 the run failed on some host, 2 bad input (nothing was touched).
"""

from __future__ import annotations

import functools
import json
import sqlite3
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from invoke import Collection, Exit, Program, task

from overhaul import __version__, verification
from overhaul.errors import OverhaulError
from overhaul.execution import exit_code, file_sha256, journal_path, open_state, operator, run_plan
from overhaul.inventory import Inventory, load_inventory
from overhaul.lab import Lab
from overhaul.plan import Plan, PlannedStage, build_plan
from overhaul.runbook import Runbook, load_runbook
from overhaul.state import RunRecord, SQLiteState
from overhaul.step import Registry
from overhaul.transport import Transport

COMMON_HELP = {
    "env": "environment: loads hosts/<env>.yaml",
    "hosts_dir": "folder of inventories (default hosts)",
    "runbooks_dir": "folder of the operator's runbooks (default runbooks; built-ins are found too)",
    "steps_dir": "folder of the operator's own steps (default steps)",
    "param": "a runbook parameter, NAME=VALUE (repeatable)",
}

PATHS_HELP = {name: text for name, text in COMMON_HELP.items() if name != "param"}


def friendly(task_function: Callable) -> Callable:
    """Turn Overhaul's own errors into a clear message and exit code 2, never a traceback."""

    @functools.wraps(task_function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return task_function(*args, **kwargs)
        except OverhaulError as exc:
            raise Exit(f"error: {exc}", code=2) from None
        except sqlite3.Error as exc:
            raise Exit(f"error: the journal {journal_path()}: {exc}", code=2) from None

    return wrapper


def registry(steps_dir: str) -> Registry:
    builtin = Path(str(resources.files("overhaul.steps"))).resolve()
    local = Path(steps_dir)
    return Registry([local] if local.resolve() != builtin else [])


def parse_params(pairs: list[str]) -> dict[str, str]:
    params = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise OverhaulError(f"--param {pair!r}: expected NAME=VALUE")
        params[name] = value
    return params


def load_plan(runbook: str, env: str, hosts_dir: str, runbooks_dir: str, steps_dir: str,
              params: dict[str, Any]) -> Plan:
    """Everything that can be checked without touching a host, checked."""
    inventory = load_inventory(env, Path(hosts_dir))
    loaded = load_runbook(runbook, Path(runbooks_dir))
    return build_plan(loaded, inventory, registry(steps_dir), params)


def ask(yes: bool) -> Callable[[PlannedStage], bool]:
    def confirm(planned: PlannedStage) -> bool:
        if yes:
            return True
        if not sys.stdin.isatty():
            print(f"stage {planned.stage.name!r} needs confirmation: run with --yes", file=sys.stderr)
            return False
        answer = input(f"Run stage {planned.stage.name!r} on {', '.join(planned.hosts)}? [y/N] ")
        return answer.strip().lower() in ("y", "yes")

    return confirm


def finish(code: int) -> None:
    if code:
        raise Exit(code=code)


@task(
    positional=["runbook"], iterable=["param"],
    help={"runbook": "runbook name (runbooks/NAME.yaml or built-in) or path", "yes": "confirm every gated stage",
          **COMMON_HELP},
)
@friendly
def run(c, runbook, env, param=None, yes=False, hosts_dir="hosts", runbooks_dir="runbooks", steps_dir="steps"):
    """Run a runbook on an environment's hosts."""
    plan = load_plan(runbook, env, hosts_dir, runbooks_dir, steps_dir, parse_params(param or []))
    enforce_policy(plan, yes)
    finish(exit_code(run_plan(plan, confirm=ask(yes))))


@task(positional=["runbook"], iterable=["param"], help={"runbook": "runbook name or path", **COMMON_HELP})
@friendly
def plan(c, runbook, env, param=None, hosts_dir="hosts", runbooks_dir="runbooks", steps_dir="steps"):
    """Show what a runbook would change on each host (runs only the read-only checks)."""
    planned = load_plan(runbook, env, hosts_dir, runbooks_dir, steps_dir, parse_params(param or []))
    finish(exit_code(run_plan(planned, check_only=True)))


@task(help={"version": "package version to upgrade to (default: the newest available)",
            "yes": "do not ask: confirm a protected environment and every gated stage", **PATHS_HELP})
@friendly
def upgrade(c, env, version="latest", yes=False, hosts_dir="hosts", runbooks_dir="runbooks", steps_dir="steps"):
    """Upgrade an environment: backup, stop, upgrade, reconfigure db -> worker -> app, verify."""
    if version == "latest":
        version = newest_available(load_inventory(env, Path(hosts_dir)))
        print(f"latest available version: {version}")
    planned = load_plan("upgrade", env, hosts_dir, runbooks_dir, steps_dir, {"version": version})
    enforce_policy(planned, yes)
    finish(exit_code(run_plan(planned, confirm=ask(yes))))


def newest_available(inventory: Inventory) -> str:
    """Resolve "latest" once, on the first host, so every host gets the same, journaled version."""
    from overhaul.steps.package import newest_version, package_manager

    transport = Transport(inventory)
    try:
        host = transport.host(inventory.hosts[0].name)
        package = str(inventory.host_vars(inventory.hosts[0]).get("package", "scalr-server"))
        return newest_version(host, package_manager(host), package)
    finally:
        transport.close()


def enforce_policy(planned: Plan, yes: bool) -> None:
    """A protected environment needs --yes (or a yes at the prompt); a promoted one, a promoted version."""
    inventory = planned.inventory
    if "version" in planned.run_params:
        check_promotion(inventory, str(planned.run_params["version"]))
    if inventory.policy.protected and not yes:
        env = inventory.environment
        if not sys.stdin.isatty():
            raise OverhaulError(f"environment {env!r} is protected: run with --yes")
        if input(f"Run {planned.runbook.runbook.name!r} on protected environment {env!r}? [y/N] ").strip().lower() \
                not in ("y", "yes"):
            raise Exit("not confirmed: nothing was changed", code=1)


def check_promotion(inventory: Inventory, version: str) -> None:
    """policy.promotion_from: the version must have been upgraded to, successfully, on that environment first."""
    source = inventory.policy.promotion_from
    if not source:
        return
    if version == "latest":
        raise OverhaulError(f"{inventory.environment!r} takes only versions promoted from {source!r}: give --version")
    if version not in upgraded_versions(source):
        raise OverhaulError(
            f"version {version} has not passed on {source!r} yet ({inventory.environment!r} has policy.promotion_from: "
            f"{source}): upgrade {source} to {version} first"
        )


def upgraded_versions(env: str) -> list[str]:
    """The versions successful upgrades of `env` went to, newest first (from the journal)."""
    return [str(record.params["version"]) for record in open_state().runs(env, limit=1000)
            if record.runbook == "upgrade" and record.status == "succeeded" and record.params.get("version")]


@task(help={"checks": "folder of testinfra checks (default: the inventory's `checks`, else checks/ if present)",
            "junit": "write a JUnit XML report here", "json": "write a JSON report here",
            "concurrency": "hosts checked at once (default 8)", **PATHS_HELP})
@friendly
def verify(c, env, checks="", junit="", json="", concurrency=8, hosts_dir="hosts", runbooks_dir="runbooks",
           steps_dir="steps"):
    """Check an environment: supervisor up, every service RUNNING, disks below 80 %, plus your testinfra checks."""
    planned = load_plan("verify", env, hosts_dir, runbooks_dir, steps_dir, {})
    result = run_plan(planned, mutating=False, show_summary=False)  # one summary below, checks included
    cases = verification.runbook_cases(result)
    folder = Path(checks or planned.inventory.checks or "checks")
    if folder.is_dir():
        hosts = [host.name for host in planned.inventory.hosts]
        cases += verification.run_checks(env, hosts_dir, folder, hosts, int(concurrency),
                                         {"expected_version": expected_version(env)})
    elif checks or planned.inventory.checks:
        raise OverhaulError(f"checks folder {folder} does not exist")
    verification.print_summary(cases)
    if junit:
        verification.write_junit(cases, Path(junit), env)
    if json:
        verification.write_json(cases, Path(json), env)
    failed = any(case.status == "failed" for case in cases)
    finish(exit_code(result) or (1 if failed else 0))


def expected_version(env: str) -> str | None:
    """The version of the newest successful upgrade of `env` in the journal (None when unknown)."""
    versions = upgraded_versions(env)
    return versions[0] if versions and versions[0] != "latest" else None


@task(iterable=["param"], help={
    "run": "the run to resume (default: the newest unfinished run of --env)",
    "version": "must equal the run's version if given", "yes": "confirm gated stages",
    **{k: v for k, v in COMMON_HELP.items() if k != "runbooks_dir"}})
@friendly
def resume(c, env="", run="", version="", param=None, yes=False, hosts_dir="hosts", steps_dir="steps"):
    """Continue an interrupted run: finished work is skipped once its check confirms it still holds."""
    state = open_state()
    if run:
        record = journaled_run(state, run)
    else:
        if not env:
            raise OverhaulError("give --env (resume its newest unfinished run) or --run ID")
        unfinished = state.unfinished(env)
        if not unfinished:
            raise OverhaulError(f"no unfinished run of {env!r} in {journal_path()}")
        record = unfinished[0]
    if env and record.environment != env:
        raise OverhaulError(f"run {record.id} is of environment {record.environment!r}, not {env!r}")
    if record.status in ("succeeded", "abandoned"):
        raise OverhaulError(f"run {record.id} is {record.status}: there is nothing to resume")
    given = parse_params(param or []) | ({"version": version} if version else {})
    for name, value in given.items():
        if str(record.params.get(name)) != value:
            raise OverhaulError(f"run {record.id} was started with {name}={record.params.get(name)!r}; "
                                f"a resumed run keeps its parameters (got {value!r})")
    path = Path(record.runbook_path)
    if not path.exists() or file_sha256(path) != record.runbook_sha256:
        raise OverhaulError(f"runbook {path} changed (or is gone) since run {record.id} started: refusing to resume")
    inventory = load_inventory(record.environment, Path(hosts_dir))
    planned = build_plan(load_runbook(str(path)), inventory, registry(steps_dir), record.params)
    finish(exit_code(run_plan(planned, resume=record, confirm=ask(yes), state=state)))


def journaled_run(state: SQLiteState, run_id: str) -> RunRecord:
    try:
        return state.run(run_id)
    except KeyError:
        raise OverhaulError(f"no run {run_id!r} in {journal_path()}") from None


@task(help={"run": "the run to abandon"})
@friendly
def abandon(c, run):
    """Mark an unfinished run abandoned, so a new upgrade may start (the journal keeps it)."""
    state = open_state()
    record = journaled_run(state, run)
    if record.status not in ("running", "interrupted", "failed"):
        raise OverhaulError(f"run {run} is {record.status}: only an unfinished or failed run can be abandoned")
    lock = state.lock(record.environment)
    if lock is not None and lock.run_id == run and record.status == "running":
        raise OverhaulError(f"run {run} still holds the lock of {record.environment!r} ({lock.holder}, pid {lock.pid})")
    state.set_status(run, "abandoned", time.time())
    state.event(record.environment, "abandon", f"{operator()} abandoned the run", run)
    print(f"run {run} abandoned")


@task(help={"env": COMMON_HELP["env"], "force": "remove the lock even though its holder may be alive"})
@friendly
def unlock(c, env, force=False):
    """Remove an environment's lock (with --force); the removal is journaled."""
    state = open_state()
    lock = state.lock(env)
    if lock is None:
        print(f"{env}: not locked")
        return
    if not force:
        raise OverhaulError(f"{env} is locked by {lock.holder} (pid {lock.pid}, run {lock.run_id}): "
                            "add --force to remove the lock")
    state.force_unlock(env, operator())
    print(f"{env}: lock of {lock.holder} (run {lock.run_id}) removed; journaled")


@task(help={"env": "only this environment", "limit": "how many runs (default 20)"})
@friendly
def history(c, env="", limit=20):
    """Runs, newest first: id, runbook, environment, status, duration, who."""
    runs = open_state().runs(env or None, int(limit))
    if not runs:
        print("no runs journaled")
        return
    print(f"{'RUN':<24} {'RUNBOOK':<10} {'ENV':<12} {'STATUS':<12} {'STARTED':<20} {'TIME':>7}  WHO")
    for record in runs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.started))
        print(f"{record.id:<24} {record.runbook:<10} {record.environment:<12} {record.status:<12} {started:<20} "
              f"{record.duration:>6.0f}s  {record.operator}")


@task(positional=["run"], help={"run": "the run id (see history)"})
@friendly
def show(c, run):
    """One run: stages x hosts with outcome, attempts, message, facts (e.g. the backup) and output files."""
    state = open_state()
    record = journaled_run(state, run)
    print(f"run {record.id}: {record.runbook} on {record.environment}, {record.status}, by {record.operator}, "
          f"params {json.dumps(record.params, sort_keys=True)}")
    for result in state.results(run):
        print(f"  [{result.stage_index + 1}] {result.stage:<22} {result.host:<12} {result.outcome:<8} "
              f"x{result.attempts} {result.message}")
        if result.facts:
            print(f"      facts: {json.dumps(result.facts, sort_keys=True)}")
        if result.output_path:
            print(f"      output: {result.output_path}")
    for at, run_id, kind, detail in state.events(record.environment):
        if run_id == run:
            print(f"  event {time.strftime('%H:%M:%S', time.localtime(at))} {kind}: {detail}")


@task(help={"env": COMMON_HELP["env"], "hosts_dir": COMMON_HELP["hosts_dir"]})
@friendly
def synthetic(c, env, hosts_dir="hosts"):
    """Launch a small farm, prove it comes up and works, tear it down; exit code names a failed phase."""
    from overhaul.synthetic.run import SyntheticRun, workdir_default

    finish(SyntheticRun(load_inventory(env, Path(hosts_dir)), open_state(), workdir_default()).run())


@task(help={"env": COMMON_HELP["env"], "hosts_dir": COMMON_HELP["hosts_dir"]})
@friendly
def inventory(c, env, hosts_dir="hosts"):
    """Show an environment's resolved hosts (roles, address, user, variables)."""
    loaded = load_inventory(env, Path(hosts_dir))
    print(f"environment {loaded.environment} ({len(loaded.hosts)} hosts)"
          f"{', protected' if loaded.policy.protected else ''}")
    for host in loaded.hosts:
        user = host.user or loaded.ssh.user
        port = host.port or loaded.ssh.port
        print(f"  {host.name:<14} {','.join(host.roles):<12} {user}@{host.address}:{port}  "
              f"vars={json.dumps(loaded.host_vars(host), sort_keys=True)}")


@task(help={"out": "folder to write inventory.schema.json and runbook.schema.json into (default: print)"})
def schema(c, out=""):
    """Publish the JSON Schema of inventory and runbook files (for editor completion)."""
    schemas = {"inventory": Inventory.model_json_schema(), "runbook": Runbook.model_json_schema()}
    if not out:
        print(json.dumps(schemas, indent=2))
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    for name, document in schemas.items():
        (Path(out) / f"{name}.schema.json").write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {Path(out) / f'{name}.schema.json'}")


LAB_HELP = {
    "home": "where the lab keeps its state (default .overhaul/lab)",
    "inventory": "the inventory file to write (default hosts/lab.yaml)",
}


def _lab(home: str, inventory: str) -> Lab:
    return Lab(home=home, inventory=inventory)


@task(help={"hosts": "number of hosts: one db, one worker, the rest app (default 4)", **LAB_HELP})
def up(c, hosts=4, home=".overhaul/lab", inventory="hosts/lab.yaml"):
    """Start the lab (or repair a half-started one): real hosts with scalr-server 1.0.0."""
    lab = _lab(home, inventory)
    lab.up(int(hosts))
    _print_status(lab)


@task(help=LAB_HELP)
def down(c, home=".overhaul/lab", inventory="hosts/lab.yaml"):
    """Stop every lab host and remove the lab's hosts and inventory."""
    _lab(home, inventory).down()
    print("lab: down")


@task(help=LAB_HELP)
def status(c, home=".overhaul/lab", inventory="hosts/lab.yaml"):
    """Show each lab host: role, address, whether it runs and whether sshd answers."""
    _print_status(_lab(home, inventory))


def _print_status(lab: Lab) -> None:
    rows = lab.status()
    if not rows:
        print("lab: no hosts (run `overhaul lab.up`)")
        return
    print(f"{'HOST':<10} {'ROLE':<7} {'ADDRESS':<15} {'RUNNING':<8} SSHD")
    for row in rows:
        print(f"{row.name:<10} {row.role:<7} {row.address:<15} {'yes' if row.running else 'no':<8} "
              f"{'answers' if row.sshd else 'down'}")
    first = rows[0]
    print(f"log in: ssh -i {lab.key_file} -o UserKnownHostsFile={lab.known_hosts} root@{first.address}")


lab = Collection("lab", up, down, status)
namespace = Collection(upgrade, verify, synthetic, resume, abandon, unlock, history, show, run, plan, inventory, schema, lab)

program = Program(namespace=namespace, name="overhaul", version=__version__)
