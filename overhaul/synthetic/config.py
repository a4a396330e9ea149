"""The `synthetic:` section of an inventory: the farm a nightly synthetic test launches."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from overhaul.secrets import SecretRef


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RoleSpec(Strict):
    count: int = Field(1, ge=1, le=100)
    image: str | None = None  # overrides the farm's image for this role
    instance_type: str | None = None


class Timeouts(Strict):
    """Seconds each phase may take (the vendor's test polled 15 x 60 s for launch)."""

    credentials: float = Field(60, gt=0)
    launch: float = Field(900, gt=0)
    ssh: float = Field(300, gt=0)
    verify: float = Field(900, gt=0)
    endpoints: float = Field(60, gt=0)
    terminate: float = Field(900, gt=0)


class Claim(Strict):
    """Where the once-per-window claim lives: this machine's journal, or a DynamoDB table for several."""

    backend: Literal["local", "dynamodb"] = "local"
    table: str | None = None  # dynamodb: a table whose partition key is `pk` (string)


class SyntheticConfig(Strict):
    provider: str = Field(min_length=1)  # aws-ec2 | lab | a plug-in's name
    roles: dict[str, RoleSpec] = Field(min_length=1)
    image: str | None = None
    instance_type: str = "t3.micro"
    subnet: str | None = None
    security_groups: list[str] = []
    key_name: str | None = None
    tags: dict[str, str] = {}
    region: str | None = None
    endpoint_url: str | None = None  # an AWS-compatible endpoint (e.g. an emulator on loopback)
    address: Literal["private", "public"] = "private"
    connect: bool = True  # False: prove the cloud API only (launch, run, terminate), no SSH phases
    user: str = "root"
    key_file: Path | None = None  # default: the inventory's ssh.key_file
    endpoints: list[str] = []  # host:port each new server must reach; {name} is a farm server's address
    setup_runbook: str | None = None
    verify_params: dict[str, Any] = {}
    timeouts: Timeouts = Timeouts()
    max_age: float = Field(7200, gt=0)  # seconds: older tagged servers are swept at the start
    window: float = Field(86400, gt=0)  # seconds: one run per window (a night)
    claim: Claim = Claim()
    hold: float = Field(0, ge=0)  # seconds the farm stays up after verify (soak, debugging)
    metrics_file: Path | None = None  # Prometheus textfile-collector output
    webhook: SecretRef | None = None  # Slack-compatible URL, on failure and on recovery
    lab_subnet: str = "127.60.0"  # lab provider: where the farm's hosts listen
