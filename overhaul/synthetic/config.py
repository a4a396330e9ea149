"""The `synthetic:` section of an inventory: the farm a nightly synthetic test launches."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from overhaul.errors import OverhaulError
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

    @model_validator(mode="after")
    def _table_for_dynamodb(self) -> Self:
        if self.backend == "dynamodb" and not self.table:
            raise ValueError("the dynamodb backend needs `table` (a table whose partition key is `pk`)")
        return self


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
