"""What a synthetic run tells the outside: Prometheus textfile metrics and a Slack-compatible webhook."""

from __future__ import annotations

import ipaddress
import json
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_fixed

from overhaul.errors import OverhaulError

PREFIX = "overhaul_synthetic"


def write_metrics(path: Path, environment: str, succeeded: bool, phases: list[tuple[str, str, float]],
                  failed_phase: str | None) -> None:
    """Write the textfile-collector file atomically; the last success time survives a failed run."""
    label = f'environment="{environment}"'
    last_success = time.time() if succeeded else _previous_last_success(path, label)
    lines = [
        f"# HELP {PREFIX}_success 1 if the last synthetic farm-launch test passed, else 0",
        f"# TYPE {PREFIX}_success gauge", f"{PREFIX}_success{{{label}}} {int(succeeded)}",
        f"# HELP {PREFIX}_last_run_timestamp_seconds When the last synthetic test ended",
        f"# TYPE {PREFIX}_last_run_timestamp_seconds gauge", f"{PREFIX}_last_run_timestamp_seconds{{{label}}} {time.time():.0f}",
        f"# HELP {PREFIX}_last_success_timestamp_seconds When a synthetic test last passed (0: never)",
        f"# TYPE {PREFIX}_last_success_timestamp_seconds gauge",
        f"{PREFIX}_last_success_timestamp_seconds{{{label}}} {last_success:.0f}",
        f"# HELP {PREFIX}_phase_duration_seconds How long each phase of the last test took",
        f"# TYPE {PREFIX}_phase_duration_seconds gauge",
    ]
    lines += [f'{PREFIX}_phase_duration_seconds{{{label},phase="{name}"}} {seconds:.3f}'
              for name, status, seconds in phases if status != "skipped"]
    lines += [f"# HELP {PREFIX}_failed_phase The phase that failed in the last test (1), if any",
              f"# TYPE {PREFIX}_failed_phase gauge"]
    if failed_phase:
        lines.append(f'{PREFIX}_failed_phase{{{label},phase="{failed_phase}"}} 1')
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.rename(path)


def _previous_last_success(path: Path, label: str) -> float:
    if not path.exists():
        return 0.0
    pattern = re.compile(rf"^{PREFIX}_last_success_timestamp_seconds\{{{re.escape(label)}\}} (\S+)$", re.M)
    match = pattern.search(path.read_text())
    return float(match.group(1)) if match else 0.0


def check_webhook(url: str) -> str:
    """`url` if it is a webhook Overhaul posts to: https, or http to a loopback address (a local relay, a test).

    The URL is a secret (a Slack webhook's path is its token): errors name the scheme and host, never the URL.
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


def notify(url: str, text: str, timeout: float = 10) -> None:
    """POST {"text": ...} (what Slack incoming webhooks and compatible receivers take); one retry on failure."""
    request = urllib.request.Request(check_webhook(url), data=json.dumps({"text": text}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    for attempt in Retrying(stop=stop_after_attempt(2), wait=wait_fixed(1), retry=retry_if_exception_type(OSError),
                            reraise=True):
        with attempt, urllib.request.urlopen(request, timeout=timeout) as reply:
            reply.read()
