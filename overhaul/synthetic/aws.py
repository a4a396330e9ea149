"""AWS through boto3: the `aws-ec2` synthetic provider and the DynamoDB window claim."""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from overhaul.errors import OverhaulError
from overhaul.sources.ec2 import aws_error, client, instances
from overhaul.synthetic.providers import TAG, Farm, Problem, Provider, Server

if TYPE_CHECKING:
    from overhaul.synthetic.config import SyntheticConfig

LIVE = ["pending", "running", "stopping", "stopped"]  # instance states that still cost money or may come back


class EC2Provider(Provider):
    """EC2 instances tagged overhaul:synthetic=<run id>, overhaul:role=<role>, overhaul:environment=<env>."""

    name = "aws-ec2"

    @classmethod
    def config_problems(cls, config: SyntheticConfig) -> list[Problem]:
        return [(("roles", role, "image"), f"no image for role {role!r}: set synthetic.image or roles.{role}.image")
                for role, spec in config.roles.items() if not (spec.image or config.image)]

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
            for instance in instances(self.ec2, [{"Name": "tag-key", "Values": [TAG]},
                                                 {"Name": "tag:overhaul:environment", "Values": [self.environment]},
                                                 {"Name": "instance-state-name", "Values": LIVE}])
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
                "ClientToken": client_token(self.environment, farm.run_id, role),
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
            known = {server.id for server in farm.servers}
            for index, instance in enumerate(reply["Instances"], start=1):
                if instance["InstanceId"] not in known:  # a repeated request answers with the same instances
                    farm.servers.append(Server(instance["InstanceId"], f"{role}{index}", role))

    def wait_running(self, farm: Farm, timeout: float) -> None:
        self._wait(farm, "running", timeout)
        by_id = {i["InstanceId"]: i for i in instances(self.ec2, [], [s.id for s in farm.servers])}
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
        """Terminate the farm's instances and any other tagged with this run (e.g. a launch whose reply was lost)."""
        try:
            tagged = instances(self.ec2, [{"Name": f"tag:{TAG}", "Values": [farm.run_id]},
                                          {"Name": "instance-state-name", "Values": LIVE}])
            known = {server.id for server in farm.servers}
            for instance in tagged:
                if instance["InstanceId"] not in known:
                    role = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}.get("overhaul:role", "?")
                    farm.servers.append(Server(instance["InstanceId"], instance["InstanceId"], role))
            if farm.servers:
                self.ec2.terminate_instances(InstanceIds=[server.id for server in farm.servers])
        except (BotoCoreError, ClientError) as exc:
            raise OverhaulError(f"terminating the servers of run {farm.run_id}: {aws_error(exc)}") from None

    def wait_terminated(self, farm: Farm, timeout: float) -> None:
        self._wait(farm, "terminated", timeout)

    def _wait(self, farm: Farm, state: str, timeout: float) -> None:
        ids = [server.id for server in farm.servers]
        deadline = time.monotonic() + timeout
        while ids:
            states = {i["InstanceId"]: i["State"]["Name"] for i in instances(self.ec2, [], ids)}
            behind = {iid: st for iid, st in states.items() if st != state}
            if not behind:
                return
            if state == "running" and any(st in ("shutting-down", "terminated") for st in behind.values()):
                raise OverhaulError(f"instances died while starting: {behind}")
            if time.monotonic() > deadline:
                raise OverhaulError(f"not {state} after {timeout:g} s: {behind}")
            time.sleep(min(5.0, max(0.2, timeout / 100)))


def client_token(environment: str, run_id: str, role: str) -> str:
    """The idempotency token of one role's `run_instances`: a retried request returns the first one's instances."""
    return hashlib.sha256(f"{environment}/{run_id}/{role}".encode()).hexdigest()  # 64 characters, EC2's maximum


def claim_dynamodb(table: str, key: str, holder: str, run_id: str, expires: float,
                   region: str | None, endpoint_url: str | None) -> dict | None:
    """Claim `key` with a conditional write; return the existing claim when another run has it."""
    dynamodb = client("dynamodb", region, endpoint_url)
    item = {"pk": {"S": key}, "holder": {"S": holder}, "run_id": {"S": run_id},
            "at": {"N": f"{time.time():.3f}"}, "expires": {"N": str(int(expires))}}
    try:
        try:
            dynamodb.put_item(TableName=table, Item=item, ConditionExpression="attribute_not_exists(pk) OR #exp < :now",
                              ExpressionAttributeNames={"#exp": "expires"},
                              ExpressionAttributeValues={":now": {"N": str(int(time.time()))}})
            return None
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise
        existing = dynamodb.get_item(TableName=table, Key={"pk": {"S": key}}, ConsistentRead=True).get("Item", {})
    except (BotoCoreError, ClientError) as exc:
        raise OverhaulError(f"claim in DynamoDB table {table}: {aws_error(exc)}") from None
    return {name: next(iter(value.values())) for name, value in existing.items()}
