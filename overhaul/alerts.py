"""What runs tell the outside: a Slack-compatible webhook and Prometheus textfile metrics.

One module for every run of a runbook (the inventory's `notify:` section, `RunNotifier`) and for the nightly
synthetic test (its `synthetic.webhook` and `synthetic.metrics_file`). A webhook URL is a secret (a Slack webhook's
path is its token): nothing here puts it in an error, a problem string or a log line.
"""

from __future__ import annotations

import base64
import fcntl
import http.client
import ipaddress
import json
import math
import os
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from overhaul.errors import OverhaulError
from overhaul.secrets import Redactor, SecretRef

if TYPE_CHECKING:
    from overhaul.inventory import Inventory

Event = Literal["start", "success", "failure", "refusal", "rollback", "interrupted"]
EVENTS: tuple[Event, ...] = get_args(Event)
Status = Literal["succeeded", "partial", "failed", "refused", "interrupted", "rolled back"]
EVENT_OF: dict[str, Event] = {"succeeded": "success", "partial": "failure", "failed": "failure", "refused": "refusal",
                              "interrupted": "interrupted", "rolled back": "rollback"}  # partial: not a success


# -- the inventory's `notify:` section ------------------------------------------------------------------------------

class _Section(BaseModel):
    """Unknown keys are errors; the docstring under each field is its description in the published schema."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class WebhookSettings(_Section):
    """A Slack-compatible incoming webhook (Slack, Mattermost, Rocket.Chat, a relay of your own)."""

    url_secret: SecretRef
    """The webhook's URL, by reference ({env: VAR}, {file: PATH}, ...): https://, or http:// to a loopback address."""
    timeout: float = Field(5, gt=0, le=60)
    """Seconds each POST may take; a failed POST is tried once more, and a second failure never fails the run."""


class MetricsSettings(_Section):
    """Prometheus metrics written for node_exporter's textfile collector."""

    textfile: Path
    """The .prom file (in node_exporter's --collector.textfile.directory); relative to the inventory file.
    Series of other environments and runbooks in it are kept."""


class NotifyConfig(_Section):
    """Who hears about this environment's runs: a webhook on the chosen events, and textfile metrics after each run."""

    webhook: WebhookSettings | None = None
    """Where run messages are POSTed (optional)."""
    events: list[Event] = list(EVENTS)
    """The events posted to the webhook: start, success, failure, refusal, rollback, interrupted (default: all)."""
    metrics: MetricsSettings | None = None
    """Where each run's metrics are written (optional)."""


# -- the webhook ----------------------------------------------------------------------------------------------------

def check_webhook(url: str) -> str:
    """`url` if it is a webhook Overhaul posts to: https, or http to a loopback address (a local relay, a test).

    Errors name the scheme and host, never the URL.
    """
    url = url.strip()
    try:
        parts = urllib.parse.urlsplit(url)
        host, _port = parts.hostname, parts.port  # .port raises ValueError on a bad port
    except ValueError as exc:
        raise OverhaulError(f"the webhook is not a valid URL: {exc}") from None
    if not host or any(ch.isspace() for ch in url):
        raise OverhaulError("the webhook is not a valid URL: expected https://HOST/PATH")
    if parts.scheme == "https" or (parts.scheme == "http" and _loopback(host)):
        return url
    raise OverhaulError(f"the webhook must be https:// (http:// only to a loopback address), got {parts.scheme or 'no'} "
                        f"scheme to host {host}")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an error: urllib would follow it as a GET without the message and call that delivered."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def notify(url: str, text: str, fields: dict | None = None, timeout: float = 5, wait: float = 1) -> None:
    """POST {"text": text, **fields} (what Slack incoming webhooks and compatible receivers take).

    A URL's userinfo (https://user:token@relay/...) is sent as HTTP Basic authorization, not as part of the address.

    A failure is tried once more after about `wait` seconds; a second failure raises OverhaulError, whose
    message names the webhook's scheme and host and the reason, never its URL.
    """
    url = check_webhook(url)
    target, authorization = split_userinfo(url)
    headers = {"Content-Type": "application/json", **({"Authorization": authorization} if authorization else {})}
    request = urllib.request.Request(target, data=json.dumps({"text": text, **(fields or {})}).encode(), method="POST",
                                     headers=headers)
    try:
        for attempt in Retrying(stop=stop_after_attempt(2), reraise=True,
                                wait=wait_exponential_jitter(multiplier=wait, max=5 * wait, jitter=wait / 2),
                                retry=retry_if_exception_type((OSError, http.client.HTTPException))):
            with attempt, _OPENER.open(request, timeout=timeout) as reply:
                reply.read()
    except (OSError, http.client.HTTPException) as exc:
        parts = urllib.parse.urlsplit(url)
        problem = f"the webhook ({parts.scheme}://{parts.hostname}) was not told after 2 attempts: {_reason(exc, timeout)}"
        raise OverhaulError(_without(problem, url)) from None


def _reason(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        body = ""
        with suppress(OSError, http.client.HTTPException):  # the answer's body only explains (Slack: invalid_token)
            body = exc.read(200).decode(errors="replace").strip()
        return f"HTTP {exc.code} {exc.reason}" + (f": {body}" if body else "")
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout:g} s"
    return str(reason) or type(reason).__name__


def split_userinfo(url: str) -> tuple[str, str | None]:
    """`url` without its userinfo, and the HTTP Basic `Authorization` value that userinfo makes (None: it has none)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
    return urllib.parse.urlunsplit(parts._replace(netloc=host)), "Basic " + base64.b64encode(pair.encode()).decode()


def learn_webhook(redactor: Redactor, url: str) -> None:
    """Tell `redactor` a webhook's URL: the URL itself, its userinfo's password (the Redactor finds it in any URL it
    is told), and the URL without the userinfo (what is posted to), whose path is a Slack webhook's token."""
    redactor.add(url)
    redactor.add(split_userinfo(url)[0])


def _without(text: str, url: str) -> str:
    """`text` with the URL, its userinfo and its path (the token), in their common encodings, replaced by ********."""
    secret = Redactor()
    learn_webhook(secret, url)
    path = urllib.parse.urlsplit(url).path.strip("/")
    if path:
        secret.add(path)
    return secret(text)


# -- Prometheus textfile metrics ------------------------------------------------------------------------------------

Labels = tuple[tuple[str, str], ...]
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?$")
_LABEL = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_ESCAPES = {"\\": "\\\\", "\n": "\\n", '"': '\\"'}


@dataclass
class Gauge:
    """One metric family of a textfile: its help, its type and its series (labels -> value)."""

    name: str
    help: str
    type: str = "gauge"
    series: dict[Labels, float] = field(default_factory=dict)

    def set(self, labels: dict[str, str], value: float) -> None:
        self.series[_key(labels)] = float(value)

    def get(self, labels: dict[str, str]) -> float | None:
        return self.series.get(_key(labels))

    def clear(self, where: dict[str, str]) -> None:
        """Drop every series whose labels include `where` (e.g. all phases of one environment)."""
        self.series = {labels: value for labels, value in self.series.items() if not set(where.items()) <= set(labels)}

    def lines(self) -> list[str]:
        rendered = [f"{self.name}{_labels(labels)} {_number(value)}" for labels, value in sorted(self.series.items())]
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.type}", *rendered]


class Textfile:
    """The metric families of a textfile-collector file, in the order they appear."""

    def __init__(self, text: str = ""):
        self.families: dict[str, Gauge] = {}
        for line in text.splitlines():
            self._read(line.strip())

    def gauge(self, name: str, help: str) -> Gauge:
        """The family `name` (created when new), with `help` as its help text from now on."""
        family = self.families.setdefault(name, Gauge(name, help))
        family.help = help
        return family

    def render(self) -> str:
        return "".join(line + "\n" for family in self.families.values() for line in family.lines())

    def _read(self, line: str) -> None:
        # Lines of another shape (other comments, a half-written line) are dropped: the file is Overhaul's own.
        words = line.split(maxsplit=3)
        if len(words) >= 3 and words[0] == "#" and words[1] in ("HELP", "TYPE"):
            family = self.families.setdefault(words[2], Gauge(words[2], ""))
            if words[1] == "HELP":
                family.help = words[3] if len(words) > 3 else ""
            else:
                family.type = words[3] if len(words) > 3 else "untyped"
            return
        match = _SAMPLE.match(line)
        if match:
            name, labels, value = match.groups()
            with suppress(ValueError):  # not a number
                self.families.setdefault(name, Gauge(name, "")).series[_parse_labels(labels or "")] = float(value)


def _key(labels: dict[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{name}="{_escape(value)}"' for name, value in labels) + "}"


def _escape(value: str) -> str:
    return re.sub(r'[\\\n"]', lambda match: _ESCAPES[match[0]], value)


def _parse_labels(text: str) -> Labels:
    pairs = []
    for name, value in _LABEL.findall(text):
        pairs.append((name, re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], value)))
    return tuple(sorted(pairs))


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if value.is_integer() else repr(value)


@contextmanager
def edit_textfile(path: Path) -> Iterator[Textfile]:
    """The file's metrics to change; written back atomically (temp file + rename) when the block ends without error.

    Writers of the same file (runs of other environments, the synthetic test) take turns on a lock file beside it,
    so none loses another's series. node_exporter reads only *.prom: it never sees the lock or a temp file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        metrics = Textfile(path.read_text(errors="replace") if path.exists() else "")
        yield metrics
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w") as out:
                out.write(metrics.render())
            os.chmod(temp, 0o644)  # node_exporter runs as its own user
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise


# -- every run of a runbook -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunInfo:
    """What identifies a run in its messages and metrics (plain values, as the journal has them)."""

    environment: str
    runbook: str
    run_id: str
    operator: str
    version_from: str | None = None  # the environment's version before the run, when known
    version_to: str | None = None  # the version the run goes to, when it has one
    limit: str | None = None  # --limit: the run was kept to some hosts (the environment's version metric stays)

    @property
    def show(self) -> str:
        """Where to read the run: `overhaul show`, and its web page when the project has one (web.url)."""
        from overhaul.settings import run_page

        page = run_page(self.run_id)
        return f"overhaul show {self.run_id}" + (f" or {page}" if page else "")

    def versions(self) -> str:
        if not self.version_from and not self.version_to:
            return ""
        return f"version {self.version_from or '?'} -> {self.version_to or '?'}"


METRICS = {  # name: help (every series labelled environment and runbook)
    "overhaul_run_last_timestamp_seconds": "When the last run of the runbook on the environment ended",
    "overhaul_run_last_success_timestamp_seconds": "When a run of the runbook on the environment last succeeded (0: never)",
    "overhaul_run_duration_seconds": "How long the last run of the runbook on the environment took",
    "overhaul_run_failed_pairs": "(stage, host) pairs that failed in the last run of the runbook on the environment",
    "overhaul_run_status": "1 for the status the last run of the runbook on the environment ended with",
}
VERSION_METRIC = "overhaul_environment_version"
VERSION_HELP = "1 for the version the environment is at (after its last successful run or rollback that had one)"


class RunNotifier:
    """Tells the inventory's `notify:` receivers about a run; what goes wrong there never raises nor fails the run.

    Each problem (the webhook not told, the metrics not written) is passed to `on_problem` (to journal it) and
    returned by the call that met it; its text never holds the webhook's URL.
    """

    def __init__(self, config: NotifyConfig | None, webhook_url: str | None = None,
                 on_problem: Callable[[str], None] | None = None, retry_wait: float = 1,
                 redactor: Redactor | None = None):
        self.config = config or NotifyConfig()
        self.webhook_url = webhook_url
        self.on_problem = on_problem
        self.retry_wait = retry_wait
        self.redactor = redactor  # the run's: a problem's text may quote any secret of the run

    @classmethod
    def for_inventory(cls, inventory: Inventory, on_problem: Callable[[str], None] | None = None,
                      redactor: Redactor | None = None) -> RunNotifier:
        """The inventory's notifier, its webhook URL read and checked now: a missing or bad one is an input error
        (OverhaulError) before the run starts. `redactor` learns the URL and its userinfo's password (see
        `learn_webhook`), so no log or journal line shows them, and redacts each problem this notifier reports."""
        config = inventory.notify
        url = None
        if config is not None and config.webhook is not None:
            reference = config.webhook.url_secret
            try:
                url = check_webhook(reference.resolve())
            except OverhaulError as exc:
                raise OverhaulError(f"{inventory.path}: notify.webhook.url_secret ({reference.describe()}): {exc}") from None
            if redactor is not None:
                learn_webhook(redactor, url)
        return cls(config, url, on_problem, redactor=redactor)

    def started(self, run: RunInfo) -> list[str]:
        """The `start` message."""
        return self._post("start", run, "started", "", {})

    def ended(self, run: RunInfo, status: Status, duration: float, failed_hosts: list[str] | None = None,
              failed_pairs: int = 0, reasons: list[str] | None = None) -> list[str]:
        """The run's metrics, then its message (success, failure, refusal, rollback or interrupted).

        `failed_hosts`: the hosts with a failed pair; `reasons`: why a refused run was refused.
        """
        if status not in EVENT_OF:
            raise ValueError(f"unknown run status {status!r} (expected one of {', '.join(EVENT_OF)})")
        problems = self._write_metrics(run, status, duration, failed_pairs)
        failed_hosts, reasons = sorted(set(failed_hosts or [])), list(reasons or [])
        why = [f"failed hosts: {', '.join(failed_hosts)}"] if failed_hosts else []
        why += reasons[:5] + ([f"and {len(reasons) - 5} more"] if len(reasons) > 5 else [])
        facts = {"status": status, "duration_seconds": round(duration, 3), "failed_hosts": failed_hosts,
                 "failed_pairs": failed_pairs, "reasons": reasons}
        return problems + self._post(EVENT_OF[status], run, _outcome(status, duration), "; ".join(why), facts)

    def _post(self, event: Event, run: RunInfo, outcome: str, why: str, facts: dict) -> list[str]:
        """POST "Overhaul: RUNBOOK on ENV OUTCOME (by, version, run)[: WHY]. Details: overhaul show RUN" with `facts`."""
        if self.webhook_url is None or event not in self.config.events:
            return []
        limited = f"limited to {run.limit}" if run.limit else ""
        about = ", ".join(part for part in (f"by {run.operator}", run.versions(), limited, f"run {run.run_id}") if part)
        show = run.show  # (reads the project's settings: once)
        text = f"Overhaul: {run.runbook} on {run.environment} {outcome} ({about}){': ' + why if why else ''}. " \
               f"Details: {show}"
        facts = {"event": event, "environment": run.environment, "runbook": run.runbook, "run_id": run.run_id,
                 "operator": run.operator, "version_from": run.version_from, "version_to": run.version_to,
                 "limit": run.limit, **facts,
                 "show": show}
        shown = {name: value for name, value in facts.items() if value not in (None, [], "")}
        attachment = {"color": "good" if event in ("start", "success") else "danger",
                      "fields": [{"title": name, "value": _shown(value), "short": len(_shown(value)) < 40}
                                 for name, value in shown.items()]}
        try:
            notify(self.webhook_url, text, {"attachments": [attachment], "overhaul": facts},
                   timeout=self.config.webhook.timeout if self.config.webhook else 5, wait=self.retry_wait)
        except Exception as exc:  # not only OverhaulError: nothing a receiver does may end the run
            return self._problem(f"{event} message: {exc}")
        return []

    def _write_metrics(self, run: RunInfo, status: str, duration: float, failed_pairs: int) -> list[str]:
        if self.config.metrics is None:
            return []
        path, labels, now = self.config.metrics.textfile, {"environment": run.environment, "runbook": run.runbook}, time.time()
        try:
            with edit_textfile(path) as metrics:
                gauges = {name: metrics.gauge(name, help) for name, help in METRICS.items()}
                gauges["overhaul_run_last_timestamp_seconds"].set(labels, round(now))
                last_success = gauges["overhaul_run_last_success_timestamp_seconds"]
                last_success.set(labels, round(now) if status == "succeeded" else last_success.get(labels) or 0)
                gauges["overhaul_run_duration_seconds"].set(labels, round(duration, 3))
                gauges["overhaul_run_failed_pairs"].set(labels, failed_pairs)
                gauges["overhaul_run_status"].clear(labels)
                gauges["overhaul_run_status"].set({**labels, "status": status}, 1)
                version = {"succeeded": run.version_to, "rolled back": run.version_from}.get(status)
                if version and not run.limit:
                    environment = {"environment": run.environment}
                    metrics.gauge(VERSION_METRIC, VERSION_HELP).clear(environment)
                    metrics.gauge(VERSION_METRIC, VERSION_HELP).set({**environment, "version": version}, 1)
        except Exception as exc:  # a full disk, a bad folder: told, never the end of the run
            return self._problem(f"metrics: cannot write {path}: {exc}")
        return []

    def _problem(self, problem: str) -> list[str]:
        if self.webhook_url:
            problem = _without(problem, self.webhook_url)
        if self.redactor is not None:
            problem = self.redactor(problem)
        if self.on_problem is not None:
            try:
                self.on_problem(problem)
            except Exception as exc:  # the journal may be what is down: the caller still gets the problem back
                problem += f" (and it could not be recorded: {exc})"
        return [problem]


def _outcome(status: str, duration: float) -> str:
    took = _duration(duration)
    return {"succeeded": f"succeeded in {took}", "failed": f"FAILED after {took}",
            "partial": f"was left PARTIAL after {took} (a host it had changed was left out; resumable)",
            "refused": "was REFUSED before any change", "interrupted": f"was INTERRUPTED after {took} (resumable)",
            "rolled back": f"was ROLLED BACK after {took}"}[status]


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m {rest:02d}s" if minutes else f"{seconds:.1f} s"


def _shown(value: object) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)

