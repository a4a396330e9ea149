"""Secrets by reference (`{env: VAR}`, `{file: path}`, AWS SSM / Secrets Manager) and their redaction."""

from __future__ import annotations

import base64
import json
import os
import shlex
import stat
import threading
import urllib.parse
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, model_validator

from overhaul.errors import OverhaulError

REDACTED = "********"


class SecretRef(BaseModel):
    """Where a secret lives. Exactly one source; the value is read only when a step needs it."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    env: str | None = None
    """The environment variable of the overhaul process that holds the secret."""
    file: Path | None = None
    """A file holding the secret, mode 0600 (trailing newlines dropped); in an inventory, relative to its file."""
    ssm: str | None = None
    """The name of an AWS SSM parameter (read with decryption)."""
    aws_secret: str | None = None
    """The id or ARN of an AWS Secrets Manager secret (its SecretString)."""

    @model_validator(mode="before")
    @classmethod
    def _by_reference(cls, data: Any) -> Any:
        # The message must not repeat the value: it may be the secret itself, written inline.
        if not isinstance(data, dict | SecretRef):
            raise ValueError("a secret is given by reference ({file: PATH}, {env: VAR}, {ssm: NAME} or "
                             "{aws_secret: ID}), never written inline")
        return data

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


def private_file_problem(path: Path) -> str | None:
    """Why `path` cannot hold a secret or a private key, or None: it must be a readable regular file
    that group and others cannot access (OpenSSH refuses such a key file too)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return f"{path} does not exist"
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if not stat.S_ISREG(info.st_mode):
        return f"{path} is not a regular file"
    if info.st_mode & 0o077:
        return (f"{path} is open to group/others (mode {stat.S_IMODE(info.st_mode):04o}); "
                f"run: chmod 600 {shlex.quote(str(path))}")
    if not os.access(path, os.R_OK):
        return f"{path} is not readable"
    return None


def encodings(value: str) -> set[str]:
    """`value` as it commonly appears in output: itself, base64, URL-encoded and JSON-escaped."""
    data = value.encode()
    forms = {value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1],
             urllib.parse.quote(value), urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value)}
    for encoded in (base64.b64encode(data).decode(), base64.urlsafe_b64encode(data).decode()):
        forms |= {encoded, encoded.rstrip("=")}
    return forms


class Redactor:
    """Replaces every secret value it was told about, and its common encodings, with ******** in any text."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._lock = threading.Lock()

    def add(self, value: str) -> str:
        """Redact `value` (base64, URL-encoded and JSON-escaped forms too) from now on; returns it unchanged."""
        if len(value) >= 4:  # shorter values would redact ordinary text (and are no secret anyway)
            with self._lock:
                self._values |= encodings(value)
        return value

    def __call__(self, text: str) -> str:
        with self._lock:
            values = sorted(self._values, key=len, reverse=True)
        for value in values:
            text = text.replace(value, REDACTED)
        return text
