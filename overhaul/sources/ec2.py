"""The `aws-ec2` inventory source (running instances found by tags) and the boto3 helpers Overhaul's AWS code shares."""

from __future__ import annotations

from typing import Any, Literal

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import Field

from overhaul.errors import OverhaulError
from overhaul.sources import Source

RETRIES = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=30)


def client(service: str, region: str | None, endpoint_url: str | None) -> Any:
    return boto3.client(service, region_name=region or "us-east-1", endpoint_url=endpoint_url, config=RETRIES)


def aws_error(exc: Exception) -> str:
    """An AWS error as `Code: message` (botocore's own text for errors that never reached AWS)."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', '?')}: {error.get('Message', exc)}"
    return str(exc)


def instances(ec2: Any, filters: list[dict], ids: list[str] | None = None) -> list[dict]:
    """Every instance matching `filters` (and `ids`, when given), over all pages."""
    request: dict[str, Any] = {"Filters": filters}
    if ids:
        request["InstanceIds"] = ids
    pages = ec2.get_paginator("describe_instances").paginate(**request)
    return [i for page in pages for reservation in page["Reservations"] for i in reservation["Instances"]]


class Ec2Source(Source):
    """Running EC2 instances matching every tag filter: named by `name_tag`, roles from `role_tag` (comma-separated)."""

    filters: dict[str, str] = Field(min_length=1)
    """EC2 tags an instance must all have, tag name to value, e.g. {env: staging}."""
    region: str | None = None
    """The AWS region (default: us-east-1)."""
    endpoint_url: str | None = None
    """An AWS-compatible endpoint instead of AWS's own (e.g. an emulator on loopback)."""
    role_tag: str = "overhaul:role"
    """The tag whose value is the host's roles, comma-separated (none: the role `unassigned`)."""
    name_tag: str = "Name"
    """The tag whose value is the host's name (none: the instance id)."""
    address: Literal["private", "public"] = "private"
    """Which of the instance's IP addresses Overhaul connects to."""

    def hosts(self) -> list[dict[str, Any]]:
        filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in self.filters.items()]
        filters.append({"Name": "instance-state-name", "Values": ["running"]})
        try:
            found = instances(client("ec2", self.region, self.endpoint_url), filters)
        except (BotoCoreError, ClientError) as exc:
            raise OverhaulError(f"EC2 inventory source: {aws_error(exc)}") from None
        hosts = []
        for instance in sorted(found, key=lambda i: i["InstanceId"]):
            tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
            roles = [r.strip() for r in tags.get(self.role_tag, "").split(",") if r.strip()]
            hosts.append({
                "name": tags.get(self.name_tag) or instance["InstanceId"],
                "address": instance.get("PrivateIpAddress" if self.address == "private" else "PublicIpAddress", ""),
                "roles": roles or ["unassigned"],
                "vars": {"instance_id": instance["InstanceId"]},
            })
        return hosts
