"""Inventories: one YAML file per environment under hosts/, validated before any host is touched."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from overhaul.config import Document, dotted, load_document
from overhaul.errors import ConfigError
from overhaul.secrets import SecretRef
from overhaul.synthetic.config import SyntheticConfig

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Bastion(Strict):
    """A jump host every connection goes through (its host key must be in known_hosts too)."""

    address: str
    port: int = Field(22, ge=1, le=65535)
    user: str | None = None
    key_file: Path | None = None


class SSHSettings(Strict):
    user: str = "root"
    port: int = Field(22, ge=1, le=65535)
    key_file: Path | None = None
    known_hosts: Path = Path("~/.ssh/known_hosts")
    connect_timeout: float = Field(10, gt=0, le=300)
    connect_retries: int = Field(3, ge=1, le=20)
    bastion: Bastion | None = None
    sudo: bool = False
    sudo_password: SecretRef | None = None


class Host(Strict):
    name: str = Field(pattern=NAME)
    address: str
    port: int | None = Field(None, ge=1, le=65535)
    user: str | None = None
    roles: list[str] = Field(min_length=1)
    vars: dict[str, Any] = {}

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            if not value or any(ch.isspace() or ch in "/@:" for ch in value):
                raise ValueError("expected an IP address or a host name") from None
        return value

    @field_validator("roles")
    @classmethod
    def _roles(cls, value: list[str]) -> list[str]:
        import re

        for role in value:
            if not re.match(NAME, role):
                raise ValueError(f"role {role!r} must be letters, digits, '.', '_' or '-'")
        return value


class Policy(Strict):
    """Environment policy: protected environments need confirmation; promotion names the source."""

    protected: bool = False
    promotion_from: str | None = Field(None, pattern=NAME)


class Ec2Source(Strict):
    """Hosts found by EC2 tags instead of listed: running instances matching every filter."""

    provider: Literal["aws-ec2"] = "aws-ec2"
    filters: dict[str, str] = Field(min_length=1)  # tag name -> value
    region: str | None = None
    endpoint_url: str | None = None
    role_tag: str = "overhaul:role"  # comma-separated roles
    name_tag: str = "Name"
    address: Literal["private", "public"] = "private"


class Inventory(Strict):
    environment: str = Field(pattern=NAME)
    ssh: SSHSettings = SSHSettings()
    hosts: list[Host] = []
    source: Ec2Source | None = None
    vars: dict[str, Any] = {}
    role_vars: dict[str, dict[str, Any]] = {}
    secrets: dict[str, SecretRef] = {}
    policy: Policy = Policy()
    checks: str | None = None  # folder of testinfra checks for `verify` (relative to where overhaul runs)
    synthetic: SyntheticConfig | None = None  # the farm `overhaul synthetic` launches
    _path: Path | None = PrivateAttr(None)

    @property
    def path(self) -> Path | None:
        """The file this inventory was loaded from."""
        return self._path

    def conflicts(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Problems across fields (duplicates, stray role_vars), each with the location it is about."""
        found: list[tuple[tuple[str | int, ...], str]] = []
        if not self.hosts:
            found.append((("hosts",), "no hosts: list at least one, or find them with `source:`"))
        names: dict[str, int] = {}
        endpoints: dict[tuple[str, int], int] = {}
        for index, host in enumerate(self.hosts):
            if host.name in names:
                message = f"duplicate host name {host.name!r} (also hosts[{names[host.name]}])"
                found.append((("hosts", index, "name"), message))
            names.setdefault(host.name, index)
            endpoint = (host.address, host.port or self.ssh.port)
            if endpoint in endpoints:
                found.append((("hosts", index, "address"),
                              f"duplicate address {host.address}:{endpoint[1]} (also hosts[{endpoints[endpoint]}])"))
            endpoints.setdefault(endpoint, index)
        for role in sorted(set(self.role_vars) - self.roles):
            found.append((("role_vars", role), f"no host has role {role!r} (roles: {', '.join(sorted(self.roles))})"))
        return found

    @property
    def roles(self) -> set[str]:
        return {role for host in self.hosts for role in host.roles}

    def host(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    def host_vars(self, host: Host) -> dict[str, Any]:
        """Variables seen by a step on `host`: inventory vars < role vars (in role order) < host vars."""
        merged = dict(self.vars)
        for role in host.roles:
            merged.update(self.role_vars.get(role, {}))
        merged.update(host.vars)
        return merged


def environments(hosts_dir: Path) -> list[str]:
    return sorted(path.stem for path in hosts_dir.glob("*.yaml"))


def inventory_path(env: str, hosts_dir: Path = Path("hosts")) -> Path:
    path = hosts_dir / f"{env}.yaml"
    if not path.exists():
        known = environments(hosts_dir)
        listing = ", ".join(known) if known else f"none: {hosts_dir}/ has no .yaml files"
        raise ConfigError([f"unknown environment {env!r}: there is no {path} (environments: {listing})"])
    return path


def load_inventory(env: str, hosts_dir: Path = Path("hosts")) -> Inventory:
    """Load hosts/<env>.yaml, validate it, resolve its paths and check its key files are readable."""
    return load_inventory_file(inventory_path(env, hosts_dir), expected_env=env)


def load_inventory_file(path: Path, expected_env: str | None = None) -> Inventory:
    document = load_document(path)
    inventory = document.validate(Inventory)
    inventory._path = path
    if inventory.source is not None:
        from overhaul.synthetic.aws import ec2_hosts

        source = inventory.source
        found = ec2_hosts(source.region, source.endpoint_url, source.filters, source.role_tag, source.name_tag,
                          source.address)
        for entry in found:
            try:
                inventory.hosts.append(Host.model_validate(entry))
            except ValidationError as exc:
                raise ConfigError([f"{document.where(('source',))}: source: instance {entry['vars']['instance_id']}: "
                                   f"{error['loc'][0]}: {error['msg']}" for error in exc.errors()]) from None
    problems = [f"{document.where(loc)}: {dotted(loc)}: {message}" for loc, message in inventory.conflicts()]
    if expected_env and inventory.environment != expected_env:
        problems.append(
            f"{document.where(('environment',))}: environment: the file is {path.name} but says "
            f"{inventory.environment!r} (expected {expected_env!r})"
        )
    _resolve_paths(inventory, path.parent)
    problems += _unreadable_keys(inventory, document)
    if problems:
        raise ConfigError(problems)
    return inventory


def _absolute(path: Path, base: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _resolve_paths(inventory: Inventory, base: Path) -> None:
    ssh = inventory.ssh
    ssh.known_hosts = _absolute(ssh.known_hosts, base)
    if ssh.key_file:
        ssh.key_file = _absolute(ssh.key_file, base)
    if ssh.bastion and ssh.bastion.key_file:
        ssh.bastion.key_file = _absolute(ssh.bastion.key_file, base)
    for name, ref in inventory.secrets.items():
        if ref.file is not None:
            inventory.secrets[name] = ref.model_copy(update={"file": _absolute(ref.file, base)})
    if ssh.sudo_password and ssh.sudo_password.file is not None:
        ssh.sudo_password = ssh.sudo_password.model_copy(update={"file": _absolute(ssh.sudo_password.file, base)})


def _unreadable_keys(inventory: Inventory, document: Document) -> list[str]:
    ssh = inventory.ssh
    files = [(("ssh", "known_hosts"), ssh.known_hosts), (("ssh", "key_file"), ssh.key_file)]
    if ssh.bastion:
        files.append((("ssh", "bastion", "key_file"), ssh.bastion.key_file))
    problems = []
    for location, path in files:
        if path is not None and not os.access(path, os.R_OK):
            reason = "does not exist" if not path.exists() else "is not readable"
            problems.append(f"{document.where(location)}: {'.'.join(location)}: {path} {reason}")
    return problems
