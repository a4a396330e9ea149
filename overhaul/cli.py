"""The command line: invoke tasks, used both by `invoke` (through tasks.py) and the `overhaul` script.

Exit codes are a contract (see EXIT_CODES): 0 success, 1 a host failed during the run, 2 bad input
or usage (nothing touched), 3 refused before any change, 130 interrupted (resumable).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from json import dumps, loads
from pathlib import Path
from typing import TYPE_CHECKING, Any

from invoke import Collection, Exit, ParseError, Program, Task, task

from overhaul import __version__
from overhaul.errors import (
    INTERNAL_EXIT,
    INTERRUPTED_EXIT,
    USAGE_EXIT,
    ConfigError,
    OverhaulError,
    Refused,
)

# Each command imports what it needs when it runs: `overhaul --help` (and the shell completion, which runs
# `overhaul --complete` at each Tab) loads no SSH, model or database library.
if TYPE_CHECKING:
    from overhaul.inventory import Inventory
    from overhaul.lab import Lab
    from overhaul.plan import Plan, PlannedStage
    from overhaul.report import ConsoleView
    from overhaul.runner import RunResult
    from overhaul.state import RunRecord, State
    from overhaul.step import Registry

CHECK = "check"  # journal event: one testinfra check's result on one host, in a verify run
EXIT_CODES = """\
Exit codes:
  0    success
  1    a host failed during the run
  2    bad input or usage (unknown flag, bad file, bad value): nothing was touched
  3    refused before any change (preflight, drift, policy, lock held, not confirmed)
  4    the journal (state backend) cannot be used: unreachable, or a schema to migrate
  70   internal error: a bug in Overhaul (one line here, the traceback in .overhaul/crashes/)
  130  interrupted (resumable with `overhaul resume`)"""

COMMON_HELP = {
    "env": "environment: loads hosts/<env>.yaml (default: OVERHAUL_ENV, else default_env in overhaul.yaml)",
    "hosts_dir": "folder of inventories (default: the project's hosts/)",
    "runbooks_dir": "folder of the operator's runbooks (default: the project's runbooks/; built-ins are found too)",
    "steps_dir": "folder of the operator's own steps (default: the project's steps/)",
    "param": "a runbook parameter, NAME=VALUE (repeatable)",
    "yes": "do not ask: confirm a protected environment (after its plan is shown) and every gated stage",
    "skip_unreachable": "leave unreachable hosts out of the whole run instead of refusing it",
    "limit": "only these hosts: names, globs (app*) and roles (role:app), comma-separated",
    "verbose": "also show each command and its exit code as it completes",
    "quiet": "show only failures and the summary",
    "check": "show the plan instead (as `overhaul plan`): every preflight and what would change; nothing is changed",
    "dry_run": "the same as --check",
}
PLAN_HELP = {name: COMMON_HELP[name] for name in ("check", "dry_run")}
VIEW_HELP = {name: COMMON_HELP[name] for name in ("verbose", "quiet")}
VERSION_HELP = "the package version, for runbooks that take one (short for -p version=VERSION)"

PATHS_HELP = {name: COMMON_HELP[name] for name in ("env", "hosts_dir", "runbooks_dir", "steps_dir")}
# The same letter means the same thing in every task.
SHORT_FLAGS = {"env": "e", "param": "p", "yes": "y", "verbose": "v", "quiet": "q"}


class OverhaulTask(Task):
    """Long flags only, but for the few short ones of SHORT_FLAGS (so no task flag ever takes -h)."""

    def get_arguments(self, ignore_unknown_help: bool | None = None) -> list[Any]:
        kept = dict(self.help)  # invoke pops each help text as it is used: a second parse would show none
        try:
            return super().get_arguments(ignore_unknown_help)
        finally:
            self.help = kept

    def arg_opts(self, name: str, default: str, taken_names: set[str]) -> dict[str, Any]:
        opts = super().arg_opts(name, default, taken_names)
        if name in SHORT_FLAGS:
            opts["names"].append(SHORT_FLAGS[name])
        return opts


def command(*, positional: tuple[str, ...] = (), iterable: tuple[str, ...] = (),
            help: dict[str, str] | None = None, name: str | None = None) -> Callable[[Callable], Task]:
    """An Overhaul task: no positional argument unless named, explicit short flags, errors as exit codes."""

    def wrap(function: Callable) -> Task:
        return task(klass=OverhaulTask, positional=list(positional), iterable=list(iterable), auto_shortflags=False,
                    help=dict(help or {}), name=name)(friendly(function))

    return wrap


# A folder flag left out means the project's own folder of that name (found from any folder inside the project).
PROJECT_FOLDERS = {"hosts_dir": "hosts", "runbooks_dir": "runbooks", "steps_dir": "steps"}


def friendly(task_function: Callable) -> Callable:
    """Overhaul's own errors as a clear message and their exit code, never a traceback."""

    @functools.wraps(task_function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            if not help_wanted(kwargs):
                project_folders(kwargs)
            return task_function(*args, **kwargs)
        except OverhaulError as exc:  # each error class carries its exit code (overhaul.errors)
            raise Exit(f"{exc.label}: {exc}", code=exc.exit_code) from None
        except KeyboardInterrupt:
            raise Exit("interrupted", code=INTERRUPTED_EXIT) from None
        except BrokenPipeError:  # `overhaul history | head`: the reader is gone, and so is what is left to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise Exit(code=1) from None
        except (Exit, ParseError):
            raise
        except Exception as exc:  # a bug: one line, the traceback in a log, its own exit code (never 1: a host)
            raise Exit(f"error: internal error (a bug in Overhaul, please report it): {type(exc).__name__}: {exc}; "
                       f"the traceback is in {crash_log(exc)}", code=INTERNAL_EXIT) from None

    return wrapper


def project_folders(kwargs: dict[str, Any]) -> None:
    """Each folder flag left out, as the project's folder of that name. Outside a project, the optional runbooks/ and
    steps/ are looked for where the command runs, and hosts/ stays unknown (see `hosts_folder`)."""
    from overhaul.settings import find_project_root, project_folder

    root = find_project_root()
    for flag, name in PROJECT_FOLDERS.items():
        if kwargs.get(flag) == "":
            kwargs[flag] = str(root / name) if root is not None else "" if flag == "hosts_dir" else str(project_folder(name))


def hosts_folder(hosts_dir: str) -> Path:
    """`--hosts-dir`, else the project's hosts/; outside a project, an error naming where it looked."""
    from overhaul.settings import project_root

    return Path(hosts_dir) if hosts_dir else project_root() / "hosts"


def help_wanted(kwargs: dict[str, Any]) -> bool:
    """`overhaul plan --help`: invoke gives the `--help` to the positional value (the task then shows its help)."""
    return any(value in ("-h", "--help") for value in kwargs.values() if isinstance(value, str))


def crash_log(exc: BaseException) -> Path:
    """Write `exc`'s traceback to a log of the operator's only (beside the runs' logs); return its path."""
    import traceback

    from overhaul.files import private_dir, write_private
    from overhaul.settings import NoProject, outputs_dir

    try:
        folder = outputs_dir().parent / "crashes"
    except NoProject:  # outside any project: the operator's own cache
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "overhaul" / "crashes"
    with contextlib.suppress(OSError):
        private_dir(folder)
    path = folder / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
    try:
        write_private(path, f"overhaul {__version__}: {' '.join(argv_shape(sys.argv[1:]))}\n"
                      + "".join(traceback.format_exception(exc)))
    except OSError as error:
        return Path(f"(nowhere: {error})")
    return path


def argv_shape(argv: list[str]) -> list[str]:
    """The command line with every value left out (a --param may hold a secret): the task and the flags' names."""
    shape, task_seen = [], False
    for word in argv:
        if word.startswith("-"):
            shape.append(word.split("=", 1)[0] + ("=<value>" if "=" in word else ""))
        elif not task_seen:
            shape.append(word)
            task_seen = True
        else:
            shape.append("<value>")
    return shape


def open_state(*, migrate: bool = False) -> State:
    """The configured journal (see overhaul.settings)."""
    from overhaul import settings

    return settings.open_state(migrate=migrate)


def need(value: str, flag: str) -> str:
    if not value or not value.strip():
        raise OverhaulError(f"{flag} is required")
    return value


def environment(env: str) -> str:
    """`--env`, else the project's default environment (saying which and from where, on stderr)."""
    if env and env.strip():
        return env
    from overhaul.settings import default_environment

    found = default_environment()
    if found is None:
        raise OverhaulError("--env is required: no default environment is set (set one with `default_env: NAME` "
                            "in overhaul.yaml, or OVERHAUL_ENV=NAME)")
    name, where = found
    print(f"environment: {name} (from {where}; --env chooses another)", file=sys.stderr)
    return name


def with_version(pairs: list[str] | None, version: str) -> dict[str, str]:
    """`-p NAME=VALUE...` and `--version` (short for `-p version=VERSION`), which must agree if both are given."""
    params = parse_params(pairs or [])
    if version:
        if params.get("version", version) != version:
            raise OverhaulError(f"--version {version} and -p version={params['version']}: give one")
        params["version"] = version
    return params


def parse_params(pairs: list[str]) -> dict[str, str]:
    params = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise OverhaulError(f"--param {pair!r}: expected NAME=VALUE")
        params[name] = value
    return params


def load_plan(runbook: str, env: str, hosts_dir: str, runbooks_dir: str, steps_dir: str,
              params: dict[str, Any], flags: dict[str, str] | None = None, limit: str = "",
              if_declared: dict[str, Any] | None = None) -> Plan:
    """Everything that can be checked without touching a host, checked; then `latest` resolved, once.

    `if_declared`: more parameters, each given only when the runbook declares it and the value is known."""
    from overhaul import api
    from overhaul.runbook import load_runbook

    env = environment(env)
    loaded = load_runbook(runbook, Path(runbooks_dir))
    params = {**params, **{name: value for name, value in (if_declared or {}).items()
                           if value is not None and name in loaded.runbook.params}}
    planned = api.plan(loaded, env, params=params, limit=limit, hosts_dir=hosts_folder(hosts_dir), runbooks_dir=runbooks_dir,
                       steps_dir=steps_dir, flags=flags)
    if params.get("version") == "latest":
        print(f"latest available version: {planned.run_params['version']}")
    return planned


def answered_yes(question: str, without_terminal: str) -> bool:
    """Ask on the terminal; with no terminal to ask on, say `without_terminal` and take it as a no."""
    if not sys.stdin.isatty():
        print(without_terminal, file=sys.stderr)
        return False
    try:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:  # Ctrl-D: no answer is a no
        print(file=sys.stderr)
        return False


def ask(yes: bool) -> Callable[[PlannedStage], bool]:
    def confirm(planned: PlannedStage) -> bool:
        return yes or answered_yes(f"Run stage {planned.stage.name!r} on {', '.join(planned.hosts)}?",
                                   f"stage {planned.stage.name!r} needs confirmation: run with --yes")

    return confirm


def describe_policy(inventory: Inventory) -> str:
    from overhaul.inventory import human_duration

    policy = inventory.policy
    said = ["protected (shows the plan and asks, or --yes)" if policy.protected else "not protected"]
    if policy.promotion_from:
        soak = f", {human_duration(policy.soak)} ago or more (soak)" if policy.soak else ""
        said.append(f"takes only versions that passed on {policy.promotion_from}{soak}")
    return "; ".join(said)


def approval(planned: Plan, yes: bool, always: bool = False) -> Callable[[RunResult, list[PlannedStage]], bool] | None:
    """A protected environment (or `always`): show what the run would change, then ask (no terminal: refuse)."""
    inventory = planned.inventory
    protected = inventory.policy.protected
    if not (protected or always) or yes:
        return None

    def approve(preview: RunResult, stages: list[PlannedStage]) -> bool:
        from overhaul.report import describe_changes

        env = inventory.environment
        print(f"{env}: {describe_policy(inventory)}; known_hosts {inventory.ssh.known_hosts}")
        print(describe_changes(preview, stages))
        name = planned.runbook.runbook.name
        if protected:
            return answered_yes(f"Run {name!r} on protected environment {env!r}?",
                                f"environment {env!r} is protected: review the above, then run with --yes")
        return answered_yes(f"Run {name!r} on {env!r}?", f"{name} asks first, on every environment: review the "
                            "above, then run with --yes")

    return approve


@contextmanager
def console(view: int, check_only: bool = False, show_summary: bool = True) -> Iterator[ConsoleView]:
    """The run's view on this terminal (progress, warnings, the way on), stopped however the run ends."""
    from overhaul.report import ConsoleView

    with ConsoleView(check_only=check_only, verbosity=view, show_summary=show_summary) as seen:
        yield seen


def help_asked(value: str, task_name: str) -> bool:
    """invoke's parser gives a `--help` that follows a task to its missing positional argument: show the help."""
    if value not in ("-h", "--help"):
        return False
    OverhaulProgram(namespace=namespace, name="overhaul", binary="overhaul", version=__version__).run(
        ["overhaul", "--help", task_name], exit=False)
    return True


def finish(code: int) -> None:
    if code:
        raise Exit(code=code)


def dry(c: Any, check: bool = False, dry_run: bool = False) -> bool:
    """`--check`, `--dry-run` or `invoke --dry TASK` (invoke's flag for "echo commands instead of running"): all three
    mean `plan`."""
    invoke_dry = bool(getattr(getattr(c, "config", None), "run", {}).get("dry", False)) if c is not None else False
    flag = "--check" if check else "--dry-run" if dry_run else "--dry" if invoke_dry else ""
    if flag:
        print(f"{flag}: showing the plan (as `overhaul plan` does); nothing is changed")
    return bool(flag)


def verbosity(verbose: bool, quiet: bool) -> int:
    if verbose and quiet:
        raise OverhaulError("--verbose and --quiet together: choose one")
    return 1 if verbose else -1 if quiet else 0


def execute(planned: Plan, yes: bool, skip_unreachable: bool, reviewed: Any = None, view: int = 0,
            always_ask: bool = False) -> None:
    """The one way a mutating run starts: policy, then the gate (preflight, drift, yes), then the run.

    `always_ask`: show what the run would change and ask, protected environment or not (the way back)."""
    from overhaul import api

    env = planned.inventory.environment
    state = open_state()
    left = state.resumable(env)
    if left is not None and left.status in ("failed", "partial"):  # (an unfinished one refuses the run, naming it)
        from overhaul.history import rollback_way

        back = rollback_way(state, env, left)
        print(f"note: the last run of {env!r}, {left.id} ({left.runbook}), is {left.status}: what it changed is still "
              f"in place (a preflight may refuse on it). Its ways on: `overhaul resume --run {left.id}` after a repair, "
              f"`overhaul undo --run {left.id}`" + (f", or `{back}`" if back else ""), file=sys.stderr)
    with console(view) as seen:
        result = api.run(planned, yes=yes, approve=approval(planned, yes, always_ask), confirm=ask(yes),
                         skip_unreachable=skip_unreachable, reviewed=reviewed, subscribers=[seen], state=state)
    finish(result.exit_code)


@command(positional=("runbook",), iterable=("param",), help={
    "runbook": "runbook name (runbooks/NAME.yaml or built-in) or path", **COMMON_HELP})
def run(c, runbook, env="", param=None, yes=False, skip_unreachable=False, limit="", verbose=False, quiet=False,
        hosts_dir="", runbooks_dir="", steps_dir="", check=False, dry_run=False):
    """Run a runbook on an environment's hosts, after every preflight passed on every host."""
    if help_asked(runbook, "run"):
        return
    view = verbosity(verbose, quiet)
    planned = load_plan(runbook, env, hosts_dir, runbooks_dir, steps_dir, parse_params(param or []), limit=limit)
    if dry(c, check, dry_run):
        return show_plan(planned, skip_unreachable, view=view)
    execute(planned, yes, skip_unreachable, view=view)


@command(positional=("runbook",), iterable=("param",), help={
    "runbook": "runbook name or path", "out": "save the plan to this JSON file, for `overhaul apply`",
    "version": VERSION_HELP, **{k: v for k, v in COMMON_HELP.items() if k not in ("yes", "check", "dry_run")}})
def plan(c, runbook, env="", param=None, version="", out="", skip_unreachable=False, limit="", verbose=False,
         quiet=False, hosts_dir="", runbooks_dir="", steps_dir=""):
    """Show what a runbook would change on each host: every preflight, then the read-only checks."""
    if help_asked(runbook, "plan"):
        return
    if out:  # a folder or an unwritable path: exit 2 now, before the plan runs (and before any host is contacted)
        from overhaul.planfile import writable

        writable(out)
    planned = load_plan(runbook, env, hosts_dir, runbooks_dir, steps_dir, with_version(param, version), limit=limit)
    show_plan(planned, skip_unreachable, out, verbosity(verbose, quiet))


def show_plan(planned: Plan, skip_unreachable: bool, out: str = "", view: int = 0) -> None:
    from overhaul import api
    from overhaul.execution import exit_code, file_sha256, operator
    from overhaul.planfile import by_reference, saved_plan, write_plan

    # A parameter equal to an inventory secret is saved by the secret's name, and redacted from the plan's output.
    params = by_reference(planned.run_params, planned.inventory, planned.redactor) if out else None
    with console(view, check_only=True) as seen:
        result = api.preview(planned, skip_unreachable=skip_unreachable, subscribers=[seen])
    if out and not result.refused and not result.interrupted:
        assert planned.inventory.path is not None
        saved = saved_plan(planned, result, operator(), file_sha256(planned.runbook.path),
                           file_sha256(planned.inventory.path), params)
        write_plan(saved, Path(out))
        print(f"plan saved to {out}: apply exactly this with `overhaul apply {out}`")
    finish(exit_code(result))


@command(positional=("plan_file",), help={
    "plan_file": "a plan saved by `overhaul plan ... --out FILE`",
    "max_age": "refuse a plan older than this many hours (default 24)",
    "yes": COMMON_HELP["yes"], "hosts_dir": COMMON_HELP["hosts_dir"], "steps_dir": COMMON_HELP["steps_dir"], **VIEW_HELP})
def apply(c, plan_file, yes=False, max_age=24.0, verbose=False, quiet=False, hosts_dir="", steps_dir=""):
    """Run exactly a reviewed plan: refused if its runbook, inventory, parameters or any host's state changed."""
    if help_asked(plan_file, "apply"):
        return
    if dry(c):
        raise OverhaulError("--dry with apply: the plan file is the dry run; nothing was changed")
    apply_saved(Path(plan_file), yes, float(max_age), hosts_dir, steps_dir, verbosity(verbose, quiet))


def apply_saved(path: Path, yes: bool, max_age: float, hosts_dir: str, steps_dir: str, view: int = 0) -> None:
    from overhaul import api
    from overhaul.execution import file_sha256
    from overhaul.inventory import inventory_path, load_inventory
    from overhaul.plan import build_plan
    from overhaul.planfile import check_matches, check_unchanged, read_plan, resolve_params
    from overhaul.runbook import load_runbook

    # Every check of the file itself before anything is journaled: its binding (no field edited), its date, its
    # runbook and inventory unchanged, its stages and exclusions what they give now. Then the gate: each host's state.
    saved = read_plan(path)
    runbook_file = Path(saved.runbook_path)
    if not runbook_file.is_file():
        raise Refused(f"the plan's runbook {runbook_file} is gone: plan again")
    hosts = Path(hosts_dir) if hosts_dir else Path(saved.inventory_path).parent  # (the plan says where it was made)
    inventory_file = inventory_path(saved.environment, hosts)
    check_unchanged(saved, file_sha256(runbook_file), file_sha256(inventory_file), max_age)
    inventory = load_inventory(saved.environment, hosts)
    params, secret_values = resolve_params(saved, inventory)
    planned = build_plan(load_runbook(str(runbook_file)), inventory, api.registry(steps_dir), params, limit=saved.limit)
    check_matches(saved, planned, path)
    for value in secret_values:  # a parameter given a secret's value is never shown
        planned.redactor.add(value)
    print(f"applying {path}: {saved.runbook} on {saved.environment}, made by {saved.created_by} "
          f"{saved.age_hours():.1f} h ago, params {saved.shown_params()}")
    execute(planned, yes, bool(saved.excluded), reviewed=saved, view=view)


@command(iterable=("param",), help={
    "version": "package version to upgrade to (default: the newest available; short for -p version=VERSION)",
    "plan": "apply this saved plan (from `overhaul plan upgrade ... --out FILE`) instead",
    "param": "a parameter of your upgrade runbook, NAME=VALUE (repeatable)",
    "yes": COMMON_HELP["yes"], "skip_unreachable": COMMON_HELP["skip_unreachable"],
    "limit": COMMON_HELP["limit"], **VIEW_HELP, **PATHS_HELP, **PLAN_HELP})
def upgrade(c, env="", version="", param=None, yes=False, plan="", skip_unreachable=False, limit="", verbose=False,
            quiet=False, hosts_dir="", runbooks_dir="", steps_dir="", check=False, dry_run=False):
    """Upgrade an environment: backup, stop, upgrade, reconfigure db -> worker -> app, verify."""
    if plan:
        if dry(c, check, dry_run):
            raise OverhaulError("--dry with --plan: the plan file is the dry run; nothing was changed")
        return apply_saved(Path(plan), yes, 24.0, hosts_dir, steps_dir, verbosity(verbose, quiet))
    params = {"version": "latest", **with_version(param, version)}
    planned = load_plan("upgrade", env, hosts_dir, runbooks_dir, steps_dir, params,
                        flags={"version": "--version"}, limit=limit)
    if dry(c, check, dry_run):
        return show_plan(planned, skip_unreachable, view=verbosity(verbose, quiet))
    execute(planned, yes, skip_unreachable, view=verbosity(verbose, quiet))


@command(help={"run": "the upgrade run to undo (default: the newest upgrade of --env that got past its backup)",
               "yes": COMMON_HELP["yes"], **VIEW_HELP, **PATHS_HELP, **PLAN_HELP})
def rollback(c, env="", run="", yes=False, verbose=False, quiet=False, hosts_dir="", runbooks_dir="",
             steps_dir="", check=False, dry_run=False):
    """Return the farm to the version it had before an upgrade, its data as of that upgrade's verified backup.

    Destroys data on purpose: whatever was written to the database after the backup is lost (said before asking).
    """
    from overhaul.history import ROLLBACK, History

    state = open_state()
    record = journaled_run(state, run) if run else None
    chosen = record.environment if record is not None else environment(env)
    if env and chosen != env:
        raise OverhaulError(f"run {record.id} is of environment {chosen!r}, not {env!r}")
    source = History(state, chosen).rollback_source(record)
    backup = source.backup
    params = {"version": source.version, "backup": backup.path, "backup_sha256": backup.sha256,
              "backup_size": str(backup.size)}
    planned = load_plan(ROLLBACK, chosen, hosts_dir, runbooks_dir, steps_dir, params)
    upgrade = source.upgrade
    restored = "the database as restored then from" if source.already else "the database restored from"
    print(f"rollback of run {upgrade.id} ({upgrade.runbook} to {upgrade.params.get('version')}): back to "
          f"{source.version}, {restored} {backup.describe()}.\n{source.lost()}")
    if dry(c, check, dry_run):
        return show_plan(planned, False, view=verbosity(verbose, quiet))
    execute(planned, yes, False, view=verbosity(verbose, quiet), always_ask=True)


@command(help={"checks": "folder of testinfra checks (default: the inventory's `checks`, else the project's checks/ "
                         "if present)",
               "junit": "write a JUnit XML report here (- for stdout)", "json": "write a JSON report here (- for stdout)",
               "no_checks": "only the built-in verify runbook, not the testinfra checks",
               "checks_only": "only the testinfra checks, not the built-in verify runbook",
               "limit": COMMON_HELP["limit"], **VIEW_HELP, **PATHS_HELP})
def verify(c, env="", checks="", junit="", json="", no_checks=False, checks_only=False, limit="",
           verbose=False, quiet=False, hosts_dir="", runbooks_dir="", steps_dir=""):
    """Check an environment: supervisor up, every service RUNNING, disks below 80 %, plus your testinfra checks."""
    from overhaul import verification
    from overhaul.api import expected_version
    from overhaul.execution import Execution, exit_code
    from overhaul.report import print_checks
    from overhaul.transport import Transport

    if no_checks and checks_only:
        raise OverhaulError("--no-checks and --checks-only together leave nothing to verify")
    state = open_state()
    env = environment(env)
    expected = expected_version(state, env)
    planned = load_plan("verify", env, hosts_dir, runbooks_dir, steps_dir, {}, limit=limit,
                        if_declared={"expected_version": expected})  # (your own verify runbook may not declare it)
    from overhaul.settings import project_folder

    folder = Path(checks) if checks else project_folder(planned.inventory.checks or "checks")
    if not folder.is_dir() and (checks or planned.inventory.checks or checks_only):
        raise OverhaulError(f"checks folder {folder} does not exist")
    transport = Transport(planned.inventory, planned.redactor)
    # The checks (pytest, in this process, on these connections) run while the runbook's stages do.
    checking = verification.BackgroundChecks(transport, str(hosts_folder(hosts_dir)), folder, planned.hosts,
                                             {"expected_version": expected}) \
        if folder.is_dir() and not no_checks else None
    try:
        result = None
        if not checks_only:
            with console(verbosity(verbose, quiet), show_summary=False) as seen:  # (one summary below)
                result = Execution(planned, state=state, subscribers=[seen], transport=transport).read(expected)
        cases = verification.runbook_cases(result) if result is not None else []
        if checking is not None:
            cases += checking.cases(interrupted=result is not None and result.interrupted)
    finally:
        if checking is not None:
            checking.stop()
        transport.close()
    print_checks(cases, verbosity=verbosity(verbose, quiet))
    run_id = result.run_id if result is not None else ""
    if junit:
        verification.write_junit(cases, junit, env, run_id)
    if json:
        verification.write_json(cases, json, env, run_id)
    failed = any(case.status == "failed" for case in cases)
    code = (exit_code(result) if result is not None else 0) or (1 if failed else 0)
    if result is not None and result.run_id:
        # the testinfra checks' results belong to the run too (`overhaul show`): one transaction for all of them
        state.add_events(env, CHECK, [dumps({"check": case.check, "host": case.host, "status": case.status,
                                             "message": case.message}) for case in cases if case.source != "runbook"],
                         result.run_id)
        if code:
            state.set_status(result.run_id, "failed", time.time())  # the journal says what the exit code says
    finish(code)


@command(iterable=("param",), help={
    "run": "the run to resume (default: the last run of --env, if it is unfinished or failed)",
    "version": "must equal the run's version if given", "yes": "confirm gated stages",
    **{k: v for k, v in COMMON_HELP.items() if k not in ("runbooks_dir", "limit", "check", "dry_run")}})
def resume(c, env="", run="", version="", param=None, yes=False, skip_unreachable=False, verbose=False, quiet=False,
           hosts_dir="", steps_dir=""):
    """Continue an interrupted, failed or partial run: finished work is skipped once its check confirms it still holds."""
    from overhaul.api import expected_version, journaled_plan, secret_name
    from overhaul.execution import UNDO, Execution, Gate, exit_code

    state = open_state()
    if run:
        record = journaled_run(state, run)
    else:
        from overhaul.settings import default_environment

        if not env and default_environment() is None:
            raise OverhaulError("give --env (resume its newest unfinished run) or --run ID")
        env = environment(env)
        found = state.resumable(env)
        if found is None:
            raise OverhaulError(f"no unfinished or failed run of {env!r} to resume in {state.url}")
        record = found
    if env and record.environment != env:
        raise OverhaulError(f"run {record.id} is of environment {record.environment!r}, not {env!r}")
    if record.status in ("succeeded", "abandoned", "rolled back"):
        raise OverhaulError(f"run {record.id} is {record.status}: there is nothing to resume")
    if record.status == "refused":
        raise OverhaulError(f"run {record.id} was refused before any change: there is nothing to resume; once its "
                            "reasons are repaired (`overhaul show " + record.id + "`), start it again")
    if state.run_event(record.id, UNDO) is not None:  # its way on is the undo it started: continued, not resumed
        forward = [flag for flag, given in (("--version", version), ("--param", param), ("--skip-unreachable",
                                                                                       skip_unreachable)) if given]
        if forward:
            raise OverhaulError(f"run {record.id} was being undone: resume continues its undo, which takes no "
                                f"{', '.join(forward)} (`overhaul undo --run {record.id}` says what it will take back)")
        print(f"run {record.id} was being undone: continuing its undo")
        return undo_run(state, record, yes, dry(c), verbosity(verbose, quiet), hosts_dir, steps_dir)
    from overhaul.secrets import redacted_in

    given = parse_params(param or []) | ({"version": version} if version else {})
    for name, value in given.items():
        journaled = record.params.get(name)
        if secret_name(journaled):
            continue  # the value of an inventory secret: read again from it
        if str(journaled) != value and not redacted_in(journaled):
            raise OverhaulError(f"run {record.id} was started with {name}={record.params.get(name)!r}; "
                                f"a resumed run keeps its parameters (got {value!r})")
    planned = journaled_plan(state, record, hosts_folder(hosts_dir), steps_dir, "resume", given)
    if dry(c):
        raise OverhaulError("--dry with resume: see the run with `overhaul show`; nothing was changed")
    gate = Gate(skip_unreachable=skip_unreachable, approve=approval(planned, yes))
    with console(verbosity(verbose, quiet)) as seen:
        result = Execution(planned, state=state, subscribers=[seen], confirm=ask(yes), gate=gate).run(
            resume=record, version_from=expected_version(state, record.environment))
    finish(exit_code(result))


@command(help={"run": "the failed, interrupted or abandoned run to undo (an id, a prefix of one, or last)",
               "yes": "undo a protected environment without asking", **VIEW_HELP,
               **{name: COMMON_HELP[name] for name in ("hosts_dir", "steps_dir")}})
def undo(c, run="", yes=False, verbose=False, quiet=False, hosts_dir="", steps_dir=""):
    """Take back what a failed, interrupted or abandoned run changed, latest stage first; it ends `rolled back`.

    Refused (nothing undone) when a stage that changed something cannot be undone: `overhaul rollback` then.
    """
    from overhaul.state.records import RESUMABLE

    state = open_state()
    record = journaled_run(state, need(run, "--run"))
    if record.status not in (*RESUMABLE, "abandoned", "rolled back") or not record.mutating:
        raise OverhaulError(f"run {record.id} is {record.status}: only a failed, partial, interrupted or abandoned run "
                            "is undone")
    undo_run(state, record, yes, dry(c), verbosity(verbose, quiet), hosts_dir, steps_dir)


def undo_run(state: State, record: RunRecord, yes: bool, dry: bool, view: int, hosts_dir: str, steps_dir: str) -> None:
    """Take back what `record` changed, after saying what and asking; refused (exit 3) with nothing changed when a
    later run changed its hosts since, or a change cannot be undone. A killed undo is continued by this again:
    each change is taken back once (an undo pair is skipped once its check confirms it holds)."""
    from overhaul.api import expected_version, journaled_plan
    from overhaul.execution import Execution, exit_code, host_results
    from overhaul.history import History, rollback_way
    from overhaul.undo import undo_plan

    planned = journaled_plan(state, record, hosts_folder(hosts_dir), steps_dir, "undo it")
    results = state.results(record.id)
    own = [r for r in results if r.stage_index < len(planned.stages)]
    cut = [f"{r.stage} on {r.host}" for r in own
           if r.outcome == "running" and not planned.stages[r.stage_index].step.read_only]
    if cut:
        raise Refused(f"run {record.id} was cut off in the middle of {', '.join(cut)}: what that changed is not in the "
                      f"journal; finish the run first (`overhaul resume --run {record.id}`), then undo it")
    environment = record.environment
    later = History(state, environment).superseded(record, {r.host for r in own if r.outcome in ("changed", "failed")})
    if later:
        since = "; ".join(f"run {run_id} changed {', '.join(hosts)}" for run_id, hosts in later.items())
        back = rollback_way(state, environment)
        raise Refused(f"run {record.id} was superseded: {since} after it. Undoing {record.id} would put back what it "
                      "found under what the later run did; nothing was undone. The way back from here: "
                      + (f"`{back}` (the last upgrade that changed a package)" if back else
                         "none in the journal (no upgrade that changed a package): repair by hand"))
    undo = undo_plan(planned, list(host_results(results).values()))
    if undo.blocked:
        back = rollback_way(state, environment, record)
        raise Refused("; ".join(undo.blocked) + "; nothing was undone" + (f": the way back is `{back}`" if back else ""))
    print(f"undo of run {record.id} ({record.runbook} on {environment}), latest stage first:")
    for stage in undo.plan.stages:
        print(f"  {stage.stage.name}: " + ", ".join(f"{host} ({said})" if (said := undo.said(stage, host)) else host
                                                     for host in stage.hosts))
    if dry:
        return
    if not undo.plan.stages:
        print("nothing to undo: the run changed nothing")
    elif not yes:
        protected = " protected" if planned.inventory.policy.protected else ""
        if not answered_yes(f"Undo run {record.id} on{protected} environment {environment!r}?",
                            "undo asks first, on every environment: review the above, then run with --yes"):
            raise Refused("not confirmed: nothing was undone")
    with console(view) as seen:
        result = Execution(planned, state=state, subscribers=[seen]).run(
            resume=record, undo=True, version_from=expected_version(state, environment))
    finish(exit_code(result))


def journaled_run(state: State, run_id: str) -> RunRecord:
    """A run by its id, a unique prefix of it, or `last` (the newest run journaled)."""
    from overhaul.history import find_run

    return find_run(state, run_id)


@command(help={"run": "the run to abandon"})
def abandon(c, run=""):
    """Mark an unfinished run abandoned, so a new upgrade may start (the journal keeps it)."""
    from overhaul.execution import operator
    from overhaul.state.records import RESUMABLE
    from overhaul.state.sql import holder_gone

    state = open_state()
    record = journaled_run(state, need(run, "--run"))
    if record.status not in RESUMABLE:
        raise OverhaulError(f"run {record.id} is {record.status}: only an unfinished or failed run can be abandoned")
    lock = state.lock(record.environment)
    if lock is not None and lock.run_id == record.id and not holder_gone(lock):
        raise Refused(f"run {record.id} still holds the lock of {record.environment!r} ({lock.holder}, pid {lock.pid}): "
                      "stop it first, or wait until its lease expires")
    state.set_status(record.id, "abandoned", time.time())
    state.event(record.environment, "abandon", f"{operator()} abandoned the run", record.id)
    print(f"run {record.id} abandoned")


@command(help={"env": COMMON_HELP["env"], "force": "remove the lock even though its holder may be alive",
               "reason": "why (journaled with who removed it; required with --force)"})
def unlock(c, env="", force=False, reason=""):
    """Remove an environment's lock (with --force and a --reason); who and why are journaled."""
    from overhaul.execution import operator

    state = open_state()
    env = environment(env)
    lock = state.lock(env)
    if lock is None:
        print(f"{env}: not locked")
        return
    if not force:
        raise OverhaulError(f"{env} is locked by {lock.holder} (pid {lock.pid}, run {lock.run_id}, lease "
                            f"{'live' if lock.live else 'expired'}): add --force --reason WHY to remove the lock")
    if not reason.strip():
        raise OverhaulError("unlock --force needs --reason WHY (it is journaled with who removed the lock)")
    removed = state.force_unlock(env, operator(), reason.strip())
    if removed is None:
        print(f"{env}: not locked")
        return
    print(f"{env}: lock of {removed.holder} (run {removed.run_id}) removed; journaled")


@command(help={"env": "only this environment", "count": "how many runs (default 20)",
               "runbook": "only runs of this runbook", "status": "only runs with this status (succeeded, failed, "
               "refused, interrupted, running, abandoned)", "since": "only runs started since a date (2026-11-01) or "
               "an age (30m, 2h, 3d)", "all": "also the read-only runs (verify, synthetic)", "json": "one JSON object per run"})
def history(c, env="", count=20, runbook="", status="", since="", all=False, json=False):
    """Runs, newest first: id, runbook, environment, version, status, duration, who (read-only runs with --all)."""
    from overhaul.state.records import STATUSES

    if status and status not in STATUSES:
        raise OverhaulError(f"--status {status!r}: not a run status (one of: {', '.join(STATUSES)})")
    if int(count) < 1:
        raise OverhaulError(f"--count {count}: how many runs to show, 1 or more")
    after = since_time(since) if since else None
    runs = [record for record in open_state().runs(env or None, 1_000_000)
            if (all or record.mutating) and (not runbook or record.runbook == runbook)
            and (not status or record.status == status) and (after is None or record.started >= after)][:int(count)]
    if json:
        from overhaul.documents import run_document

        for record in runs:
            print(dumps(run_document(record), sort_keys=True))
        return
    if not runs:
        print("no runs journaled" + (" (read-only runs are shown with --all)" if not all else ""))
        return
    width = max([10, *(len(record.runbook) for record in runs)])  # (a composed runbook's name may be long)
    print(f"{'RUN':<24} {'RUNBOOK':<{width}} {'ENV':<12} {'VERSION':<10} {'STATUS':<12} {'STARTED':<20} {'TIME':>7}  WHO")
    for record in runs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.started))
        version = str(record.params.get("version", "-"))
        print(f"{record.id:<24} {record.runbook:<{width}} {record.environment:<12} {version:<10} {record.status:<12} "
              f"{started:<20} {record.duration:>6.0f}s  {record.operator}")


def since_time(text: str) -> float:
    """`--since`: an age (30m, 2h, 3d) or a date or date-time (2026-11-01, 2026-11-01T08:00), as a timestamp."""
    units = {"m": 60, "h": 3600, "d": 86400}
    if text[:-1].isdigit() and text[-1:] in units:
        return time.time() - int(text[:-1]) * units[text[-1]]
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise OverhaulError(f"--since {text!r}: expected an age (30m, 2h, 3d) or a date (2026-11-01)") from None


@command(positional=("run",), help={"run": "the run id (see history), a unique prefix of it, or `last`",
                                   "json": "the run, its pairs and its events as one JSON object"})
def show(c, run, json=False):
    """One run: stages x hosts with outcome, attempts, message, facts (e.g. the backup) and output files."""
    if help_asked(run, "show"):
        return
    from overhaul.execution import PREFLIGHT_EVENT
    from overhaul.files import last_lines
    from overhaul.report import plural

    state = open_state()
    record = journaled_run(state, run)
    if json:
        from overhaul.documents import show_document

        print(dumps(show_document(state, record), indent=2))
        return
    results = state.results(record.id)
    events = state.run_events(record.id)
    commands: dict[tuple[int, str], list] = {}
    for ran in state.commands(record.id):
        commands.setdefault((ran.stage_index, ran.host), []).append(ran)
    print(f"run {record.id}: {record.runbook} on {record.environment}, {record.status}, by {record.operator}, "
          f"params {dumps(record.params, sort_keys=True)}, {record.duration:.1f} s")
    for result in results:
        took = f"{result.ended - result.started:.1f}s" if result.ended and result.started else "-"
        started = time.strftime("%H:%M:%S", time.localtime(result.started)) if result.started else "-"
        number = f"[{result.stage_index + 1}]"
        print(f"  {number:<4} {result.stage:<22} {result.host:<12} {result.outcome:<8} {started} {took:>6} "
              f"x{result.attempts} {result.message}")
        if result.facts:
            print(f"      facts: {dumps(result.facts, sort_keys=True)}")
        log = Path(result.output_path) if result.output_path else None
        if result.outcome == "failed":
            last = last_lines(log, 6) if log is not None and log.exists() else []
            print(f"      last output: {last[0]}" if last else "      last output: none (no command of it was logged here)")
            for line in last[1:]:
                print(f"        {line}")
        if log is not None and log.exists():
            print(f"      output: {result.output_path}")
        else:  # the log is on the controller that ran the pair: show its command index instead
            for ran in commands.get((result.stage_index, result.host), []):
                print(f"      $ {ran.command.splitlines()[0][:100]}  [exit {ran.exit_code}, {ran.duration * 1000:.0f} ms, "
                      f"log on {ran.machine.partition(':')[0][:12]}: {ran.log_path}]")
    for at, kind, detail in events:
        if kind == PREFLIGHT_EVENT:  # the gate's table: its refusals are events of their own
            refused = sum(said not in ("ok", "-") for row in loads(detail).values() for said in row.values())
            print(f"  preflight: {plural(len(loads(detail)), 'host')} checked, {refused} refusal(s)")
        elif kind == CHECK:
            case = loads(detail)
            print(f"  check {case['host']:<12} {case['status']:<8} {case['check']}"
                  f"{': ' + case['message'] if case['message'] else ''}")
        else:
            print(f"  event {time.strftime('%H:%M:%S', time.localtime(at))} {kind}: {detail}")


@command(help={"env": COMMON_HELP["env"], "hosts_dir": COMMON_HELP["hosts_dir"],
               "rerun": "run again this window, after its run failed and the cause was fixed (releases that run's "
                        "claim; journaled)"})
def synthetic(c, env="", hosts_dir="", rerun=False):
    """Launch a small farm, prove it comes up and works, tear it down; exit code names a failed phase (20-30)."""
    from overhaul.inventory import load_inventory
    from overhaul.synthetic.run import SyntheticRun, workdir_default

    loaded = load_inventory(environment(env), hosts_folder(hosts_dir))
    with console(0) as seen:
        code = SyntheticRun(loaded, open_state(), workdir_default(), [seen], rerun=rerun).run()
    finish(code)


@command(help={"env": COMMON_HELP["env"], "hosts_dir": COMMON_HELP["hosts_dir"],
               "offline": "validate the file alone: no inventory source asked (no AWS call), the key, known_hosts "
                          "and secret files it names not looked at (e.g. --env production.example)"})
def inventory(c, env="", hosts_dir="", offline=False):
    """Show what an inventory says, every section of it, and each host (roles, address, user, variables)."""
    from overhaul.inventory import load_inventory, sections

    loaded = load_inventory(environment(env), hosts_folder(hosts_dir), offline=offline)
    print(f"environment {loaded.environment} ({len(loaded.hosts)} hosts{', offline' if offline else ''})")
    shown = sections(loaded, offline=offline) | {"policy": describe_policy(loaded)}
    for name, text in shown.items():
        print(f"  {name}: {text}")
    print("  hosts:" if loaded.hosts else "  hosts: none listed")
    for host in loaded.hosts:
        user = host.user or loaded.ssh.user
        port = host.port or loaded.ssh.port
        print(f"  {host.name:<14} {','.join(host.roles):<12} {user}@{host.address}:{port}  "
              f"vars={json.dumps(loaded.host_vars(host), sort_keys=True)}")


@command(help={"listen": "HOST:PORT to listen on (default: web.listen in overhaul.yaml, else 127.0.0.1:8040); a "
                         "non-loopback address needs web.token", "hosts_dir": COMMON_HELP["hosts_dir"]})
def serve(c, listen="", hosts_dir=""):
    """The journal as read-only web pages: environments, history, each run (live while it runs), JSON beside each."""
    import ipaddress

    from overhaul.settings import load_settings

    settings = load_settings()
    host, sep, port = (listen or settings.web.listen).rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise OverhaulError(f"--listen {listen!r}: expected HOST:PORT (127.0.0.1:8040)")
    host = host.strip("[]")
    token = settings.web.token.resolve() if settings.web.token is not None else None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and token is None:
        raise Refused(f"--listen {host}: not a loopback address, and overhaul.yaml has no web.token: anyone who reaches "
                      "it could read every run; set web.token ({env: VAR} or {file: PATH}), or listen on 127.0.0.1")
    try:
        import uvicorn

        from overhaul.web.app import make_app
    except ImportError as exc:
        raise OverhaulError(f"overhaul serve needs its web extra: pip install 'overhaul[web]' ({exc})") from None
    from overhaul.settings import find_project_root

    root = find_project_root()
    folder = Path(hosts_dir) if hosts_dir else (root / "hosts" if root is not None else None)
    app = make_app(open_state(), token=token, hosts_dir=folder)
    print(f"serving the journal at http://{host}:{port}/ ({'token required' if token else 'no token'}); Ctrl-C stops")
    uvicorn.run(app, host=host, port=int(port), log_level="warning")


@command(help={"out": "folder to write inventory.schema.json and runbook.schema.json into (default: print)",
               "steps_dir": COMMON_HELP["steps_dir"]})
def schema(c, out="", steps_dir=""):
    """Publish the JSON Schema of inventory and runbook files (for editor completion; see docs/concepts.md)."""
    from overhaul.api import registry

    schemas = file_schemas(registry(steps_dir))
    if not out:
        print(json.dumps(schemas, indent=2))
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    for name, document in schemas.items():
        (Path(out) / f"{name}.schema.json").write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {Path(out) / f'{name}.schema.json'}")


SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def file_schemas(steps: Registry) -> dict[str, dict[str, Any]]:
    """The inventory and runbook schemas; a runbook stage's `params` is checked against its step's own
    parameters (by name: a value may be a `${reference}`, so types are left to `overhaul plan`)."""
    from overhaul.inventory import Inventory
    from overhaul.runbook import Runbook

    inventory = {"$schema": SCHEMA_DIALECT, "$id": "urn:overhaul:schema:inventory", **Inventory.model_json_schema()}
    runbook = {"$schema": SCHEMA_DIALECT, "$id": "urn:overhaul:schema:runbook", **Runbook.model_json_schema()}
    by_step = []
    for name in steps.names():
        try:
            fields = steps.get(name).Params.model_fields
        except ConfigError as exc:  # a broken plug-in: the schema leaves its params open, and says why
            print(f"warning: {exc}: its stages' params are not checked by the schema", file=sys.stderr)
            continue
        properties = {field: {"description": info.description or f"{name} parameter ({info.annotation})"}
                      for field, info in fields.items()}
        by_step.append({"if": {"properties": {"step": {"const": name}}, "required": ["step"]},
                        "then": {"properties": {"params": {"type": "object", "properties": properties,
                                                           "additionalProperties": False}}}})
    runbook["$defs"]["Stage"]["allOf"] = by_step
    return {"inventory": inventory, "runbook": runbook}


LAB_HELP = {
    "home": "where the lab keeps its state (default .overhaul/lab)",
    "inventory": "the inventory file to write (default hosts/lab.yaml)",
}


def _lab(home: str, inventory: str) -> Lab:
    from overhaul.lab import Lab

    return Lab(home=home, inventory=inventory)


@command(help={"hosts": "number of hosts: one db, one worker, the rest app (default 4)",
               "subnet": "the hosts' addresses: SUBNET.1, SUBNET.2, ... inside 127.0.0.0/8 (default 127.10.0); the lab "
                         "on 127.A.B has its synthetic farm on 127.A.(255-B), so 127.A.255 is refused",
               **LAB_HELP})
def up(c, hosts=4, home=".overhaul/lab", inventory="hosts/lab.yaml", subnet="127.10.0"):
    """Start the lab (or repair a half-started one): real hosts with scalr-server 1.0.0."""
    from overhaul.lab import Lab
    from overhaul.lab.lab import FIRST_VERSION

    lab = Lab(home=home, inventory=inventory, subnet=subnet)
    lab.up(int(hosts))
    if lab.started_fresh:  # what verify expects is what the farm now is, not the last upgrade of the one before
        from overhaul.history import REBUILT

        open_state().event(lab.environment, REBUILT, FIRST_VERSION)
    _print_status(lab)
    print(f"synthetic farm (`overhaul synthetic --env {lab.environment}`): hosts of its own on {lab.synthetic_subnet}.1 "
          "and up")
    from overhaul.settings import SETTINGS_FILE, find_project_root, set_default_environment

    root = find_project_root(Path(inventory).resolve().parent)
    if root is not None and set_default_environment(root, lab.environment):
        print(f"default environment: {lab.environment} (default_env in {root / SETTINGS_FILE}): "
              "`overhaul verify` needs no --env")


@command(help=LAB_HELP)
def down(c, home=".overhaul/lab", inventory="hosts/lab.yaml"):
    """Stop every lab host and remove the lab's hosts and inventory."""
    _lab(home, inventory).down()
    print("lab: down")


@command(help=LAB_HELP)
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


@command(name="migrate")
def state_migrate(c):
    """Create or migrate the configured state's schema (a shared database is never migrated implicitly)."""
    state = open_state(migrate=True)
    print(f"{state.url}: schema version {state.schema_version()} (this Overhaul's)")


@command(name="status")
def state_status(c):
    """Where the state is (never with a password), its schema version, its runs and the leases held."""
    state = open_state()
    print(f"state: {state.url}\nschema version: {state.schema_version()}\nruns: {len(state.runs(None, 1_000_000))}")
    for lease in state.locks():
        print(f"lease: {lease.environment} held by {lease.holder} (pid {lease.pid}, run {lease.run_id}), "
              f"{'live' if lease.live else 'expired'}")


@command(help={"out": "the file to write (default -: standard output)"}, name="export")
def state_export(c, out="-"):
    """Write the whole journal (runs, pairs, events, claims, command index) as JSON lines."""
    lines = (json.dumps(row) + "\n" for row in open_state().export())
    if out == "-":
        sys.stdout.writelines(lines)
        return
    from overhaul.files import write_private

    write_private(Path(out), lines)  # the journal's commands and logs: 0600, as the journal itself


@command(help={"file": "JSON lines written by `overhaul state.export` (- reads standard input)"}, name="import")
def state_import(c, file=""):
    """Add an exported journal to the configured state, all or nothing (rows already there are kept as they are).

    The file is read a line at a time, each row validated as the journal's own records are
    (overhaul.state.exported): a bad row is refused with its file, line and column, and nothing is imported.
    """
    from overhaul.state.exported import Reader, open_export

    with open_export(need(file, "--file")) as (stream, name):
        rows = Reader(stream, name)
        state = open_state()
        added = state.import_rows(rows)
    print(f"{state.url}: {added} of {rows.count} rows added")


lab = Collection("lab", up, down, status)
state_tasks = Collection("state", state_migrate, state_status, state_export, state_import)
namespace = Collection(upgrade, rollback, undo, verify, synthetic, resume, abandon, unlock, history, show, run, plan, apply,
                       inventory, schema, serve, lab, state_tasks)

CORE_FLAGS = ("help", "version", "list", "list-depth", "list-format", "print-completion-script", "complete")


def show_warnings() -> None:
    """What the engine logs as a warning for the operator (a known_hosts line skipped, say) goes to stderr."""
    import logging

    logger = logging.getLogger("overhaul")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False


def raise_open_files_limit() -> None:
    """A connection per host: a farm of 1,000 needs more than the usual soft limit of 1,024 open files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 65536),
                                                        hard))


class OverhaulProgram(Program):
    """The `overhaul` command: invoke's core flags reduced to those Overhaul honours, as Fabric does for `fab`.

    `--dry`, `--echo`, `--warn-only`, `--pty` and the other flags for invoke's own `run()` do not exist here
    (an unknown flag is a usage error, exit 2).
    """

    def core_args(self) -> list:
        return [argument for argument in super().core_args() if argument.name in CORE_FLAGS]

    def run(self, argv: list[str] | str | None = None, exit: bool = True) -> None:
        raise_open_files_limit()
        show_warnings()
        if threading.current_thread() is threading.main_thread():
            # Ctrl-C stops every command (exit 130), even one started where SIGINT was ignored (a script's `cmd &`):
            # as a run's own handler already does, so `verify --checks-only` is no exception.
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            super().run(argv, exit)
        except BrokenPipeError:  # `overhaul --help | head`: the reader is gone, and so is what is left to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(1) from None

    def parse_core(self, argv: list[str] | str | None) -> None:
        self.normalize_argv(argv)
        self._usage(self.parse_core_args)
        if self.args.version.value:
            self.print_version()
            raise Exit
        if self.args["print-completion-script"].value:
            from invoke.completion.complete import print_completion_script

            print_completion_script(shell=self.args["print-completion-script"].value, names=self.binary_names)
            raise Exit

    def parse_tasks(self) -> None:
        self._usage(super().parse_tasks)
        for context in self.tasks:
            for argument in context.args.values():
                values = argument.value if isinstance(argument.value, list) else [argument.value]
                if argument.got_value and any(isinstance(value, str) and not value.strip() for value in values):
                    flag = "--" + argument.name.replace("_", "-")
                    raise Exit(f"error: {flag} of `{context.name}` is empty: give it a value, or leave the flag out "
                               "(an empty value never means everything)", code=USAGE_EXIT)

    def parse_cleanup(self) -> None:
        self._usage(super().parse_cleanup)

    def update_config(self, merge: bool = True) -> None:
        if merge:
            self.config.merge()  # no flag of ours changes invoke's run() settings

    def print_help(self) -> None:
        super().print_help()
        print(EXIT_CODES + "\n")

    def print_task_help(self, name: str) -> None:
        """invoke's task help, its usage line saying what this command takes (one task, its positional values)."""
        import io

        with contextlib.redirect_stdout(io.StringIO()) as text:
            super().print_task_help(name)
        _, _, rest = text.getvalue().partition("\n")
        task = self.collection[name]
        words = [f"overhaul {name}", "[--options]", *(value.upper() for value in task.positional)]
        print(f"Usage: {' '.join(words)}\n{rest}", end="")

    @staticmethod
    def _usage(step: Callable[[], None]) -> None:
        try:
            step()
        except ParseError as exc:
            raise Exit(f"error: {exc}{usage_hint(exc)}", code=USAGE_EXIT) from None
        except ValueError as exc:  # invoke casting a flag's value: `--limit many`
            raise Exit(f"error: a flag's value is not of its type: {exc} (see `overhaul TASK --help`)",
                       code=USAGE_EXIT) from None


def usage_hint(error: ParseError) -> str:
    """Where to look after a parse error: the task's own help, and `plan` for the dry-run flags of other tools."""
    task = getattr(error.context, "name", None)
    if task is None:
        return " (see `overhaul --help`)"
    if any(f"'{flag}'" in str(error) for flag in ("--check", "--dry-run", "--dry", "--diff")):
        return f" (`overhaul plan RUNBOOK` shows what a run would change, changing nothing; see `overhaul {task} --help`)"
    return f" (see `overhaul {task} --help`)"


program = OverhaulProgram(namespace=namespace, name="overhaul", binary="overhaul", version=__version__)  # also as -m
