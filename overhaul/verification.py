"""`overhaul verify`: the built-in verify runbook plus the operator's testinfra checks, in one report.

The checks folder runs in one pytest session over every host (testinfra parametrizes each check by
host), its connections opened in parallel at the start and reused by every check; starting Python,
pytest and testinfra once instead of once per host is most of the cost of checks at scale. Results
become one case per (check, host): printed, and written as JUnit XML and JSON for CI and dashboards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from overhaul.runner import RunResult
from overhaul.step import Outcome


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


def run_checks(env: str, hosts_dir: str, checks: Path, hosts: list[str], processes: int = 1,
               extra_vars: dict | None = None) -> list[Case]:
    """Run the checks folder against every host and collect one case per (check, host).

    One pytest session for all hosts by default; `processes` splits the hosts among that many sessions
    run side by side (for very large farms on a controller with many cores).
    """
    groups = [hosts[i::processes] for i in range(max(1, min(processes, len(hosts))))]
    with tempfile.TemporaryDirectory(prefix="overhaul-checks-") as tmp:
        def one(index: int) -> list[Case]:
            group = groups[index]
            report = Path(tmp) / f"checks-{index}.xml"
            env_vars = dict(os.environ, OVERHAUL_CHECKS_VARS=json.dumps(extra_vars or {}))
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", str(checks), "-q", "-p", "no:cacheprovider", "--overhaul-env", env,
                 "--overhaul-hosts-dir", hosts_dir, "--overhaul-only", ",".join(group), f"--junitxml={report}"],
                capture_output=True, text=True, env=env_vars,
            )
            if proc.returncode not in (0, 1, 5) or not report.exists():
                tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
                return [Case("checks", host, "failed", f"pytest exited {proc.returncode}: " + " | ".join(tail),
                             source=str(checks)) for host in group]
            return _cases_from_junit(report, str(checks))

        with ThreadPoolExecutor(max_workers=len(groups)) as pool:
            return [case for cases in pool.map(one, range(len(groups))) for case in cases]


def _cases_from_junit(report: Path, source: str) -> list[Case]:
    """One case per testcase; the host is testinfra's parameter: `test_x[overhaul://db1]`."""
    cases = []
    for element in ET.parse(report).getroot().iter("testcase"):
        name, _, param = element.get("name", "?").partition("[")
        host = param.rstrip("]").removeprefix("overhaul://") or "?"
        module = element.get("classname", "").rsplit(".", 1)[-1]
        problem = element.find("failure")
        if problem is None:
            problem = element.find("error")
        skipped = element.find("skipped")
        detail = ""
        if problem is not None:
            status, message = "failed", (problem.get("message") or problem.text or "").strip().splitlines()[0:1]
            detail = (problem.text or "").strip()
        elif skipped is not None:
            status, message = "skipped", [skipped.get("message", "").removeprefix("Skipped: ")]
        else:
            status, message = "passed", []
        cases.append(Case(f"{module}::{name}", host, status, " ".join(message)[:300],
                          float(element.get("time", 0)), source, detail))
    return cases


def print_summary(cases: list[Case], stream: TextIO = sys.stdout) -> None:
    checks = [c for c in cases if c.source != "runbook"]
    if checks:
        print(f"\n== checks ({len({c.check for c in checks})} checks x {len({c.host for c in checks})} hosts)",
              file=stream)
        for case in checks:
            print(f"   {case.host:<14} {case.status:<8} {case.check}{': ' + case.message if case.message else ''}",
                  file=stream)
    counts = {status: sum(1 for c in cases if c.status == status) for status in ("passed", "failed", "skipped")}
    print(f"\nverify: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
          f"({len(cases)} checks x hosts)", file=stream)
    for case in cases:
        if case.status == "failed":
            print(f"FAILED {case.check} on {case.host}: {case.message}", file=stream)


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
