"""One synthetic farm-launch test: claim the window, launch, prove, tear down, tell.

Phases, in order (the exit code names the one that failed: 20 + its position):
claim 20, credentials 21, sweep 22, launch 23, running 24, ssh 25, verify 26, endpoints 27, hold 28,
terminate 29, terminated 30.
Teardown runs on every exit path (failure, timeout, Ctrl-C, SIGTERM): a synthetic test never leaks
a server. Unlike the vendor's example, every error is reported and fails the run.
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
from tenacity import Retrying, stop_before_delay, wait_exponential_jitter

from overhaul import alerts
from overhaul.command import sh
from overhaul.errors import HostUnreachable, OverhaulError, Refused
from overhaul.events import Publisher, Subscriber
from overhaul.execution import Told, new_run_id, operator
from overhaul.inventory import Host, Inventory, SSHSettings
from overhaul.plan import build_plan
from overhaul.runbook import load_runbook
from overhaul.runner import Runner
from overhaul.state import ResultRecord, RunRecord, State
from overhaul.step import Outcome, Registry
from overhaul.synthetic.aws import claim_dynamodb
from overhaul.synthetic.config import SyntheticConfig
from overhaul.synthetic.providers import TAG, Farm, Provider
from overhaul.synthetic.registry import provider_class
from overhaul.synthetic.window import Window
from overhaul.transport import CommandResult, Transport

PHASES = ["claim", "credentials", "sweep", "launch", "running", "ssh", "verify", "endpoints", "hold", "terminate",
          "terminated"]
EXIT_CODES = {name: 20 + index for index, name in enumerate(PHASES)}


class PhaseFailed(Exception):
    def __init__(self, phase: str, message: str):
        self.phase, self.message = phase, message
        super().__init__(f"{phase}: {message}")


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that teardown runs."""


@dataclass
class PhaseResult:
    name: str
    status: str  # ok | failed | skipped
    seconds: float
    message: str


class SyntheticRun:
    def __init__(self, inventory: Inventory, state: State, workdir: Path, subscribers: Iterable[Subscriber] = (),
                 registry: Registry | None = None, rerun: bool = False):
        """Everything that can be checked before the window is claimed is checked here (input errors, exit 2).

        What happens is published as events (overhaul.events) to `subscribers`: the phases as notices, the
        checks' stages and pairs as a run's.

        `rerun`: take this window over from its failed run (journaled), so a repaired night can run again.
        """
        if inventory.synthetic is None:
            raise OverhaulError(f"the inventory of {inventory.environment!r} has no `synthetic:` section")
        self.inventory = inventory
        self.config: SyntheticConfig = inventory.synthetic
        self.environment = inventory.environment
        self.state = state
        self.publish = Publisher(subscribers)
        self.registry = registry or Registry()
        self.run_id = new_run_id()
        self.provider: Provider = provider_class(self.config.provider)(self.config, self.environment, workdir)
        self.farm = Farm(self.run_id)
        self.phases: list[PhaseResult] = []
        self.farm_inventory: Inventory | None = None
        self.current = "claim"
        self.rerun = rerun
        self.holder: dict | None = None  # the claim of another run, when this window is not ours
        self.started = False  # journaled as a run (a run that finds the window taken is not)
        self.launching = False  # teardown is due once a launch was asked for, even if its reply never came
        self.webhook = self._webhook_url()
        self._verifying: tuple[Runner, Transport] | None = None
        self._verify_cancelled = threading.Event()
        self.began = time.monotonic()  # (run() sets both again when it starts)
        self.window = Window.at(time.time(), self.config.window)

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> int:
        self.began = time.monotonic()
        now = time.time()
        self.window = Window.at(now, self.config.window)
        try:
            self._phase("claim", lambda: self._claim(self.window.number))
        except PhaseFailed as exc:  # a broken claim backend: journaled and told like any failed phase
            self._start()
            return self._finish(exc)
        if self.holder is not None:
            self._say_held(self.holder, now)
            return 0
        self._say(f"   ({self.window.rule()}; the next window opens {self.window.next_opens(now)})")
        self._start()
        failure: PhaseFailed | None = None
        previous = signal.getsignal(signal.SIGTERM) if _main_thread() else None
        if _main_thread():
            signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            self._phase("credentials", self.provider.check_credentials, self.config.timeouts.credentials)
            self._phase("sweep", self._sweep)
            self._phase("launch", self._launch)
            self._phase("running", self._running)
            if self.config.connect:
                self._phase("ssh", self._ssh)
                self._phase("verify", self._verify, self.config.timeouts.verify, cancel=self._cancel_verify)
                self._phase("endpoints", self._endpoints)
            else:
                for name in ("ssh", "verify", "endpoints"):
                    self._skip(name, "connect: false (cloud API only)")
            if self.config.hold:
                self._phase("hold", lambda: time.sleep(self.config.hold) or f"held the farm {self.config.hold:g} s")
        except PhaseFailed as exc:
            failure = exc
        except (Terminated, KeyboardInterrupt) as exc:
            failure = PhaseFailed(self.current, f"interrupted by {'SIGTERM' if isinstance(exc, Terminated) else 'Ctrl-C'}")
            self._record(PhaseResult(self.current, "failed", 0.0, failure.message))
        finally:
            failure = self._teardown() or failure
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return self._finish(failure)

    def _phase(self, name: str, action: Callable[[], str | None], timeout: float | None = None,
               cancel: Callable[[], None] | None = None) -> None:
        """Run one phase, timed and recorded; any error fails it (PhaseFailed). A refusal is no phase failure.

        With `timeout`, the phase fails when `action` has not returned by then (`cancel` is asked to stop it).
        """
        self._say(f"-- {name}")
        self.current = name
        started = time.monotonic()
        try:
            message = (action() if timeout is None else _within(timeout, action, cancel, f"timeouts.{name}")) or ""
        except Refused:
            raise
        except (OverhaulError, HostUnreachable) as exc:
            self._record(PhaseResult(name, "failed", time.monotonic() - started, str(exc)))
            raise PhaseFailed(name, str(exc)) from None
        except Exception as exc:  # a provider's or the cloud's surprise still fails this phase, loudly
            text = f"{type(exc).__name__}: {exc}"
            self._record(PhaseResult(name, "failed", time.monotonic() - started, text))
            raise PhaseFailed(name, text) from None
        self._record(PhaseResult(name, "ok", time.monotonic() - started, message))

    def _skip(self, name: str, why: str) -> None:
        self._record(PhaseResult(name, "skipped", 0.0, why))

    def _record(self, result: PhaseResult) -> None:
        self.phases.append(result)
        self._say(f"   {result.name:<12} {result.status:<8} {result.seconds:7.2f} s  {result.message}")
        if self.started:
            self._journal(result)

    def _start(self) -> None:
        """Journal this run (a synthetic run is not resumable: never `mutating`), with the phases so far."""
        params = {"provider": self.config.provider, "window": self.window.span()}
        self.state.start_run(RunRecord(self.run_id, "synthetic", self.config.provider, "", self.environment, params,
                                       operator(), time.time(), mutating=False))
        self.started = True
        servers = sum(spec.count for spec in self.config.roles.values())
        self._say(f"run {self.run_id}: synthetic on {self.environment}, provider {self.config.provider}, "
                  f"{servers} server{'s' if servers != 1 else ''}")
        for result in self.phases:
            self._journal(result)

    def _journal(self, result: PhaseResult) -> None:
        now = time.time()
        self.state.record(ResultRecord(self.run_id, PHASES.index(result.name), result.name, "farm",
                                       {"ok": "ok", "failed": "failed", "skipped": "skipped"}[result.status],
                                       1, now - result.seconds, now, result.message))

    def _say(self, text: str) -> None:
        self.publish.notice(text)

    # -- phases ------------------------------------------------------------------------------
    def _claim(self, window: int) -> str:
        """Claim this window (one run per window, whichever scheduler fires); `self.holder` says who has it else.

        With `rerun`, a window held by a failed run is taken over: the next claim is keyed on that run, so of
        several operators rerunning at once one wins, and a scheduled run still finds the window taken.
        """
        key = f"synthetic:{self.environment}:{window}"
        self.holder = self._claim_key(key, window)
        while self.rerun and self.holder is not None:
            failed = self._failed_run(self.holder)
            key = f"{key}:rerun-after:{failed}"
            self.holder = self._claim_key(key, window)
            if self.holder is None:
                self.state.event(self.environment, "synthetic-rerun", f"window {self.window.span()} (number "
                                 f"{window}): {operator()} took the claim over from failed run {failed}", self.run_id)
                return f"this window ({self.window.span()}) taken over from failed run {failed}"
        if self.holder:
            return f"this window ({self.window.span()}) is held by run {self.holder['run_id']}"
        return f"claimed this window: {self.window.span()}"

    def _say_held(self, holder: dict, now: float) -> None:
        """Another run has this window: who, what a window is, when the next one opens, and what can be done now."""
        at = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(float(holder["at"])))
        run_id = holder["run_id"]
        self._say(f"synthetic {self.environment}: nothing to do: this window ({self.window.span()}) is already claimed "
                  f"by {holder['holder']} (run {run_id}, at {at})")
        self._say(f"   the synthetic test makes {self.window.rule()}; the next window opens "
                  f"{self.window.next_opens(now)}")
        try:
            status = self.state.run(run_id).status
        except KeyError:
            self._say(f"   run {run_id} is not in this machine's journal (another controller ran it): see it there; "
                      "`--rerun` takes a failed run's window over only where it ran")
            return
        if status == "failed":
            self._say(f"   run {run_id} failed (details: overhaul show {run_id}); once the cause is fixed, run again in "
                      f"this window: overhaul synthetic --env {self.environment} --rerun")
        else:
            self._say(f"   run {run_id} {'passed' if status == 'succeeded' else 'is ' + status}: "
                      f"details: overhaul show {run_id}")

    def _claim_key(self, key: str, window: int) -> dict | None:
        expires = (window + 1) * self.config.window
        claim = self.config.claim
        if claim.backend == "dynamodb":
            assert claim.table is not None  # the config's validation makes sure of it
            return claim_dynamodb(claim.table, key, operator(), self.run_id, expires, self.config.region,
                                  self.config.endpoint_url)
        return self.state.claim(key, operator(), self.run_id, expires)

    def _failed_run(self, holder: dict) -> str:
        """The id of the run holding the window, when it failed (what --rerun may take over); else refused."""
        try:
            status = self.state.run(holder["run_id"]).status
        except KeyError:
            raise Refused(f"this window is held by run {holder['run_id']} of {holder['holder']}, which is not in this "
                          f"machine's journal: rerun where it ran") from None
        if status != "failed":
            state = "passed" if status == "succeeded" else f"is {status}"
            raise Refused(f"this window's run {holder['run_id']} {state}: --rerun only takes over from a failed run")
        return holder["run_id"]

    def _sweep(self) -> str:
        swept = self.provider.sweep(time.time() - self.config.max_age)
        if swept:
            return f"terminated {len(swept)} server(s) left by earlier runs: {', '.join(swept)}"
        return "nothing left by earlier runs"

    def _launch(self) -> str:
        self.launching = True
        self.provider.launch(self.farm)
        return f"{len(self.farm.servers)} server(s): " + ", ".join(f"{s.name} ({s.id})" for s in self.farm.servers)

    def _running(self) -> str:
        self.provider.wait_running(self.farm, self.config.timeouts.launch)
        return ", ".join(f"{s.name} {s.address or '?'}" for s in self.farm.servers)

    def _ssh(self) -> str:
        deadline = time.monotonic() + self.config.timeouts.ssh
        while True:  # a new server's sshd may not answer yet
            try:
                self.farm_inventory, trusted = self._inventory_for_farm()
                break
            except (OSError, paramiko.SSHException) as exc:
                if time.monotonic() > deadline:
                    raise OverhaulError(f"no SSH host key could be read: {exc}") from None
                time.sleep(2)
        transport = Transport(self.farm_inventory)
        try:
            while True:
                failures = transport.connect([s.name for s in self.farm.servers])
                if not failures:
                    break
                if time.monotonic() > deadline:
                    raise OverhaulError("; ".join(str(e) for e in failures.values()))
                time.sleep(2)
        finally:
            transport.close()
        note = f" (trust on first use for {', '.join(trusted)}: throw-away farm)" if trusted else ""
        return f"strict SSH to {len(self.farm.servers)} server(s){note}"

    def _inventory_for_farm(self) -> tuple[Inventory, list[str]]:
        folder = Path(tempfile.mkdtemp(prefix=f"overhaul-synthetic-{self.run_id}-"))
        trusted = []
        lines = []
        for server in self.farm.servers:
            key = server.host_key
            if key is None:
                key = _first_use_key(server.address, self.config.timeouts.ssh)
                trusted.append(server.name)
            lines.append(f"{server.address} {key}\n")
        (folder / "known_hosts").write_text("".join(lines))
        key_file = self.provider.ssh_identity(self.farm) or self.config.key_file or self.inventory.ssh.key_file
        ssh = SSHSettings(user=self.config.user, key_file=key_file, known_hosts=folder / "known_hosts",
                          connect_timeout=min(10, self.config.timeouts.ssh), connect_retries=2)
        hosts = [Host(name=s.name, address=s.address, roles=[s.role]) for s in self.farm.servers]
        inventory = Inventory(environment=f"{self.environment}-synthetic", ssh=ssh, hosts=hosts)
        return inventory, trusted

    def _verify(self) -> str:
        assert self.farm_inventory is not None
        runbooks = ([self.config.setup_runbook] if self.config.setup_runbook else []) + ["verify"]
        for name in runbooks:
            params = self.config.verify_params if name == "verify" else {}
            plan = build_plan(load_runbook(name), self.farm_inventory, self.registry, params)
            transport = Transport(self.farm_inventory)
            runner = Runner(plan, transport, listeners=[Told(self.publish)])
            self._verifying = (runner, transport)
            try:
                if self._verify_cancelled.is_set():
                    raise OverhaulError("verify was cancelled")
                result = runner.run()
            finally:
                self._verifying = None
                transport.close()
            order = [server.name for server in self.farm.servers]
            failed = sorted((r for r in result.results if r.outcome is Outcome.FAILED), key=lambda r: order.index(r.host))
            if failed or result.stopped_at:
                detail = "; ".join(f"{r.stage} on {r.host}: {r.message}" for r in failed) or result.stop_reason
                raise OverhaulError(f"runbook {name!r} failed: {detail}")
        return f"{' + '.join(runbooks)} passed on every server"

    def _cancel_verify(self) -> None:
        """Stop the verify phase's runner (it was given up): start nothing new, cut the connections."""
        self._verify_cancelled.set()
        if self._verifying is not None:
            runner, transport = self._verifying
            runner.request_stop()
            transport.close()

    def _endpoints(self) -> str:
        if not self.config.endpoints:
            return "no endpoints configured"
        assert self.farm_inventory is not None
        addresses = {s.name: s.address for s in self.farm.servers}
        targets = [endpoint.format(**addresses) for endpoint in self.config.endpoints]
        transport = Transport(self.farm_inventory)
        problems: dict[tuple[str, str], list[str]] = {}  # (target, why) -> the servers that could not reach it
        try:
            for server in self.farm.servers:
                host = transport.host(server.name)
                for target in targets:
                    address, _, port = target.rpartition(":")
                    probe = sh("timeout {seconds} bash -c {script} _ {address} {port}", script='</dev/tcp/"$1"/"$2"',
                               seconds=self.config.timeouts.endpoints, address=address, port=port)
                    result = host.run(probe)
                    if not result.ok:
                        why = unreachable(result, self.config.timeouts.endpoints)
                        problems.setdefault((target, why), []).append(server.name)
        finally:
            transport.close()
        if problems:
            raise OverhaulError("; ".join(f"{', '.join(servers)} cannot reach {target}: {why}"
                                          for (target, why), servers in problems.items()))
        return f"every server reaches {', '.join(targets)}"

    def _teardown(self) -> PhaseFailed | None:
        if not self.launching:
            return None
        for name, action in (("terminate", self._terminate),
                             ("terminated", lambda: self.provider.wait_terminated(self.farm, self.config.timeouts.terminate))):
            for _attempt in range(3):  # a signal during teardown must not stop it: do the same action again
                try:
                    self._phase(name, action)
                    break
                except PhaseFailed as exc:
                    ids = ", ".join(s.id for s in self.farm.servers) or f"any tagged {TAG}={self.run_id}"
                    self._say(f"LEAK: servers may still run: {ids} (the next run's sweep will retry)")
                    return exc
                except (Terminated, KeyboardInterrupt):
                    self._say(f"   {name}: signal received during teardown; carrying on")
        return None

    def _terminate(self) -> str:
        """The provider's terminate, tried again with backoff until it works or `timeouts.terminate` has passed."""
        def retrying(state: Any) -> None:
            self._say(f"   terminate: {state.outcome.exception()}; trying again")

        for attempt in Retrying(stop=stop_before_delay(self.config.timeouts.terminate), reraise=True,
                                wait=wait_exponential_jitter(multiplier=1, max=30, jitter=1), before_sleep=retrying):
            with attempt:
                self.provider.terminate(self.farm)
        return f"{len(self.farm.servers)} server(s): {', '.join(s.id for s in self.farm.servers)}"

    def _finish(self, failure: PhaseFailed | None) -> int:
        succeeded = failure is None
        self.state.set_status(self.run_id, "succeeded" if succeeded else "failed", time.time())
        if self.config.metrics_file:
            try:
                write_metrics(self.config.metrics_file, self.environment, self.phases, failure.phase if failure else None)
            except OSError as exc:  # the test's own result stands
                self._say(f"warning: the metrics could not be written to {self.config.metrics_file}: {exc}")
        self._notify(failure)
        if failure:
            self._say(f"synthetic {self.environment}: FAILED in phase {failure.phase}: {failure.message}")
        else:
            self._say(f"synthetic {self.environment}: passed ({len(self.farm.servers)} servers launched, proven, "
                      "terminated)")
        self._say(self._ending(failure))
        return EXIT_CODES[failure.phase] if failure else 0

    def _ending(self, failure: PhaseFailed | None) -> str:
        """The last line, as every run ends (overhaul.report.ending): run id, status, counts, details, way on."""
        counts = {status: sum(p.status == status for p in self.phases) for status in ("ok", "failed", "skipped")}
        line = (f"run {self.run_id} {'failed' if failure else 'succeeded'} in {time.monotonic() - self.began:.1f} s: "
                f"phases {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped; "
                f"details: overhaul show {self.run_id}")
        if failure:
            line += (f"\nafter repairing the cause, run again in this window: overhaul synthetic --env {self.environment} "
                     "--rerun")
        return line

    def _webhook_url(self) -> str | None:
        """The webhook's URL, read and checked before the run claims anything (a bad one is an input error)."""
        reference = self.config.webhook
        if reference is None:
            return None
        try:
            return alerts.check_webhook(reference.resolve())
        except OverhaulError as exc:
            raise OverhaulError(f"{self.inventory.path}: synthetic.webhook ({reference.describe()}): {exc}") from None

    def _notify(self, failure: PhaseFailed | None) -> None:
        if self.webhook is None:
            return
        earlier = [r for r in self.state.runs(self.environment, limit=50) if r.runbook == "synthetic" and r.id != self.run_id
                   and r.status in ("succeeded", "failed")]
        recovered = failure is None and bool(earlier) and earlier[0].status == "failed"
        if failure is None and not recovered:
            return
        text = (f"Overhaul synthetic test of {self.environment} FAILED in phase {failure.phase}: {failure.message} "
                f"(run {self.run_id})" if failure else
                f"Overhaul synthetic test of {self.environment} recovered: passed (run {self.run_id})")
        text += f". Details: overhaul show {self.run_id}"
        try:
            alerts.notify(self.webhook, text)
        except OverhaulError as exc:
            self._say(f"warning: {exc}")


# What bash says when /dev/tcp cannot connect, and how a person says it (the first that matches).
CONNECT_ERRORS = (("Connection refused", "connection refused"),
                  ("Connection reset", "connection reset"),
                  ("Name or service not known", "DNS: no such name"),
                  ("No address associated", "DNS: the name has no address"),
                  ("Temporary failure in name resolution", "DNS: the name could not be resolved (temporary failure)"),
                  ("No route to host", "no route to host"),
                  ("Network is unreachable", "network unreachable"))


def unreachable(result: CommandResult, seconds: float) -> str:
    """Why an endpoint probe (`timeout N bash -c '</dev/tcp/...'`) failed: refused, timed out, DNS, reset, no route."""
    if result.exited == 124 or result.timed_out:  # 124: `timeout` ended it
        return f"timed out after {seconds:g} s (timeouts.endpoints)"
    for said, words in CONNECT_ERRORS:
        if said in result.stderr:
            return words
    return f"exit {result.exited}: {result.tail(200)}"


PREFIX = "overhaul_synthetic"


def write_metrics(path: Path, environment: str, phases: list[PhaseResult], failed_phase: str | None) -> None:
    """The test's series of `environment` in the textfile (other environments' kept); the last success time
    survives a failed run."""
    label, now = {"environment": environment}, round(time.time())
    with alerts.edit_textfile(path) as metrics:
        metrics.gauge(f"{PREFIX}_success", "1 if the last synthetic farm-launch test passed, else 0").set(
            label, failed_phase is None)
        metrics.gauge(f"{PREFIX}_last_run_timestamp_seconds", "When the last synthetic test ended").set(label, now)
        last_success = metrics.gauge(f"{PREFIX}_last_success_timestamp_seconds", "When a synthetic test last passed (0: never)")
        last_success.set(label, now if failed_phase is None else last_success.get(label) or 0)
        durations = metrics.gauge(f"{PREFIX}_phase_duration_seconds", "How long each phase of the last test took")
        durations.clear(label)
        for phase in phases:
            if phase.status != "skipped":
                durations.set({**label, "phase": phase.name}, round(phase.seconds, 3))
        failed = metrics.gauge(f"{PREFIX}_failed_phase", "The phase that failed in the last test (1), if any")
        failed.clear(label)
        if failed_phase:
            failed.set({**label, "phase": failed_phase}, 1)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _within(seconds: float, action: Callable[[], str | None], cancel: Callable[[], None] | None, setting: str) -> str | None:
    """`action()` in a thread of its own, given up after `seconds` (a thread cannot be killed: `cancel` asks it to end)."""
    done: dict[str, Any] = {}

    def target() -> None:
        try:
            done["value"] = action()
        except BaseException as exc:  # handed to the caller's thread
            done["error"] = exc

    worker = threading.Thread(target=target, name="synthetic-phase", daemon=True)
    worker.start()
    try:
        worker.join(seconds)
    except BaseException:  # SIGTERM or Ctrl-C while waiting: the phase is abandoned either way
        if cancel:
            cancel()
        raise
    if worker.is_alive():
        if cancel:
            cancel()
        raise OverhaulError(f"not done within {seconds:g} s ({setting})")
    if "error" in done:
        raise done["error"]
    return done.get("value")


def _first_use_key(address: str, timeout: float) -> str:
    """The host key the server offers, taken on trust (only for servers this run just launched)."""
    sock = socket.create_connection((address, 22), timeout=timeout)
    transport = paramiko.Transport(sock)
    try:
        transport.start_client(timeout=timeout)
        key = transport.get_remote_server_key()
        return f"{key.get_name()} {key.get_base64()}"
    finally:
        transport.close()


def workdir_default() -> Path:
    return Path(os.environ.get("OVERHAUL_SYNTHETIC_DIR", ".overhaul/synthetic"))
