"""Secrets by reference (`{env: VAR}`, `{file: path}`, AWS SSM / Secrets Manager) and their redaction."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict, model_validator

from overhaul.errors import OverhaulError

REDACTED = "********"


class SecretRef(BaseModel):
    """Where a secret lives. Exactly one source; the value is read only when a step needs it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str | None = None
    file: Path | None = None
    ssm: str | None = None
    aws_secret: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        given = [name for name in ("env", "file", "ssm", "aws_secret") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"a secret needs exactly one of env, file, ssm, aws_secret (got {given or 'none'})")
        return self

    def describe(self) -> str:
        for name in ("env", "file", "ssm", "aws_secret"):
            if getattr(self, name) is not None:
                return f"{name}:{getattr(self, name)}"
        return "?"

    def resolve(self) -> str:
        """Read the secret's value (trailing newline of a file removed)."""
        if self.env is not None:
            if self.env not in os.environ:
                raise OverhaulError(f"secret {self.describe()}: environment variable {self.env} is not set")
            return os.environ[self.env]
        if self.file is not None:
            try:
                return self.file.read_text().rstrip("\n")
            except OSError as exc:
                raise OverhaulError(f"secret {self.describe()}: cannot read: {exc.strerror}") from None
        import boto3  # only when a secret lives in AWS

        if self.ssm is not None:
            reply = boto3.client("ssm").get_parameter(Name=self.ssm, WithDecryption=True)
            return reply["Parameter"]["Value"]
        return boto3.client("secretsmanager").get_secret_value(SecretId=self.aws_secret)["SecretString"]


class Redactor:
    """Replaces every secret value it was told about with ******** in any text it is given."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._lock = threading.Lock()

    def add(self, value: str) -> str:
        if len(value) >= 4:  # shorter values would redact ordinary text (and are no secret anyway)
            with self._lock:
                self._values.add(value)
        return value

    def __call__(self, text: str) -> str:
        with self._lock:
            values = sorted(self._values, key=len, reverse=True)
        for value in values:
            text = text.replace(value, REDACTED)
        return text
