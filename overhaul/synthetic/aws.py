"""AWS through boto3: the `aws-ec2` synthetic provider, dynamic EC2 inventories and DynamoDB claims."""

from __future__ import annotations

import time
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from overhaul.errors import OverhaulError
from overhaul.synthetic.providers import TAG, Farm, Provider, Server

RETRIES = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=30)


def client(service: str, region: str | None, endpoint_url: str | None) -> Any:
    return boto3.client(service, region_name=region or "us-east-1", endpoint_url=endpoint_url, config=RETRIES)


def aws_error(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', '?')}: {error.get('Message', exc)}"
    return str(exc)


class EC2Provider(Provider):
    """EC2 instances tagged overhaul:synthetic=<run id>, overhaul:role=<role>."""

    name = "aws-ec2"

    @property
    def ec2(self) -> Any:
        return client("ec2", self.config.region, self.config.endpoint_url)

    def check_credentials(self) -> str:
        try:
            identity = client("sts", self.config.region, self.config.endpoint_url).get_caller_identity()
            self.ec2.describe_instances(MaxResults=5)
        except (BotoCoreError, ClientError) as exc:
            raise OverhaulError(f"AWS credentials are not usable: {aws_error(exc)}") from None
        return f"AWS account {identity['Account']} as {identity['Arn']}"

    def sweep(self, older_than: float) -> list[str]:
        stale = [
            instance["InstanceId"]
            for instance in self._instances([{"Name": "tag-key", "Values": [TAG]},
                                             {"Name": "tag:overhaul:environment", "Values": [self.environment]},
                                             {"Name": "instance-state-name", "Values": ["pending", "running", "stopped"]}])
            if instance["LaunchTime"].timestamp() < older_than
        ]
        if stale:
            self.ec2.terminate_instances(InstanceIds=stale)
        return stale

    def launch(self, farm: Farm) -> None:
        config = self.config
        for role, spec in config.roles.items():
            tags = [{"Key": k, "Value": v} for k, v in config.tags.items()]
            tags += [{"Key": TAG, "Value": farm.run_id}, {"Key": "overhaul:role", "Value": role},
                     {"Key": "overhaul:environment", "Value": self.environment},
                     {"Key": "Name", "Value": f"synthetic-{self.environment}-{role}"}]
            request: dict[str, Any] = {
                "ImageId": spec.image or config.image, "InstanceType": spec.instance_type or config.instance_type,
                "MinCount": spec.count, "MaxCount": spec.count,
                "TagSpecifications": [{"ResourceType": "instance", "Tags": tags}],
            }
            if config.subnet:
                request["SubnetId"] = config.subnet
            if config.security_groups:
                request["SecurityGroupIds"] = config.security_groups
            if config.key_name:
                request["KeyName"] = config.key_name
            try:
                reply = self.ec2.run_instances(**request)
            except (BotoCoreError, ClientError) as exc:
                raise OverhaulError(f"launching {spec.count} {role} server(s) failed: {aws_error(exc)}") from None
            for index, instance in enumerate(reply["Instances"], start=1):
                farm.servers.append(Server(instance["InstanceId"], f"{role}{index}", role))

    def wait_running(self, farm: Farm, timeout: float) -> None:
        self._wait(farm, "running", timeout)
        by_id = {i["InstanceId"]: i for i in self._instances([], [s.id for s in farm.servers])}
        key = "PrivateIpAddress" if self.config.address == "private" else "PublicIpAddress"
        for server in farm.servers:
            server.address = by_id[server.id].get(key, "")
            server.host_key = self._host_key(server.id)

    def _host_key(self, instance_id: str) -> str | None:
        """The ed25519 host key cloud-init prints to the console, when the console has it."""
        try:
            output = self.ec2.get_console_output(InstanceId=instance_id).get("Output", "")
        except (BotoCoreError, ClientError):
            return None
        inside = output.split("-----BEGIN SSH HOST KEY KEYS-----")[-1].split("-----END SSH HOST KEY KEYS-----")[0]
        for line in inside.splitlines():
            if line.startswith("ssh-ed25519 "):
                return " ".join(line.split()[:2])
        return None

    def terminate(self, farm: Farm) -> None:
        self.ec2.terminate_instances(InstanceIds=[s.id for s in farm.servers])

    def wait_terminated(self, farm: Farm, timeout: float) -> None:
        self._wait(farm, "terminated", timeout)

    def _wait(self, farm: Farm, state: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = {i["InstanceId"]: i["State"]["Name"] for i in self._instances([], [s.id for s in farm.servers])}
            behind = {iid: st for iid, st in states.items() if st != state}
            if not behind:
                return
            if state == "running" and any(st in ("shutting-down", "terminated") for st in behind.values()):
                raise OverhaulError(f"instances died while starting: {behind}")
            if time.monotonic() > deadline:
                raise OverhaulError(f"not {state} after {timeout:g} s: {behind}")
            time.sleep(min(5.0, max(0.2, timeout / 100)))

    def _instances(self, filters: list[dict], ids: list[str] | None = None) -> list[dict]:
        request: dict[str, Any] = {"Filters": filters}
        if ids:
            request["InstanceIds"] = ids
        pages = self.ec2.get_paginator("describe_instances").paginate(**request)
        return [i for page in pages for reservation in page["Reservations"] for i in reservation["Instances"]]


def claim_dynamodb(table: str, key: str, holder: str, run_id: str, expires: float,
                   region: str | None, endpoint_url: str | None) -> dict | None:
    """Claim `key` with a conditional write; return the existing claim when another run has it."""
    dynamodb = client("dynamodb", region, endpoint_url)
    item = {"pk": {"S": key}, "holder": {"S": holder}, "run_id": {"S": run_id},
            "at": {"N": f"{time.time():.3f}"}, "expires": {"N": str(int(expires))}}
    try:
        dynamodb.put_item(TableName=table, Item=item, ConditionExpression="attribute_not_exists(pk) OR #exp < :now",
                          ExpressionAttributeNames={"#exp": "expires"},
                          ExpressionAttributeValues={":now": {"N": str(int(time.time()))}})
        return None
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
            raise OverhaulError(f"claim in DynamoDB table {table}: {aws_error(exc)}") from None
    existing = dynamodb.get_item(TableName=table, Key={"pk": {"S": key}}, ConsistentRead=True).get("Item", {})
    return {name: next(iter(value.values())) for name, value in existing.items()}


def ec2_hosts(region: str | None, endpoint_url: str | None, filters: dict[str, str], role_tag: str,
              name_tag: str, address: str) -> list[dict[str, Any]]:
    """Running instances matching tag filters, as inventory host entries (name, address, roles)."""
    ec2 = client("ec2", region, endpoint_url)
    request = [{"Name": f"tag:{k}", "Values": [v]} for k, v in filters.items()]
    request.append({"Name": "instance-state-name", "Values": ["running"]})
    hosts = []
    try:
        pages = ec2.get_paginator("describe_instances").paginate(Filters=request)
        instances = [i for page in pages for r in page["Reservations"] for i in r["Instances"]]
    except (BotoCoreError, ClientError) as exc:
        raise OverhaulError(f"EC2 inventory source: {aws_error(exc)}") from None
    for instance in sorted(instances, key=lambda i: i["InstanceId"]):
        tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
        roles = [r.strip() for r in tags.get(role_tag, "").split(",") if r.strip()]
        hosts.append({
            "name": tags.get(name_tag) or instance["InstanceId"],
            "address": instance.get("PrivateIpAddress" if address == "private" else "PublicIpAddress", ""),
            "roles": roles or ["unassigned"],
            "vars": {"instance_id": instance["InstanceId"]},
        })
    return hosts
