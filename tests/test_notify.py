"""Run notifications and metrics (the inventory's `notify:` section): a real webhook receiver on loopback, a real
textfile on disk, the webhook's URL never shown."""

from __future__ import annotations

import re
import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import overhaul_cli, write
from webhook import Receiver, closed_port, receiving

from overhaul.alerts import MetricsSettings, NotifyConfig, RunInfo, RunNotifier, WebhookSettings
from overhaul.errors import ConfigError, OverhaulError
from overhaul.inventory import load_inventory_file
from overhaul.secrets import Redactor
from overhaul.state import SQLiteState
from overhaul.synthetic.run import PhaseResult, write_metrics

TOKEN = "T0001/B0002/s3cr3t-token"  # a Slack webhook's path is its token
UPGRADE = RunInfo(environment="production", runbook="upgrade", run_id="20261123T140000-abc123", operator="alice@ci",
                  version_from="1.0.0", version_to="1.1.0")


@pytest.fixture
def receiver():
    with receiving() as port:
        yield f"http://127.0.0.1:{port}/services/{TOKEN}"


def inventory(folder: Path, notify: str, env: dict | None = None):
    """hosts/production.yaml with the given `notify:` section (unindented, one setting a line)."""
    write(folder / "hosts/known_hosts", "")
    section = "".join(f"  {line.strip()}\n" for line in notify.strip().splitlines())
    path = write(folder / "hosts/production.yaml", "environment: production\nssh: {known_hosts: known_hosts}\n"
                 "hosts:\n  - {name: db1, address: 10.0.1.10, roles: [db]}\nnotify:\n" + section)
    return load_inventory_file(path)


def secret_file(path: Path, url: str) -> Path:
    write(path, url + "\n").chmod(0o600)
    return path


def read_metrics(path: Path) -> dict[tuple[str, frozenset], float]:
    """The samples of a Prometheus text file, parsed here by hand: {(name, labels): value}; each under its # TYPE."""
    samples, typed = {}, set()
    for line in path.read_text().splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
        elif line and not line.startswith("#"):
            match = re.fullmatch(r'(\w+)\{((?:\w+="[^"]*",?)*)\} (\S+)', line)
            assert match, line
            assert match[1] in typed, f"{match[1]} has no # TYPE line before it"
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match[2]))
            samples[(match[1], labels)] = float(match[3])
    return samples


def series(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


# -- the webhook ---------------------------------------------------------------------------------------------------

def test_start_and_failure_messages_reach_a_webhook_on_loopback_with_every_field(tmp_path, receiver):
    secret_file(tmp_path / "hosts/webhook.url", receiver)
    notifier = RunNotifier.for_inventory(inventory(tmp_path, "webhook: {url_secret: {file: webhook.url}}"),
                                         on_problem=pytest.fail)
    assert notifier.started(UPGRADE) == []
    assert notifier.ended(UPGRADE, "failed", 75.2, failed_hosts=["app2", "app1", "app2"], failed_pairs=3) == []

    (start_path, start_headers, start), (end_path, _, end) = Receiver.received
    assert start_path == end_path == f"/services/{TOKEN}" and start_headers["Content-Type"] == "application/json"
    print("\n" + start["text"] + "\n" + end["text"])
    assert start["text"] == ("Overhaul: upgrade on production started (by alice@ci, version 1.0.0 -> 1.1.0, "
                             "run 20261123T140000-abc123). Details: overhaul show 20261123T140000-abc123")
    assert start["overhaul"] == {"event": "start", "environment": "production", "runbook": "upgrade",
                                 "run_id": UPGRADE.run_id, "operator": "alice@ci", "version_from": "1.0.0",
                                 "version_to": "1.1.0", "limit": None, "show": f"overhaul show {UPGRADE.run_id}"}
    assert end["text"] == ("Overhaul: upgrade on production FAILED after 1m 15s (by alice@ci, version 1.0.0 -> 1.1.0, "
                           f"run {UPGRADE.run_id}): failed hosts: app1, app2. Details: overhaul show {UPGRADE.run_id}")
    assert end["overhaul"] == {**start["overhaul"], "event": "failure", "status": "failed", "duration_seconds": 75.2,
                               "failed_hosts": ["app1", "app2"], "failed_pairs": 3, "reasons": []}
    fields = {f["title"]: f["value"] for f in end["attachments"][0]["fields"]}  # what Slack shows as a table
    assert fields["failed_hosts"] == "app1, app2" and fields["version_to"] == "1.1.0" and "reasons" not in fields
    assert end["attachments"][0]["color"] == "danger" and start["attachments"][0]["color"] == "good"


def test_only_the_chosen_events_are_posted_and_a_refusal_says_why(tmp_path, receiver, monkeypatch):
    monkeypatch.setenv("PROD_HOOK", receiver)
    notifier = RunNotifier.for_inventory(inventory(tmp_path, """
        webhook: {url_secret: {env: PROD_HOOK}}
        events: [refusal, rollback]
    """))
    assert notifier.started(UPGRADE) == [] and notifier.ended(UPGRADE, "succeeded", 3) == []
    assert Receiver.received == []
    notifier.ended(replace(UPGRADE, limit="role:app"), "refused", 1.5,
                   reasons=["app1: unreachable: connection refused after 3 attempts"])
    notifier.ended(RunInfo("production", "upgrade", "r2", "bob@laptop", "1.0.0", "1.1.0"), "rolled back", 200)
    (_, _, refusal), (_, _, rollback) = Receiver.received
    assert refusal["text"] == ("Overhaul: upgrade on production was REFUSED before any change (by alice@ci, version "
                               f"1.0.0 -> 1.1.0, limited to role:app, run {UPGRADE.run_id}): app1: unreachable: "
                               f"connection refused after 3 attempts. Details: overhaul show {UPGRADE.run_id}")
    assert refusal["overhaul"]["event"] == "refusal" and refusal["overhaul"]["reasons"] == [
        "app1: unreachable: connection refused after 3 attempts"]
    assert rollback["text"] == ("Overhaul: upgrade on production was ROLLED BACK after 3m 20s (by bob@laptop, "
                                "version 1.0.0 -> 1.1.0, run r2). Details: overhaul show r2")
    with pytest.raises(ValueError, match="unknown run status 'done'"):
        notifier.ended(UPGRADE, "done", 1)  # type: ignore[arg-type]


def test_a_webhook_that_is_down_never_raises_and_the_problem_is_reported_without_its_url(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/services/{TOKEN}"
    reported: list[str] = []
    notifier = RunNotifier(NotifyConfig(webhook=WebhookSettings(url_secret={"env": "UNUSED"})), url, reported.append,
                           retry_wait=0.2)
    began = time.monotonic()
    problems = notifier.started(UPGRADE) + notifier.ended(UPGRADE, "failed", 10, failed_hosts=["app1"])
    print("\n" + "\n".join(problems))
    assert problems == reported and len(problems) == 2
    assert problems[0].startswith("start message: the webhook (http://127.0.0.1) was not told after 2 attempts: ")
    assert "Connection refused" in problems[0] and problems[1].startswith("failure message: ")
    assert time.monotonic() - began < 5
    assert not any("s3cr3t" in problem or TOKEN in problem for problem in problems)


def test_a_failed_post_is_tried_once_more_then_given_up_naming_the_answer_not_the_url(receiver):
    Receiver.statuses = [500]  # the first POST fails, the second is told
    notifier = RunNotifier(NotifyConfig(webhook=WebhookSettings(url_secret={"env": "UNUSED"})), receiver,
                           retry_wait=0.1)
    assert notifier.started(UPGRADE) == [] and len(Receiver.received) == 2
    Receiver.statuses = [404, 404, 404]
    [problem] = notifier.ended(UPGRADE, "succeeded", 1)
    print("\n" + problem)
    assert len(Receiver.received) == 4 and Receiver.statuses == [404]  # one retry, not more
    assert problem == "success message: the webhook (http://127.0.0.1) was not told after 2 attempts: HTTP 404 Not Found: ok"


def test_a_webhook_that_never_answers_is_given_up_after_its_timeout():
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/services/{TOKEN}"
        config = NotifyConfig(webhook=WebhookSettings(url_secret={"env": "UNUSED"}, timeout=0.5))
        began = time.monotonic()
        [problem] = RunNotifier(config, url, retry_wait=0.1).started(UPGRADE)
    assert problem.endswith("was not told after 2 attempts: no answer within 0.5 s"), problem
    assert time.monotonic() - began < 3


def test_a_bad_or_missing_webhook_secret_is_an_input_error_that_never_shows_the_url(tmp_path, monkeypatch):
    monkeypatch.setenv("PROD_HOOK", f"http://hooks.example.com/services/{TOKEN}")
    loaded = inventory(tmp_path, "webhook: {url_secret: {env: PROD_HOOK}}")
    with pytest.raises(OverhaulError) as caught:
        RunNotifier.for_inventory(loaded)
    print("\n" + str(caught.value))
    assert str(caught.value) == (f"{tmp_path}/hosts/production.yaml: notify.webhook.url_secret (env:PROD_HOOK): the webhook "
                                 "must be https:// (http:// only to a loopback address), got http scheme to host "
                                 "hooks.example.com")
    monkeypatch.delenv("PROD_HOOK")
    with pytest.raises(OverhaulError, match="environment variable PROD_HOOK is not set"):
        RunNotifier.for_inventory(loaded)

    monkeypatch.setenv("PROD_HOOK", f"https://hooks.example.com/services/{TOKEN}")
    redactor = Redactor()
    RunNotifier.for_inventory(loaded, redactor=redactor)  # checked, not posted: nothing is sent until a run
    assert redactor(f"POST https://hooks.example.com/services/{TOKEN}") == "POST ********"


def test_the_notify_section_is_validated_with_file_line_and_field(tmp_path):
    secret_file(tmp_path / "hosts/open.url", "https://hooks.example.com/x").chmod(0o644)
    with pytest.raises(ConfigError) as caught:
        inventory(tmp_path, """
            webhook: {url_secret: {file: open.url}}
            events: [start, finish]
        """)
    print("\n" + str(caught.value))
    assert "production.yaml:7: notify.events[1]: Input should be 'start', 'success', 'failure', 'refusal', " \
           "'rollback' or 'interrupted' (got 'finish')" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        inventory(tmp_path, "webhook: {url_secret: {file: open.url}}")
    assert str(caught.value) == (f"{tmp_path}/hosts/production.yaml:6: notify.webhook.url_secret: the secret file "
                                 f"{tmp_path}/hosts/open.url is open to group/others (mode 0644); run: chmod 600 "
                                 f"{tmp_path}/hosts/open.url")
    with pytest.raises(ConfigError) as caught:
        inventory(tmp_path, "webhook: {url_secret: 'https://hooks.example.com/services/s3cr3t'}")
    assert "notify.webhook.url_secret: a secret is given by reference" in str(caught.value)
    assert "s3cr3t" not in str(caught.value)


# -- the metrics ---------------------------------------------------------------------------------------------------

def test_metrics_per_environment_and_runbook_keep_other_series_and_the_last_success(tmp_path):
    textfile = tmp_path / "textfile/overhaul.prom"
    write_metrics(textfile, "nightly", [PhaseResult("launch", "ok", 12.5, "")], None)  # the synthetic test's, same file
    loaded = inventory(tmp_path, "metrics: {textfile: ../textfile/overhaul.prom}")  # relative to the inventory
    assert loaded.notify.metrics.textfile == textfile
    notifier = RunNotifier.for_inventory(loaded, on_problem=pytest.fail)

    assert notifier.ended(UPGRADE, "succeeded", 61.25) == []
    succeeded = read_metrics(textfile)
    success_time = series(succeeded, "overhaul_run_last_success_timestamp_seconds", environment="production",
                          runbook="upgrade")
    assert abs(success_time - time.time()) < 5
    notifier.ended(RunInfo("staging", "verify", "s1", "ci"), "succeeded", 4)
    time.sleep(1.1)  # a later second
    notifier.ended(UPGRADE, "failed", 30, failed_hosts=["app1"], failed_pairs=2)

    samples = read_metrics(textfile)
    print("\n" + textfile.read_text())
    production = {"environment": "production", "runbook": "upgrade"}
    assert series(samples, "overhaul_run_last_success_timestamp_seconds", **production) == success_time  # kept
    assert series(samples, "overhaul_run_last_timestamp_seconds", **production) > success_time
    assert series(samples, "overhaul_run_duration_seconds", **production) == 30
    assert series(samples, "overhaul_run_failed_pairs", **production) == 2
    assert series(samples, "overhaul_run_status", **production, status="failed") == 1
    assert series(samples, "overhaul_run_status", **production, status="succeeded") is None  # replaced, not added
    assert series(samples, "overhaul_environment_version", environment="production", version="1.1.0") == 1  # unchanged
    assert series(samples, "overhaul_run_status", environment="staging", runbook="verify", status="succeeded") == 1
    assert series(samples, "overhaul_run_duration_seconds", environment="staging", runbook="verify") == 4
    assert series(samples, "overhaul_synthetic_phase_duration_seconds", environment="nightly", phase="launch") == 12.5

    def versions() -> dict[frozenset, float]:
        return {labels: value for (name, labels), value in read_metrics(textfile).items()
                if name == "overhaul_environment_version"}

    notifier.ended(RunInfo("production", "rollback", "r2", "bob", "1.1.0", "1.0.0"), "succeeded", 200)
    assert versions() == {frozenset({("environment", "production"), ("version", "1.0.0")}): 1}  # one series a farm
    notifier.ended(RunInfo("production", "upgrade", "r3", "bob", "1.0.0", "1.2.0"), "rolled back", 90)  # undone
    assert versions() == {frozenset({("environment", "production"), ("version", "1.0.0")}): 1}
    notifier.ended(RunInfo("production", "upgrade", "r4", "bob", "1.0.0", "1.2.0", limit="app1"), "succeeded", 9)
    assert versions() == {frozenset({("environment", "production"), ("version", "1.0.0")}): 1}  # one host is no farm
    write_metrics(textfile, "nightly", [PhaseResult("launch", "ok", 3, "")], "verify")  # synthetic keeps runs' series
    samples = read_metrics(textfile)
    assert series(samples, "overhaul_run_duration_seconds", environment="staging", runbook="verify") == 4
    assert series(samples, "overhaul_synthetic_failed_phase", environment="nightly", phase="verify") == 1
    assert sorted(p.name for p in textfile.parent.iterdir()) == ["overhaul.prom", "overhaul.prom.lock"]  # no temp left
    assert textfile.stat().st_mode & 0o777 == 0o644  # node_exporter's user reads it


def test_a_metrics_file_that_cannot_be_written_is_reported_not_raised(tmp_path):
    write(tmp_path / "not-a-folder", "")
    reported: list[str] = []
    notifier = RunNotifier(NotifyConfig(metrics=MetricsSettings(textfile=tmp_path / "not-a-folder/overhaul.prom")),
                           on_problem=reported.append)
    problems = notifier.ended(UPGRADE, "succeeded", 1)
    assert problems == reported == [f"metrics: cannot write {tmp_path}/not-a-folder/overhaul.prom: [Errno 17] File exists: "
                                    f"'{tmp_path}/not-a-folder'"]

    def journal_down(problem: str) -> None:
        raise OSError("the journal is down too")

    notifier.on_problem = journal_down  # still no exception: the problem comes back to the caller
    [problem] = notifier.ended(UPGRADE, "succeeded", 1)
    assert problem.endswith(f"File exists: '{tmp_path}/not-a-folder' (and it could not be recorded: the journal is down too)")


def test_label_values_are_escaped_and_read_back(tmp_path):
    textfile = tmp_path / "overhaul.prom"
    notifier = RunNotifier(NotifyConfig(metrics=MetricsSettings(textfile=textfile)))
    odd = RunInfo("production", "upgrade", "r1", "ci", None, 'v"2\\beta\nx')
    notifier.ended(odd, "succeeded", 1)
    assert 'version="v\\"2\\\\beta\\nx"' in textfile.read_text()
    notifier.ended(RunInfo("staging", "verify", "r2", "ci"), "failed", 1)  # reads the file back and writes it again
    assert 'version="v\\"2\\\\beta\\nx"' in textfile.read_text()
    assert textfile.read_text().count("overhaul_environment_version{") == 1


def test_a_run_on_the_lab_tells_the_webhook_and_a_webhook_down_does_not_fail_it(lab, tmp_path, receiver):
    inventory_file = lab.inventory.parent / "notified.yaml"
    text = lab.inventory.read_text().replace("environment: lab", "environment: notified")
    write(inventory_file, text + "notify:\n  webhook: {url_secret: {env: OVERHAUL_TEST_WEBHOOK}}\n"
                                 f"  metrics: {{textfile: {tmp_path / 'overhaul.prom'}}}\n")
    write(tmp_path / "runbooks/breaks.yaml", "name: breaks\nstages:\n"
          "  - {name: fails, step: shell, hosts: [app1], params: {command: 'exit 3'}, retry: {attempts: 1}}\n")
    args = ("run", "breaks", "--env", "notified", "--hosts-dir", str(inventory_file.parent), "--runbooks-dir",
            str(tmp_path / "runbooks"))
    try:
        failed = overhaul_cli(tmp_path, *args, env={"OVERHAUL_TEST_WEBHOOK": receiver})
        assert failed.returncode == 1, failed.stdout + failed.stderr
        [(_, _, start), (_, _, failure)] = Receiver.received
        assert (start["overhaul"]["event"], failure["overhaul"]["event"]) == ("start", "failure")
        told = failure["overhaul"]
        assert (told["environment"], told["runbook"], told["status"], told["failed_hosts"]) == (
            "notified", "breaks", "failed", ["app1"])
        assert told["operator"] and told["show"] == f"overhaul show {told['run_id']}" and told["duration_seconds"] > 0
        assert TOKEN not in failed.stdout + failed.stderr
        assert series(read_metrics(tmp_path / "overhaul.prom"), "overhaul_run_failed_pairs", environment="notified",
                      runbook="breaks") == 1

        down = f"http://127.0.0.1:{closed_port()}/services/{TOKEN}"
        unheard = overhaul_cli(tmp_path, *args, env={"OVERHAUL_TEST_WEBHOOK": down})
        assert unheard.returncode == 1, unheard.stdout + unheard.stderr  # the run's own result, not the webhook's
        [run] = SQLiteState(tmp_path / "journal.sqlite").runs("notified", 1)
        problems = [detail for _, run_id, kind, detail in SQLiteState(tmp_path / "journal.sqlite").events("notified")
                    if run_id == run.id and kind == "notify"]
        assert problems and all(TOKEN not in problem for problem in problems)

        # Refused before it started (another run of the environment is unfinished): told as a refusal, with why.
        SQLiteState(tmp_path / "journal.sqlite").set_status(run.id, "interrupted")
        refused = overhaul_cli(tmp_path, *args, env={"OVERHAUL_TEST_WEBHOOK": receiver})
        assert refused.returncode == 3, refused.stdout + refused.stderr
        (_, _, refusal) = Receiver.received[-1]
        assert refusal["overhaul"]["event"] == "refusal" and refusal["overhaul"]["status"] == "refused"
        assert f"run {run.id} (breaks) of 'notified' is unfinished" in refusal["overhaul"]["reasons"][0]
    finally:
        inventory_file.unlink()
