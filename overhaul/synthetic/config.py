"""The `synthetic:` section of an inventory: the farm a nightly synthetic test launches."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from overhaul.errors import OverhaulError
from overhaul.secrets import SecretRef


class Strict(BaseModel):
    """Unknown keys are errors; the docstring under each field is its description in the published schema."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class RoleSpec(Strict):
    """The servers of one role in the synthetic farm."""

    count: int = Field(1, ge=1, le=100)
    """How many servers of this role to launch."""
    image: str | None = None
    """Machine image for this role (aws-ec2: an AMI id), instead of the farm's `image`."""
    instance_type: str | None = None
    """Instance type for this role, instead of the farm's `instance_type`."""


class Timeouts(Strict):
    """Seconds each phase may take (the vendor's test polled 15 x 60 s for launch)."""

    credentials: float = Field(60, gt=0)
    """Seconds to prove the cloud credentials work."""
    launch: float = Field(900, gt=0)
    """Seconds for every launched server to be running."""
    ssh: float = Field(300, gt=0)
    """Seconds for every server to answer SSH."""
    verify: float = Field(900, gt=0)
    """Seconds for the setup runbook and the verify runbook on the new servers."""
    endpoints: float = Field(60, gt=0)
    """Seconds each endpoint connection may take."""
    terminate: float = Field(900, gt=0)
    """Seconds to terminate the farm (retried with backoff meanwhile)."""


class Claim(Strict):
    """Where the once-per-window claim lives: this machine's journal, or a DynamoDB table for several."""

    backend: Literal["local", "dynamodb"] = "local"
    """local: this machine's journal; dynamodb: a table shared by every scheduler."""
    table: str | None = None
    """dynamodb: the table, whose partition key is `pk` (a string)."""

    @model_validator(mode="after")
    def _table_for_dynamodb(self) -> Self:
        if self.backend == "dynamodb" and not self.table:
            raise ValueError("the dynamodb backend needs `table` (a table whose partition key is `pk`)")
        return self


class SyntheticConfig(Strict):
    """The farm a synthetic test launches, verifies and terminates, and how its results are reported."""

    provider: str = Field(min_length=1)
    """Who launches the farm: aws-ec2, lab (fresh lab hosts on this machine), or an installed plug-in's name."""
    roles: dict[str, RoleSpec] = Field(min_length=1)
    """The farm's servers per role, e.g. {db: {count: 1}, app: {count: 2}}."""
    image: str | None = None
    """Machine image of every server (aws-ec2: an AMI id), unless its role names one."""
    instance_type: str = "t3.micro"
    """Instance type of every server, unless its role names one."""
    subnet: str | None = None
    """aws-ec2: the subnet id to launch into (default: the account's default)."""
    security_groups: list[str] = []
    """aws-ec2: security group ids of the new servers."""
    key_name: str | None = None
    """aws-ec2: the EC2 key pair the servers are launched with (its private key: `key_file`)."""
    tags: dict[str, str] = {}
    """Extra tags on every server (Overhaul adds its own overhaul:* tags and Name)."""
    region: str | None = None
    """aws-ec2: the region (default: us-east-1)."""
    endpoint_url: str | None = None
    """aws-ec2: an AWS-compatible endpoint instead of AWS's own (e.g. an emulator on loopback)."""
    address: Literal["private", "public"] = "private"
    """Which address of a new server Overhaul connects to."""
    connect: bool = True
    """false: prove the cloud API only (launch, running, terminate), without the SSH, verify and endpoint phases."""
    user: str = "root"
    """Login user on the new servers."""
    key_file: Path | None = None
    """Private key for the new servers (default: the inventory's ssh.key_file)."""
    endpoints: list[str] = []
    """host:port each new server must reach over TCP; {name} stands for a farm server's address, e.g. '{db1}:3306'."""
    setup_runbook: str | None = None
    """A runbook to run on the new servers before the verify runbook."""
    verify_params: dict[str, Any] = {}
    """Parameters for the verify runbook on the new servers, e.g. {disk_threshold: 80}."""
    timeouts: Timeouts = Timeouts()
    """Seconds each phase may take."""
    max_age: float = Field(7200, gt=0)
    """Seconds: servers an earlier run tagged and left, older than this, are terminated at the start."""
    window: float = Field(86400, gt=0)
    """Seconds: one run per window (a night), whichever scheduler fires."""
    claim: Claim = Claim()
    """Where the once-per-window claim lives."""
    hold: float = Field(0, ge=0)
    """Seconds the farm stays up after verify (soak, debugging)."""
    metrics_file: Path | None = None
    """A Prometheus textfile-collector file the run's metrics are written to."""
    webhook: SecretRef | None = None
    """A Slack-compatible webhook URL, by reference: posted on failure and on recovery."""
    lab_subnet: str = "127.10.255"
    """lab provider: the farm's hosts listen on SUBNET.1, SUBNET.2, ... inside 127.0.0.0/8 (default: the farm of the
    lab on 127.10.0; `lab.up` writes its lab's own, 127.A.B -> 127.A.(255-B))."""

    @model_validator(mode="after")
    def _provider_can_do_it(self) -> Self:
        """A farm the provider would refuse is an input error when the inventory loads, not a failed night."""
        from overhaul.synthetic.registry import provider_class  # the providers import this module's types

        try:
            problems = provider_class(self.provider).config_problems(self)
        except OverhaulError as exc:  # an unknown provider
            problems = [(("provider",), str(exc))]
        if problems:  # raised as a ValidationError so that each problem keeps its own location (file:line)
            raise ValidationError.from_exception_data("SyntheticConfig", [
                InitErrorDetails(type=PydanticCustomError("value_error", "{message}", {"message": message}),
                                 loc=location, input=None)
                for location, message in problems])
        return self
