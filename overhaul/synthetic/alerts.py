"""What a synthetic run tells the outside: Prometheus textfile metrics and a Slack-compatible webhook."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

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


def notify(url: str, text: str, timeout: float = 10) -> None:
    """POST {"text": ...} (what Slack incoming webhooks and compatible receivers take)."""
    request = urllib.request.Request(url, data=json.dumps({"text": text}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        reply.read()
