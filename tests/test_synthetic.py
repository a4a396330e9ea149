"""The nightly synthetic farm-launch test: for real on lab hosts, and against moto's EC2 on loopback."""

from __future__ import annotations

import ast
import http.client
import http.server
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
from pathlib import Path

import boto3
import pytest
from helpers import PROCESS_OCTET, write

from overhaul import alerts
from overhaul.errors import ConfigError, OverhaulError
from overhaul.inventory import load_inventory_file
from overhaul.state import SQLiteState
from overhaul.synthetic.window import Window, duration

ROOT = Path(__file__).resolve().parent.parent


def inventory_file(folder: Path, synthetic: str, env: str = "nightly") -> Path:
    """An inventory with a `synthetic:` section (given unindented, one setting a line)."""
    write(folder / "hosts" / "known_hosts", "")
    settings = "".join(f"  {line.strip()}\n" for line in synthetic.strip().splitlines())
    base = textwrap.dedent(f"""
        environment: {env}
        ssh: {{known_hosts: known_hosts}}
        hosts:
          - {{name: controller, address: 127.0.0.1, roles: [none]}}
    """)
    return write(folder / "hosts" / f"{env}.yaml", base + "synthetic:\n" + settings)


def synthetic(folder: Path, env: str = "nightly", extra_env: dict | None = None, wait: bool = True, args: tuple = ()):
    command = [sys.executable, "-m", "overhaul", "synthetic", "--env", env, "--hosts-dir", str(folder / "hosts"), *args]
    environ = dict(os.environ, OVERHAUL_JOURNAL=str(folder / "journal.sqlite"),
                   OVERHAUL_SYNTHETIC_DIR=str(folder / "synthetic"), **(extra_env or {}))
    if not wait:
        return subprocess.Popen(command, cwd=folder, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(command, cwd=folder, env=environ, capture_output=True, text=True, timeout=300)


def instances(ec2, **tags) -> list[dict]:
    filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()]
    pages = ec2.get_paginator("describe_instances").paginate(Filters=filters)
    return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]


def tags_of(instance: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def aws_config(url: str, image: str, extra: str = "") -> str:
    return f"""
        provider: aws-ec2
        endpoint_url: {url}
        region: us-east-1
        image: {image}
        roles: {{db: {{count: 1}}, app: {{count: 2}}}}
        tags: {{team: ops}}
        connect: false
        timeouts: {{launch: 30, terminate: 30}}
        {extra}
    """


@pytest.fixture
def zone(monkeypatch):
    """Set the local time zone of this process (TZ), put back afterwards."""
    def set_zone(name: str) -> None:
        monkeypatch.setenv("TZ", name)
        time.tzset()

    yield set_zone
    monkeypatch.undo()
    time.tzset()


def test_a_window_is_told_by_its_times_and_when_the_next_one_opens(zone):
    now = 1795466880  # 2026-11-23 20:48:00 UTC
    night = Window.at(now, 86400)
    assert night.span() == "2026-11-23 00:00 to 2026-11-24 00:00 UTC"
    assert night.rule() == "at most one run per window of 24h, whichever controller starts first"
    zone("Europe/Paris")
    assert night.next_opens(now) == "2026-11-24 01:00 CET (00:00 UTC), in 3h 12m"
    zone("UTC")
    assert night.next_opens(now) == "2026-11-24 00:00 UTC, in 3h 12m"
    assert Window.at(now + 0.5, 2).span() == "2026-11-23 20:48:00 to 2026-11-23 20:48:02 UTC"
    assert Window.at(now, 6 * 3600).next_opens(now) == "2026-11-24 00:00 UTC, in 3h 12m"
    assert [duration(s) for s in (0.2, 45, 725, 3600, 90000, 3 * 86400 + 7200)] == ["1s", "45s", "12m 5s", "1h", "25h",
                                                                                 "3d 2h"]


def test_aws_launches_tagged_servers_by_role_and_terminates_them(aws, tmp_path):
    url, ec2, image = aws
    inventory_file(tmp_path, aws_config(url, image))
    proc = synthetic(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [run] = SQLiteState(tmp_path / "journal.sqlite").runs("nightly")
    launched = instances(ec2, **{"overhaul:synthetic": run.id})
    assert sorted(tags_of(i)["overhaul:role"] for i in launched) == ["app", "app", "db"]
    assert all(tags_of(i)["team"] == "ops" and tags_of(i)["overhaul:environment"] == "nightly" for i in launched)
    assert {i["State"]["Name"] for i in launched} == {"terminated"}
    assert "ssh          skipped" in proc.stdout and "synthetic nightly: passed" in proc.stdout
    lines = proc.stdout.splitlines()
    assert f"run {run.id}: synthetic on nightly, provider aws-ec2, 3 servers" in lines
    assert re.fullmatch(rf"run {run.id} succeeded in [\d.]+ s: phases 7 ok, 0 failed, 3 skipped; "
                        rf"details: overhaul show {run.id}", lines[-1]), lines[-1]
    shown = subprocess.run([sys.executable, "-m", "overhaul", "show", run.id], capture_output=True, text=True,
                           cwd=tmp_path, env=dict(os.environ, OVERHAUL_JOURNAL=str(tmp_path / "journal.sqlite")))
    assert shown.returncode == 0 and f"run {run.id}: synthetic on nightly, succeeded" in shown.stdout, shown.stderr


def test_a_failed_launch_exits_with_the_launch_phase_and_leaks_nothing(aws, tmp_path):
    url, ec2, image = aws
    config = aws_config(url, image).replace("app: {count: 2}", "app: {count: 2, image: ami-00000000deadbeef}")
    inventory_file(tmp_path, config)
    proc = synthetic(tmp_path)
    assert proc.returncode == 23, proc.stdout + proc.stderr
    assert "FAILED in phase launch: launching 2 app server(s) failed: InvalidAMIID.NotFound" in proc.stdout
    db = instances(ec2, **{"overhaul:role": "db"})
    assert len(db) == 1 and db[0]["State"]["Name"] == "terminated"  # launched before the failure, torn down


def test_sigterm_mid_run_tears_the_farm_down(aws, tmp_path):
    url, ec2, image = aws
    inventory_file(tmp_path, aws_config(url, image, "hold: 120"))
    proc = synthetic(tmp_path, wait=False)
    said: list[str] = []  # what it printed, line by line, until its hold phase began (a loaded machine takes longer)
    deadline = time.monotonic() + 60
    while not any(line.startswith("-- hold") for line in said):
        assert time.monotonic() < deadline and proc.poll() is None, "".join(said)
        if select.select([proc.stdout], [], [], 1)[0]:
            said.append(proc.stdout.readline())
    assert len([i for i in instances(ec2, team="ops") if i["State"]["Name"] == "running"]) == 3
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    out = "".join(said) + out
    assert proc.returncode == 28, out  # the hold phase
    assert "interrupted by SIGTERM" in out
    assert {i["State"]["Name"] for i in instances(ec2, team="ops")} == {"terminated"}


def test_servers_left_by_an_earlier_run_are_swept_and_reported(aws, tmp_path):
    url, ec2, image = aws
    def leftover(run: str, environment: str) -> str:
        tags = [{"Key": "overhaul:synthetic", "Value": run}, {"Key": "overhaul:environment", "Value": environment}]
        reply = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1,
                                  TagSpecifications=[{"ResourceType": "instance", "Tags": tags}])
        return reply["Instances"][0]["InstanceId"]

    old_id = leftover("an-old-run", "nightly")
    leftover("another-environments-run", "staging")  # not this environment's to sweep
    time.sleep(1.2)
    inventory_file(tmp_path, aws_config(url, image, "max_age: 1"))
    proc = synthetic(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"terminated 1 server(s) left by earlier runs: {old_id}" in proc.stdout
    [state] = [i["State"]["Name"] for i in instances(ec2, **{"overhaul:synthetic": "an-old-run"})]
    assert state == "terminated"
    [other] = [i["State"]["Name"] for i in instances(ec2, **{"overhaul:synthetic": "another-environments-run"})]
    assert other == "running"


def test_two_schedulers_at_once_make_one_run_the_other_names_the_holder(aws, tmp_path):
    url, ec2, image = aws
    boto3.client("dynamodb", region_name="us-east-1", endpoint_url=url).create_table(
        TableName="overhaul-claims", KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}], BillingMode="PAY_PER_REQUEST")
    config = aws_config(url, image, "hold: 2\nclaim: {backend: dynamodb, table: overhaul-claims}")
    machines = [tmp_path / "scheduler-a", tmp_path / "scheduler-b"]  # two machines: two journals, one table
    for folder in machines:
        inventory_file(folder, config)
    procs = [synthetic(folder, wait=False) for folder in machines]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    ran = [out for out in outputs if "synthetic nightly: passed" in out]
    held = [out for out in outputs if "is already claimed by" in out]
    assert len(ran) == 1 and len(held) == 1, outputs
    run_ids = {tags_of(i)["overhaul:synthetic"] for i in instances(ec2, team="ops")}
    [run_id] = run_ids
    assert f"(run {run_id}" in held[0]
    window = Window.at(time.time(), 86400)
    assert f"nothing to do: this window ({window.span()}) is already claimed by" in held[0]
    assert ("the synthetic test makes at most one run per window of 24h, whichever controller starts first; "
            f"the next window opens {time.strftime('%Y-%m-%d %H:%M', time.localtime(window.end))}") in held[0]
    assert f"run {run_id} is not in this machine's journal (another controller ran it)" in held[0]


def test_unusable_credentials_fail_the_credentials_phase_clearly(aws, tmp_path):
    url, _, image = aws
    inventory_file(tmp_path, aws_config(url, image))
    no_keys = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    environ_without = {k: v for k, v in os.environ.items() if k not in no_keys}
    proc = subprocess.run([sys.executable, "-m", "overhaul", "synthetic", "--env", "nightly", "--hosts-dir",
                           str(tmp_path / "hosts")], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(environ_without, OVERHAUL_JOURNAL=str(tmp_path / "journal.sqlite")))
    assert proc.returncode == 21, proc.stdout + proc.stderr
    assert "FAILED in phase credentials: AWS credentials are not usable: Unable to locate credentials" in proc.stdout


def test_an_inventory_can_find_its_hosts_by_ec2_tags(aws, tmp_path):
    url, ec2, image = aws
    for name, roles, env in (("db-a", "db", "prod"), ("app-a", "app,web", "prod"), ("app-x", "app", "staging")):
        ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, TagSpecifications=[{"ResourceType": "instance", "Tags": [
            {"Key": "Name", "Value": name}, {"Key": "overhaul:role", "Value": roles}, {"Key": "env", "Value": env}]}])
    write(tmp_path / "hosts/known_hosts", "")
    path = write(tmp_path / "hosts/prod.yaml", f"""
        environment: prod
        ssh: {{known_hosts: known_hosts}}
        source: {{provider: aws-ec2, endpoint_url: "{url}", region: us-east-1, filters: {{env: prod}}}}
    """)
    inventory = load_inventory_file(path)
    assert sorted((h.name, tuple(h.roles)) for h in inventory.hosts) == [("app-a", ("app", "web")), ("db-a", ("db",))]
    assert all(h.address and h.vars["instance_id"].startswith("i-") for h in inventory.hosts)


class Webhook(http.server.BaseHTTPRequestHandler):
    received: list[dict] = []
    failures = 0  # the first `failures` posts are answered 500

    def do_POST(self):
        Webhook.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(500 if len(Webhook.received) <= Webhook.failures else 200)
        self.end_headers()

    def log_message(self, *args):
        pass


def webhook_server(failures: int = 0) -> http.server.HTTPServer:
    """A Slack-like receiver on loopback, served from a thread."""
    Webhook.received, Webhook.failures = [], failures
    server = http.server.HTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_the_lab_farm_runs_for_real_fails_loudly_and_recovers(tmp_path, lab):
    server = webhook_server()
    write(tmp_path / "webhook.url", f"http://127.0.0.1:{server.server_port}/hook\n")
    metrics = tmp_path / "metrics/overhaul.prom"
    config = f"""
        provider: lab
        roles: {{db: {{count: 1}}, worker: {{count: 1}}, app: {{count: 1}}}}
        lab_subnet: 127.62.{PROCESS_OCTET}
        endpoints: ["{{db1}}:3306"]
        window: 2
        metrics_file: {metrics}
        webhook: {{file: {tmp_path / 'webhook.url'}}}
        timeouts: {{ssh: 30}}
        verify_params: {{disk_threshold: THRESHOLD}}
    """
    inventory_file(tmp_path, config.replace("THRESHOLD", "1"))  # every disk is over 1 %: verify must fail
    failed = synthetic(tmp_path)
    assert failed.returncode == 26, failed.stdout + failed.stderr
    assert "FAILED in phase verify: runbook 'verify' failed: disk usage on db1: /opt/scalr-server at" in failed.stdout
    assert not list((tmp_path / "synthetic").glob("*/lab/state.json"))  # the farm is gone
    probe = subprocess.run(["ss", "-Hltn", "src", f"127.62.{PROCESS_OCTET}.0/24"], capture_output=True, text=True)
    assert probe.stdout.strip() == ""  # nothing listens on the farm's addresses any more
    text = metrics.read_text()
    assert 'overhaul_synthetic_success{environment="nightly"} 0' in text
    assert 'overhaul_synthetic_failed_phase{environment="nightly",phase="verify"} 1' in text
    assert 'overhaul_synthetic_last_success_timestamp_seconds{environment="nightly"} 0' in text
    assert len(Webhook.received) == 1 and "FAILED in phase verify" in Webhook.received[0]["text"]

    time.sleep(2.1)  # the next window
    inventory_file(tmp_path, config.replace("THRESHOLD", "80"))
    passed = synthetic(tmp_path)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    for phase in ("credentials", "launch", "running", "ssh", "verify", "endpoints", "terminate", "terminated"):
        assert f"   {phase:<12} ok" in passed.stdout
    assert "every server reaches 127.62." in passed.stdout
    text = metrics.read_text()
    assert 'overhaul_synthetic_success{environment="nightly"} 1' in text
    assert 'phase="launch"' in text and "failed_phase{" not in text
    assert len(Webhook.received) == 2 and "recovered" in Webhook.received[1]["text"]
    runs = SQLiteState(tmp_path / "journal.sqlite").runs("nightly")
    assert [r.status for r in runs] == ["succeeded", "failed"]
    server.shutdown()


def test_an_endpoint_failure_says_refused_or_timed_out_in_the_result_and_the_alert(tmp_path, lab):
    server = webhook_server()
    write(tmp_path / "webhook.url", f"http://127.0.0.1:{server.server_port}/hook\n")
    with socket.socket() as closed:  # nothing listens: a connection is refused
        closed.bind(("127.0.0.1", 0))
        refusing = closed.getsockname()[1]
    full = socket.create_server(("127.0.0.1", 0), backlog=0)  # one connection fills its accept queue: the kernel
    waiting = [socket.create_connection(full.getsockname(), timeout=5)]  # then drops new SYNs, and connects time out
    silent = full.getsockname()[1]
    inventory_file(tmp_path, f"""
        provider: lab
        roles: {{db: {{count: 1}}, worker: {{count: 1}}}}
        lab_subnet: 127.61.{PROCESS_OCTET}
        endpoints: ["{{db1}}:3306", "127.0.0.1:{refusing}", "127.0.0.1:{silent}"]
        timeouts: {{ssh: 30, endpoints: 2}}
        webhook: {{file: {tmp_path / 'webhook.url'}}}
    """)
    try:
        proc = synthetic(tmp_path)
    finally:
        for sock in [*waiting, full]:
            sock.close()
        server.shutdown()
    assert proc.returncode == 27, proc.stdout + proc.stderr
    reason = (f"db1, worker1 cannot reach 127.0.0.1:{refusing}: connection refused; "  # one line per target and reason
              f"db1, worker1 cannot reach 127.0.0.1:{silent}: timed out after 2 s (timeouts.endpoints)")
    assert f"synthetic nightly: FAILED in phase endpoints: {reason}" in proc.stdout
    run = the_run(tmp_path)
    [endpoints] = [r for r in SQLiteState(tmp_path / "journal.sqlite").results(run.id) if r.stage == "endpoints"]
    assert (endpoints.outcome, endpoints.message) == ("failed", reason)
    [alert] = Webhook.received
    assert alert["text"] == (f"Overhaul synthetic test of nightly FAILED in phase endpoints: {reason} (run {run.id}). "
                             f"Details: overhaul show {run.id}")
    assert re.search(rf"^run {run.id} failed in [\d.]+ s: phases 9 ok, 1 failed, 0 skipped; "
                     rf"details: overhaul show {run.id}$", proc.stdout, re.MULTILINE), proc.stdout


# -- faults between Overhaul and AWS: a proxy on loopback in front of moto ----------------------------------------

EC2_ERROR = ('<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>{code}</Code>'
             '<Message>injected by the test</Message></Error></Errors><RequestID>test</RequestID></Response>')


class AwsProxy(http.server.ThreadingHTTPServer):
    """Forwards every request to moto and records its Action and parameters; `faults[action]` lists what the next
    requests of that action get instead of moto's answer: (forwarded first?, HTTP status, error code)."""

    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", 0), ProxyHandler)
        self.upstream = urllib.parse.urlsplit(upstream)
        self.requests: list[tuple[str, dict[str, list[str]]]] = []
        self.faults: dict[str, list[tuple[bool, int, str]]] = {}
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    def params(self, action: str, name: str) -> list[str | None]:
        return [form.get(name, [None])[0] for seen, form in self.requests if seen == action]


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: AwsProxy

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        form = urllib.parse.parse_qs(body.decode(errors="replace"))
        action = form.get("Action", [self.headers.get("X-Amz-Target", "?")])[0]
        with self.server.lock:
            self.server.requests.append((action, form))
            pending = self.server.faults.get(action)
            fault = pending.pop(0) if pending else None
        if fault is None or fault[0]:
            upstream = http.client.HTTPConnection(self.server.upstream.hostname, self.server.upstream.port, timeout=30)
            upstream.request("POST", self.path, body, dict(self.headers))
            reply = upstream.getresponse()
            status, content_type, payload = reply.status, reply.getheader("Content-Type", "text/xml"), reply.read()
            upstream.close()
        if fault is not None:  # moto's answer (if it was asked) is lost: the client sees the fault
            status, content_type, payload = fault[1], "text/xml", EC2_ERROR.format(code=fault[2]).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def proxy(aws):
    server = AwsProxy(aws[0])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def journal_runs(folder: Path) -> list:
    return SQLiteState(folder / "journal.sqlite").runs("nightly")


def the_run(folder: Path):
    [run] = journal_runs(folder)
    return run


def test_a_launch_retried_after_a_lost_reply_carries_one_client_token_per_role_and_leaks_nothing(aws, proxy, tmp_path):
    _, ec2, image = aws
    proxy.faults["RunInstances"] = [(True, 503, "ServiceUnavailable")]  # the db servers start; the reply is lost
    inventory_file(tmp_path, aws_config(proxy.url, image))
    proc = synthetic(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # botocore sent the db request twice (same token: on AWS the retry returns the first servers), then app's.
    tokens = proxy.params("RunInstances", "ClientToken")
    assert len(tokens) == 3 and tokens[0] and tokens[0] == tokens[1] != tokens[2], tokens
    # moto ignores the token, so the lost reply left a second db server: teardown found it by the run's tag.
    launched = instances(ec2, **{"overhaul:synthetic": the_run(tmp_path).id})
    assert sorted(tags_of(i)["overhaul:role"] for i in launched) == ["app", "app", "db", "db"]
    assert {i["State"]["Name"] for i in launched} == {"terminated"}


def test_teardown_terminates_by_the_runs_tag_when_the_launch_never_answered(aws, proxy, tmp_path):
    _, ec2, image = aws
    proxy.faults["RunInstances"] = [(True, 400, "UnsupportedOperation")]  # the server starts; the call "fails"
    inventory_file(tmp_path, aws_config(proxy.url, image))
    proc = synthetic(tmp_path)
    assert proc.returncode == 23, proc.stdout + proc.stderr
    [db] = instances(ec2, **{"overhaul:synthetic": the_run(tmp_path).id})
    assert db["State"]["Name"] == "terminated", proc.stdout
    assert "   terminate    ok" in proc.stdout and "LEAK" not in proc.stdout


def test_terminate_is_retried_with_backoff_and_a_leak_is_reported_only_after_its_timeout(aws, proxy, tmp_path):
    _, ec2, image = aws
    proxy.faults["TerminateInstances"] = [(False, 400, "DependencyViolation")] * 2
    inventory_file(tmp_path, aws_config(proxy.url, image))
    proc = synthetic(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("terminate: terminating the servers of run") == 2 and "trying again" in proc.stdout
    assert {i["State"]["Name"] for i in instances(ec2, team="ops")} == {"terminated"}

    proxy.faults["TerminateInstances"] = [(False, 400, "DependencyViolation")] * 100
    folder = tmp_path / "always-failing"
    # 6 s of retries: a first TerminateInstances slowed by a loaded machine still leaves time to try again
    inventory_file(folder, aws_config(proxy.url, image).replace("terminate: 30", "terminate: 6"))
    started = time.monotonic()
    proc = synthetic(folder)
    assert proc.returncode == 29, proc.stdout + proc.stderr
    ids = {i["InstanceId"] for i in instances(ec2, **{"overhaul:synthetic": the_run(folder).id})}
    [leak] = [line for line in proc.stdout.splitlines() if line.startswith("LEAK: servers may still run: ")]
    assert set(leak.removeprefix("LEAK: servers may still run: ").split(" (")[0].split(", ")) == ids, leak
    assert len(ids) == 3
    assert proc.stdout.count("trying again") >= 1 and time.monotonic() - started < 30


def test_a_broken_claim_backend_fails_the_claim_phase_clearly_and_launches_nothing(aws, tmp_path):
    url, ec2, image = aws
    inventory_file(tmp_path, aws_config(url, image, "claim: {backend: dynamodb, table: no-such-table}"))
    proc = synthetic(tmp_path)
    assert proc.returncode == 20, proc.stdout + proc.stderr
    assert "FAILED in phase claim: claim in DynamoDB table no-such-table: ResourceNotFoundException" in proc.stdout
    assert "Traceback" not in proc.stderr and instances(ec2, team="ops") == []
    run = the_run(tmp_path)
    assert run.status == "failed"
    assert [(r.stage, r.outcome) for r in SQLiteState(tmp_path / "journal.sqlite").results(run.id)] == [("claim", "failed")]

    with socket.socket() as probe:  # a port nothing listens on: the endpoint refuses
        probe.bind(("127.0.0.1", 0))
        refusing = f"http://127.0.0.1:{probe.getsockname()[1]}"
    folder = tmp_path / "refused"
    inventory_file(folder, aws_config(refusing, image, "claim: {backend: dynamodb, table: overhaul-claims}"))
    proc = synthetic(folder)
    assert proc.returncode == 20, proc.stdout + proc.stderr
    assert (f'FAILED in phase claim: claim in DynamoDB table overhaul-claims: Could not connect to the endpoint URL: '
            f'"{refusing}/"' in proc.stdout), proc.stdout
    assert "Traceback" not in proc.stderr


def within(seconds: float, proc: subprocess.Popen) -> tuple[subprocess.Popen, str, str]:
    """The run's outcome, or a failed test when it takes longer (the run is then stopped by SIGTERM: it tears down)."""
    try:
        out, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=120)
        pytest.fail(f"the run took more than {seconds} s:\n{out}{err}")
    return proc, out, err


def test_the_credentials_timeout_is_enforced(aws, tmp_path):
    image = aws[2]
    with socket.socket() as hole:  # accepts connections (the kernel does) and never answers
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        config = aws_config(f"http://127.0.0.1:{hole.getsockname()[1]}", image)
        inventory_file(tmp_path, config.replace("timeouts: {", "timeouts: {credentials: 2, "))
        started = time.monotonic()
        proc, out, err = within(40, synthetic(tmp_path, wait=False))
    assert proc.returncode == 21, out + err
    assert "FAILED in phase credentials: not done within 2 s (timeouts.credentials)" in out
    assert time.monotonic() - started < 20


def test_the_verify_timeout_is_enforced_and_the_farm_still_torn_down(tmp_path, lab):
    write(tmp_path / "runbooks/slow.yaml", """
        name: slow
        stages:
          - name: hang
            step: shell
            params: {command: "sleep 120"}
    """)
    inventory_file(tmp_path, f"""
        provider: lab
        roles: {{db: {{count: 1}}}}
        lab_subnet: 127.61.{PROCESS_OCTET}
        setup_runbook: slow
        timeouts: {{ssh: 30, verify: 3}}
    """)
    proc, out, err = within(60, synthetic(tmp_path, wait=False))
    assert proc.returncode == 26, out + err
    assert "FAILED in phase verify: not done within 3 s (timeouts.verify)" in out
    [verify] = [line for line in out.splitlines() if line.startswith("   verify ")]
    assert float(verify.split()[2]) < 6, verify
    assert "   terminated   ok" in out and not list((tmp_path / "synthetic").glob("*/lab/state.json"))


def test_a_farm_the_provider_cannot_make_is_an_input_error_and_claims_nothing(aws, tmp_path):
    url, _, image = aws
    path = inventory_file(tmp_path, """
        provider: lab
        roles: {db: {count: 1}, web: {count: 2}}
    """)
    line = path.read_text().splitlines().index("  roles: {db: {count: 1}, web: {count: 2}}") + 1
    proc = synthetic(tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (f"{path}:{line}: synthetic.roles.web: the lab provider has roles db, worker and app, not 'web'"
            in proc.stderr), proc.stderr
    inventory_file(tmp_path, aws_config(url, "").replace("image: \n", "").replace("{count: 2}", "{count: 2, image: x}"))
    proc = synthetic(tmp_path)
    assert proc.returncode == 2 and "synthetic.roles.db.image: no image for role 'db'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not journal_runs(tmp_path)
    inventory_file(tmp_path, aws_config(url, image))  # fixed: the night was not taken by the refused attempts
    proc = synthetic(tmp_path)
    assert proc.returncode == 0 and "synthetic nightly: passed" in proc.stdout, proc.stdout + proc.stderr


def test_rerun_releases_a_failed_runs_window_once_and_is_journaled(aws, tmp_path):
    url, _, image = aws
    inventory_file(tmp_path, aws_config(url, image).replace("app: {count: 2}", "app: {count: 2, image: ami-00000000deadbeef}"))
    failed_run = synthetic(tmp_path)
    assert failed_run.returncode == 23
    [failed] = journal_runs(tmp_path)
    inventory_file(tmp_path, aws_config(url, image))  # the operator fixes the cause
    assert ("after repairing the cause, run again in this window: overhaul synthetic --env nightly --rerun"
            in failed_run.stdout.splitlines()[-1])
    waiting = synthetic(tmp_path)
    assert waiting.returncode == 0 and "already claimed by" in waiting.stdout and f"(run {failed.id}" in waiting.stdout
    assert (f"run {failed.id} failed (details: overhaul show {failed.id}); once the cause is fixed, run again in this "
            "window: overhaul synthetic --env nightly --rerun") in waiting.stdout

    rerun = synthetic(tmp_path, args=("--rerun",))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"taken over from failed run {failed.id}" in rerun.stdout and "synthetic nightly: passed" in rerun.stdout
    runs = journal_runs(tmp_path)
    assert [r.status for r in runs] == ["succeeded", "failed"]
    [(_, run_id, kind, detail)] = SQLiteState(tmp_path / "journal.sqlite").events("nightly")
    assert (run_id, kind) == (runs[0].id, "synthetic-rerun") and f"from failed run {failed.id}" in detail

    again = synthetic(tmp_path, args=("--rerun",))
    assert again.returncode == 3, again.stdout + again.stderr
    assert f"this window's run {runs[0].id} passed: --rerun only takes over from a failed run" in again.stderr
    assert len(journal_runs(tmp_path)) == 2


def test_the_webhook_is_https_or_loopback_http_bad_urls_are_clear_and_a_failure_is_tried_again(aws, tmp_path):
    server = webhook_server(failures=1)
    alerts.notify(f"http://127.0.0.1:{server.server_port}/hook", "hello")  # 500 first, then told
    server.shutdown()
    assert Webhook.received == [{"text": "hello"}, {"text": "hello"}]

    for bad, why in (("http://hooks.example.com/services/T0/B0/s3cr3t", "must be https:// (http:// only to a loopback"),
                     ("ftp://127.0.0.1/s3cr3t", "must be https://"), ("hooks.example.com/s3cr3t", "not a valid URL"),
                     ("https://hooks.example.com:99999/s3cr3t", "not a valid URL")):
        with pytest.raises(OverhaulError, match=re.escape(why)) as caught:
            alerts.notify(bad, "never sent")
        assert "s3cr3t" not in str(caught.value)

    url, _, image = aws  # in a run: an input error before anything is claimed, and the URL is not echoed
    inventory_file(tmp_path, aws_config(url, image, "webhook: {env: NIGHTLY_HOOK}"))
    proc = synthetic(tmp_path, extra_env={"NIGHTLY_HOOK": "http://hooks.example.com/services/T0/B0/s3cr3t"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "synthetic.webhook (env:NIGHTLY_HOOK): the webhook must be https://" in proc.stderr
    assert "s3cr3t" not in proc.stdout + proc.stderr and not journal_runs(tmp_path)


def test_inventory_sources_are_plug_ins_found_by_entry_point(aws, tmp_path):
    url, ec2, image = aws
    ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, TagSpecifications=[{"ResourceType": "instance", "Tags": [
        {"Key": "Name", "Value": "db-a"}, {"Key": "overhaul:role", "Value": "db"}, {"Key": "env", "Value": "prod"}]}])
    write(tmp_path / "hosts/known_hosts", "")
    path = write(tmp_path / "hosts/prod.yaml", f"""
        environment: prod
        ssh: {{known_hosts: known_hosts}}
        source: {{provider: aws-ec2, endpoint_url: "{url}", region: us-east-1, filters: {{env: prod}}}}
    """)
    probe = ("import sys; from pathlib import Path; from overhaul.inventory import load_inventory_file; "
             f"print([h.name for h in load_inventory_file(Path({str(path)!r})).hosts]); "
             "print(sorted(m for m in sys.modules if m.startswith(('overhaul.synthetic', 'overhaul.sources'))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    hosts, modules = out.stdout.splitlines()
    assert hosts == "['db-a']"
    assert "'overhaul.sources.ec2'" in modules and "overhaul.synthetic.aws" not in modules, modules

    path.write_text(path.read_text().replace("provider: aws-ec2", "provider: nope"))
    with pytest.raises(ConfigError, match=re.escape(f"{path}:3: source.provider: unknown inventory source 'nope' "
                                                    "(sources: aws-ec2")):
        load_inventory_file(path)
    path.write_text(path.read_text().replace("provider: nope", "provider: aws-ec2").replace("filters:", "filter:"))
    with pytest.raises(ConfigError, match=re.escape(f"{path}:3: source.filters: Field required")):
        load_inventory_file(path)


def test_the_core_imports_no_feature_and_the_synthetic_modules_import_no_circle():
    graph = {module: imports(path) for module, path in modules_under("overhaul/synthetic", "overhaul/sources")}
    assert not cycle(graph), cycle(graph)
    # The core knows the source plug-in interface (and the `synthetic:` section's model), no feature module.
    features = set(graph) - {"overhaul.sources", "overhaul.synthetic", "overhaul.synthetic.config"}
    assert not imports(ROOT / "overhaul/inventory.py") & features


def modules_under(*folders: str) -> list[tuple[str, Path]]:
    found = []
    for folder in folders:
        for path in sorted((ROOT / folder).glob("*.py")):
            name = folder.replace("/", ".") + ("" if path.stem == "__init__" else f".{path.stem}")
            found.append((name, path))
    return found


def imports(path: Path) -> set[str]:
    """The overhaul modules `path` imports, at its top or inside functions (not those only for type checking)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("overhaul"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from package import module`
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("overhaul"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle among the modules of `graph` (depth-first search), or []."""
    state: dict[str, str] = {}

    def walk(module: str, trail: list[str]) -> list[str]:
        state[module] = "open"
        for target in sorted(graph[module] & graph.keys()):
            if state.get(target) == "open":
                return [*trail[trail.index(target):], target] if target in trail else [module, target]
            if target not in state and (found := walk(target, [*trail, target])):
                return found
        state[module] = "done"
        return []

    for module in sorted(graph):
        if module not in state and (found := walk(module, [module])):
            return found
    return []
