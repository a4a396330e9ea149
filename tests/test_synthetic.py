"""The nightly synthetic farm-launch test: for real on lab hosts, and against moto's EC2 on loopback."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import boto3
from helpers import PROCESS_OCTET, write

from overhaul.inventory import load_inventory_file
from overhaul.state import SQLiteState


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


def synthetic(folder: Path, env: str = "nightly", extra_env: dict | None = None, wait: bool = True):
    command = [sys.executable, "-m", "overhaul", "synthetic", "--env", env, "--hosts-dir", str(folder / "hosts")]
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
    deadline = time.monotonic() + 60
    while len([i for i in instances(ec2, team="ops") if i["State"]["Name"] == "running"]) < 3:
        assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() else ""
        time.sleep(0.2)
    time.sleep(0.5)  # into the hold
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
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
    held = [out for out in outputs if "this window is already claimed by" in out]
    assert len(ran) == 1 and len(held) == 1, outputs
    run_ids = {tags_of(i)["overhaul:synthetic"] for i in instances(ec2, team="ops")}
    assert len(run_ids) == 1 and f"(run {run_ids.pop()}" in held[0]


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

    def do_POST(self):
        Webhook.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_the_lab_farm_runs_for_real_fails_loudly_and_recovers(tmp_path, lab):
    Webhook.received = []
    server = http.server.HTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
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
