"""`overhaul verify`: the built-in verify runbook plus the operator's testinfra checks, in one report.

The checks folder runs in one pytest session over every host (testinfra parametrizes each check by
host), inside the controller's process and on the run's own connections: no second Python to start,
no second SSH connection per host. Results
become one case per (check, host): printed, and written as JUnit XML and JSON for CI and dashboards.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from overhaul.runner import RunResult
from overhaul.step import Outcome
from overhaul.transport import Transport


@dataclass
class Case:
    """One check on one host."""

    check: str
    host: str
    status: str  # passed | failed | skipped
    message: str = ""
    duration: float = 0.0
    source: str = "runbook"  # runbook (built-in verify) or the checks file
    detail: str = ""  # a failed check: the assertion and where it failed (pytest's report)


def runbook_cases(result: RunResult) -> list[Case]:
    status = {Outcome.OK: "passed", Outcome.CHANGED: "passed", Outcome.FAILED: "failed", Outcome.SKIPPED: "skipped"}
    return [Case(r.stage, r.host, status[r.outcome], r.message, r.duration) for r in result.results]


CHECK_WIDTH = 8  # pytest sessions at once: 20 lab hosts' checks took 6.0 s in one, 3.8 s in 8, 3.6 s in 20 (at
# 0.5 s more CPU); the lab's hosts share the controller's 2 cores, real hosts gain more from it

# pytest's plugins a verify does without: its terminal (the controller's live view owns stdout) and, as they
# change process-wide state the runbook's threads and the other sessions share, capture, debugging,
# faulthandler, logging, warnings and the exception hooks; the cache (and stepwise, which needs it); and
# those only for options a verify never passes (pastebin, --setup-only/plan). junitxml and doctest stay: checks
# may use their fixtures (record_property, doctest_namespace).
QUIET_PLUGINS = ("terminal", "debugging", "faulthandler", "logging", "warnings", "unraisableexception",
                 "threadexception", "cacheprovider", "stepwise", "pastebin", "setuponly", "setupplan", "freeze_support")


def run_checks(transport: Transport, hosts_dir: str, checks: Path, hosts: list[str], extra_vars: dict | None = None,
               stop: threading.Event | None = None, width: int = CHECK_WIDTH) -> list[Case]:
    """Run the checks folder against `hosts` in this process, on `transport`'s connections: one case per (check, host).

    pytest runs in-process (no second Python, no second connection, no second known_hosts parse), one
    session per group of hosts, `width` groups at once: a session runs its checks one after the other,
    and most of a check's time is its host's answer. No session captures or writes to the terminal or
    touches signals, logging, warnings or exception hooks; what they add to sys.path and sys.modules is
    taken back, so a second verify in the process starts clean. `stop` ends every session before its
    next check (Ctrl-C of the run).

    Each host is released after its last check (`Transport.release`): its connection closes unless another
    user still holds it. A caller sharing the transport holds the hosts for the checks first (BackgroundChecks).
    """
    from overhaul import checks as overhaul_checks

    if not hosts:
        return []
    stop = stop or threading.Event()
    groups = [hosts[index::width] for index in range(max(1, min(width, len(hosts))))]
    installed_plugins()  # loaded here, once: sessions starting at once would each miss the cache and load them all
    env = transport.inventory.environment
    with overhaul_checks.sharing(transport, hosts_dir), _session_state(checks, env, hosts_dir), \
            ThreadPoolExecutor(max_workers=len(groups), thread_name_prefix="overhaul-checks") as pool:
        sessions = list(pool.map(lambda group: _session(checks, env, hosts_dir, group, extra_vars, stop,
                                                        transport.release), groups))
    rank: dict[str, int] = {}  # the cases in one session's order: by file, then host, then check
    for cases in sessions:
        for case in cases:
            rank.setdefault(case.check.split("::")[0], len(rank))
            # an assertion's text quotes what a check read (a config file, say): never a secret in it
            case.message, case.detail = transport.redactor(case.message), transport.redactor(case.detail)
    return sorted((case for cases in sessions for case in cases), key=lambda c: (rank[c.check.split("::")[0]], c.host))


def _session(checks: Path, env: str, hosts_dir: str, hosts: list[str], extra_vars: dict | None,
             stop: threading.Event, release: Callable[[str], None]) -> list[Case]:
    """One pytest session over some hosts: its cases, or one failed case per host when pytest itself failed.
    Each host is released after its last check (or at the session's end)."""
    import pytest  # only a verify with checks pays for importing pytest and testinfra

    pytest.hookimpl(hookwrapper=True)(_Collector.pytest_collection)  # (marks the function: the same each time)
    collector = _Collector(str(checks), stop, hosts, release)
    try:
        code = pytest.main(_pytest_args(checks, env, hosts_dir, hosts, extra_vars),
                           plugins=[collector, *installed_plugins()])
    finally:
        collector.release_all()
    if code not in (0, 1, 5) and not collector.stopped:  # 5: no checks; anything else is the checks' own fault
        problem = "; ".join(collector.problems) or "see `pytest CHECKS --overhaul-env ENV`"
        return [Case("checks", host, "failed", f"pytest exited {int(code)}: {problem}"[:300], source=str(checks),
                     detail="\n".join(collector.problems)) for host in hosts]
    return collector.cases


def _pytest_args(checks: Path, env: str, hosts_dir: str, hosts: list[str], extra_vars: dict | None) -> list[str]:
    return [str(checks), "-s", "-o", "addopts=", "--rootdir", str(checks), "--disable-plugin-autoload",
            *(arg for plugin in QUIET_PLUGINS for arg in ("-p", f"no:{plugin}")),
            "--overhaul-env", env, "--overhaul-hosts-dir", hosts_dir, "--overhaul-only", ",".join(hosts),
            "--overhaul-vars", json.dumps(extra_vars or {})]


@functools.cache
def installed_plugins() -> tuple[Any, ...]:
    """The installed pytest plugins (entry points `pytest11`: testinfra's, Overhaul's, ...), loaded once.

    A session given them (and --disable-plugin-autoload) loads exactly what pytest would, without reading
    every installed distribution's metadata twice per session (to find plugins, then to mark them for
    assertion rewriting): about 60 ms of CPU per session, 8 sessions per verify. The checks' own files
    are still rewritten (a failed assert shows its values).
    """
    from importlib.metadata import entry_points

    return tuple(entry.load() for entry in entry_points(group="pytest11"))


CURRENT_TEST = "PYTEST_CURRENT_TEST"
_side_by_side = 0  # run_checks calls in progress, which keep pytest's PYTEST_CURRENT_TEST upkeep tolerant
_side_by_side_lock = threading.Lock()
_pytest_current_test: Any = None  # pytest's own, while ours stands in


def _current_test(item: Any, when: str | None) -> None:
    """pytest's upkeep of PYTEST_CURRENT_TEST, safe for sessions side by side.

    The variable is the process's, and pytest removes it after each check with a `pop` that raises when it is gone:
    with sessions in threads, one session's removal came just before another's, whose check then failed on teardown
    with KeyError 'PYTEST_CURRENT_TEST', a failure that was not the host's. Here it is set and removed as pytest
    does, except that removing it twice is no error."""
    if when:
        os.environ[CURRENT_TEST] = f"{item.nodeid} ({when})".replace("\x00", "(null)")
    else:
        os.environ.pop(CURRENT_TEST, None)


@contextmanager
def _tolerant_current_test() -> Iterator[None]:
    """While any run_checks of this process runs, pytest's runner keeps PYTEST_CURRENT_TEST with `_current_test`."""
    global _side_by_side, _pytest_current_test
    from _pytest import runner

    with _side_by_side_lock:
        if _side_by_side == 0:
            _pytest_current_test = runner._update_current_test_var
            runner._update_current_test_var = _current_test
        _side_by_side += 1
    try:
        yield
    finally:
        with _side_by_side_lock:
            _side_by_side -= 1
            if _side_by_side == 0 and _pytest_current_test is not None:
                runner._update_current_test_var = _pytest_current_test
                _pytest_current_test = None


@contextmanager
def _session_state(checks: Path, env: str, hosts_dir: str) -> Iterator[None]:
    """What the sessions share of the process, set once for all of them and taken back after."""
    from overhaul import checks as overhaul_checks

    path = sys.path[:]
    variables = {overhaul_checks.ENV_VARIABLE: env, overhaul_checks.HOSTS_DIR_VARIABLE: hosts_dir}
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)  # how testinfra's backends (made at collection) learn the environment
    try:
        with _tolerant_current_test(), _one_ast_at_a_time():
            yield
    finally:
        sys.path[:] = path
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        folder = str(checks.resolve()) + os.sep
        for name in [name for name, module in sys.modules.items()
                     if (getattr(module, "__file__", None) or "").startswith(folder)]:
            del sys.modules[name]  # the next verify reads the checks afresh
        overhaul_checks.forget_hosts()


_COLLECTING = threading.RLock()  # see _Collector.pytest_collection and _one_ast_at_a_time


@contextmanager
def _one_ast_at_a_time() -> Iterator[None]:
    """`ast.parse` one thread at a time while the sessions run: pytest parses sources to show a failed check's
    traceback, and CPython 3.11's AST code counts recursion per interpreter, not per thread ("SystemError: AST
    constructor recursion depth mismatch" when two sessions' checks fail at once, as a Ctrl-C makes them)."""
    import ast

    parse = ast.parse

    def locked(*args: Any, **kwargs: Any) -> Any:
        with _COLLECTING:
            return parse(*args, **kwargs)

    ast.parse = locked
    try:
        yield
    finally:
        ast.parse = parse


class _Collector:
    """pytest plugin of one checks session: each check's reports on one host become one Case."""

    def __init__(self, source: str, stop: threading.Event, hosts: list[str], release: Callable[[str], None]):
        self.source = source
        self.stop = stop
        self.stopped = False
        self.cases: list[Case] = []
        self.problems: list[str] = []  # collection errors: a check file that does not import, say
        self._case: dict[str, Case] = {}
        self._host: dict[str, str] = {}
        self._left = Counter[str]()  # checks still to run, by host
        self._held = set(hosts)
        self._release = release

    def release_all(self) -> None:
        for host in self._held:
            self._release(host)
        self._held.clear()

    def pytest_collection(self) -> Iterator[None]:  # a hook wrapper (marked in _session: pytest is imported there)
        """One session collects at a time: collecting imports the checks, and pytest's assertion rewriting compiles
        them from an AST, which CPython 3.11 cannot do in two threads at once (its AST constructor counts recursion
        per interpreter: "SystemError: AST constructor recursion depth mismatch", seen as a pytest INTERNALERROR)."""
        with _COLLECTING:
            yield

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:
            self.problems.append(f"{report.nodeid or 'collecting'}: {report.longreprtext.strip()}")

    def pytest_collection_modifyitems(self, items: list[Any]) -> None:
        from overhaul.pytest_plugin import host_name

        self._host = {item.nodeid: host_name(item) or "?" for item in items}
        self._left.update(self._host.values())

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        """A host's last check is done: its connection is free (the runbook may still hold it)."""
        host = self._host.get(nodeid, "?")
        self._left[host] -= 1
        if self._left[host] <= 0 and host in self._held:
            self._held.discard(host)
            self._release(host)

    def pytest_runtest_protocol(self, item: Any) -> bool | None:
        if self.stop.is_set():
            self.stopped = True
            item.session.shouldstop = "verify interrupted"
            return True  # this check is not run
        return None

    def pytest_runtest_logreport(self, report: Any) -> None:
        """Setup, call and teardown of one check on one host: what JUnit would say of it, as one case."""
        case = self._case.get(report.nodeid)
        if case is None:
            parts = report.nodeid.split("::")
            module = parts[-2] if len(parts) > 2 else Path(parts[0]).stem  # a class's name, else the file's
            case = self._case[report.nodeid] = Case(f"{module}::{parts[-1].partition('[')[0]}",
                                                    self._host.get(report.nodeid, "?"), "passed", source=self.source)
            self.cases.append(case)
        case.duration += report.duration
        if report.failed and case.status != "failed":
            crash = getattr(report.longrepr, "reprcrash", None)
            message = crash.message if crash is not None else report.longreprtext
            if report.when != "call":
                message = f'failed on {report.when} with "{message}"'
            case.status, case.message = "failed", (message.strip().splitlines() or [""])[0][:300]
            case.detail = report.longreprtext.strip()
        elif report.skipped and case.status == "passed":
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else getattr(report, "wasxfail", "")
            case.status, case.message = "skipped", str(reason).removeprefix("Skipped: ")[:300]


class BackgroundChecks:
    """The checks in a thread of their own, beside the runbook's stages and on the same transport."""

    def __init__(self, transport: Transport, hosts_dir: str, checks: Path, hosts: list[str], extra_vars: dict | None):
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="overhaul-checks")
        transport.hold(hosts)  # before the runbook's stages start (and could close a host the checks need)
        self._future = self._pool.submit(run_checks, transport, hosts_dir, checks, hosts, extra_vars, self._stop)

    def cases(self, interrupted: bool = False) -> list[Case]:
        """Every check's case (an interrupted run: those that ran, no new one starts)."""
        if interrupted:
            self._stop.set()
        return self._future.result()

    def stop(self) -> None:
        """No new check starts (Ctrl-C, an error): closing the transport after this cuts the running one short."""
        self._stop.set()
        self._pool.shutdown(wait=False)


def write_junit(cases: list[Case], path: str, env: str, run_id: str = "") -> None:
    """JUnit XML for CI: a suite per source, the failure's assertion text and location, a timestamp (`-`: stdout)."""
    suites = ET.Element("testsuites", name=f"overhaul verify {env}" + (f" (run {run_id})" if run_id else ""))
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    for source in dict.fromkeys(c.source for c in cases):
        mine = [c for c in cases if c.source == source]
        suite = ET.SubElement(suites, "testsuite", name=f"{env}: {source}", tests=str(len(mine)),
                              failures=str(sum(c.status == "failed" for c in mine)),
                              skipped=str(sum(c.status == "skipped" for c in mine)), timestamp=stamp)
        for case in mine:
            element = ET.SubElement(suite, "testcase", classname=f"{env}.{case.host}", name=f"{case.check} [{case.host}]",
                                    time=f"{case.duration:.3f}")
            if case.status == "failed":
                ET.SubElement(element, "failure", message=case.message).text = case.detail or case.message
            elif case.status == "skipped":
                ET.SubElement(element, "skipped", message=case.message)
    _write(path, ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n")


def write_json(cases: list[Case], path: str, env: str, run_id: str = "") -> None:
    """The verify as JSON: environment, run id, timestamp, totals and every case (`-`: stdout)."""
    totals = {status: sum(c.status == status for c in cases) for status in ("passed", "failed", "skipped")}
    document = {"environment": env, "run_id": run_id, "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
                "totals": totals, "cases": [asdict(c) for c in cases]}
    _write(path, json.dumps(document, indent=2) + "\n")


def _write(path: str, text: str) -> None:
    if path == "-":
        sys.stdout.write(text)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
