"""Inventories: one YAML file per environment under hosts/, validated before any host is touched."""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from overhaul.alerts import NotifyConfig
from overhaul.config import Document, Location, dotted, load_document, plain_name
from overhaul.errors import ConfigError, OverhaulError
from overhaul.secrets import SecretRef, private_file_problem
from overhaul.sources import Source, source_class
from overhaul.synthetic.config import SyntheticConfig

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME = re.compile(rf"(?=.{{1,253}}\Z){LABEL}(?:\.{LABEL})*\.?")  # RFC 1123


def _address(value: str) -> str:
    """An IP address or an RFC 1123 host name: nothing a shell or ssh would read as more than a name."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not HOSTNAME.fullmatch(value):
            raise ValueError("expected an IP address or a host name (RFC 1123: letters, digits, '-' and '.')") from None
    return value


def _user(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.@-]*", value):
        raise ValueError("expected a login name: letters, digits, '_', '.', '-' or '@', not empty")
    return value


# YAML would turn `port: true` into 1 and accept `port: "22"`: ports are integers written as integers.
Port = Annotated[int, Field(strict=True, ge=1, le=65535)]
Address = Annotated[str, AfterValidator(_address)]
User = Annotated[str, AfterValidator(_user)]


class Strict(BaseModel):
    """Unknown keys are errors; the docstring under each field is its description in the published schema."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class Bastion(Strict):
    """A jump host every connection goes through (its host key must be in known_hosts too)."""

    address: Address
    """The jump host's IP address or DNS name."""
    port: Port = 22
    """The jump host's SSH port."""
    user: User | None = None
    """Login user on the jump host (default: `ssh.user`)."""
    key_file: Path | None = None
    """Private key for the jump host, mode 0600, without a passphrase (default: `ssh.key_file`)."""


class SSHSettings(Strict):
    """How Overhaul connects to every host of the environment."""

    user: User = "root"
    """Login user on every host (a host's own `user:` overrides it); with `sudo: true`, a sudo user."""
    port: Port = 22
    """SSH port of every host (a host's own `port:` overrides it)."""
    key_file: Path | None = None
    """Private key file, mode 0600, without a passphrase (no agent is used); relative to the inventory file."""
    known_hosts: Path = Path("~/.ssh/known_hosts")
    """known_hosts file with every host's key (and the bastion's): an unknown or changed key is refused, never added."""
    connect_timeout: float = Field(10, gt=0, le=300)
    """Seconds to wait for a connection (and for sudo's answer) before the attempt counts as failed."""
    connect_retries: int = Field(3, ge=1, le=20, strict=True)
    """Attempts to connect to a host; transient faults (refused, reset, timeout) are retried with backoff."""
    max_sessions: int = Field(8, ge=1, le=64, strict=True)
    """Commands run at once on one host's connection; more wait their turn. Below sshd's MaxSessions (10 by default),
    which refuses the channel after it: back-pressure, never taken for a frozen host."""
    forks: int = Field(100, ge=1, le=1000, strict=True)
    """Hosts connected to and worked on at once, at most (a stage's `concurrency` sets its own stage's width)."""
    bastion: Bastion | None = None
    """A jump host every connection goes through (optional)."""
    sudo: bool = Field(False, strict=True)  # not "yes", which YAML 1.2 and pydantic's lax mode disagree on
    """true: the steps' commands run through sudo when the login user is not root (a `shell` stage: per its own `sudo`)."""
    sudo_password: SecretRef | None = None
    """sudo's password, by reference, given to sudo on stdin; only needed without a NOPASSWD rule."""


class Host(Strict):
    """One host of the environment."""

    name: str = Field(pattern=NAME)
    """The host's name in plans, logs and `--limit` (letters, digits, '.', '_', '-'); unique in the inventory."""
    address: Address
    """IP address or DNS name to connect to."""
    port: Port | None = None
    """SSH port, when not `ssh.port`."""
    user: User | None = None
    """Login user, when not `ssh.user`."""
    roles: list[str] = Field(min_length=1)
    """The host's roles (at least one): runbook stages select hosts by role, e.g. db, worker, app."""
    vars: dict[str, Any] = {}
    """Variables of this host, seen by steps as ${name}; they win over role_vars and the inventory's vars."""

    @field_validator("roles")
    @classmethod
    def _roles(cls, value: list[str]) -> list[str]:
        for role in value:
            if not re.match(NAME, role):
                raise ValueError(f"role {role!r} must be letters, digits, '.', '_' or '-'")
        return value


DURATION = re.compile(r"(\d+)\s*([smhd])")
SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(value: Any) -> Any:
    if isinstance(value, str):
        match = DURATION.fullmatch(value.strip())
        if match is None:
            raise ValueError("expected a duration like 30m, 24h or 2d")
        return int(match[1]) * SECONDS[match[2]]
    return value


def human_duration(seconds: float) -> str:
    """30m, 24h, 2d: the largest unit that divides it (as a policy is written)."""
    for unit, size in sorted(SECONDS.items(), key=lambda item: -item[1]):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


class Policy(Strict):
    """Environment policy: protected environments need confirmation; promotion names the source."""

    protected: bool = Field(False, strict=True)
    """true: a changing run shows what it would change and asks for a yes (or needs --yes)."""
    promotion_from: str | None = Field(None, pattern=NAME)
    """An environment a version must have passed a full upgrade on first (e.g. staging for production)."""
    soak: Annotated[float, BeforeValidator(_duration)] = Field(0, ge=0)
    """How long a version must have been on promotion_from (since its first full upgrade there) before it may
    be promoted: 30m, 24h, 2d, or seconds (default 0: at once)."""


class SourceRef(BaseModel):
    """Hosts found by an inventory-source plug-in (entry-point group `overhaul.sources`) instead of listed."""

    # extra: the plug-in's own settings (for aws-ec2: filters, region, ...), which the plug-in validates.
    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)
    provider: str = Field(min_length=1)
    """The inventory source's name, e.g. aws-ec2; its other keys are that source's settings."""


def _secret_names(value: Any) -> Any:
    # Refused here, not by the dict type, whose message would repeat the value: it may be a secret.
    if not isinstance(value, dict):
        raise ValueError("expected a mapping of names to secret references like {file: PATH} or {env: VAR}")
    return value


class Inventory(Strict):
    """An environment's hosts, how to reach them, its secrets by reference and its policy: hosts/<env>.yaml."""

    environment: str = Field(pattern=NAME)
    """The environment's name: the file's name without .yaml."""
    ssh: SSHSettings = SSHSettings()
    """How to connect to the hosts."""
    hosts: list[Host] = []
    """The hosts, each with a name, an address and roles (or find them with `source:`)."""
    source: SourceRef | None = None
    """Find the hosts with an inventory source (e.g. aws-ec2 by tags) instead of, or beside, listing them."""
    vars: dict[str, Any] = {}
    """Variables seen by every step on every host as ${name} (role_vars and a host's vars win over them)."""
    role_vars: dict[str, dict[str, Any]] = {}
    """Variables per role, seen by the hosts having that role (a host's own vars win over them)."""
    secrets: Annotated[dict[str, SecretRef], BeforeValidator(_secret_names)] = {}
    """Secrets by name, by reference only ({env: VAR}, {file: PATH}, {ssm: NAME}, {aws_secret: ID}); read when needed."""
    policy: Policy = Policy()
    """What this environment demands before a changing run (confirmation, promotion)."""
    checks: str | None = None
    """Folder of testinfra checks `verify` runs (relative to where overhaul runs; default: checks/ if present)."""
    synthetic: SyntheticConfig | None = None
    """The throw-away farm `overhaul synthetic` launches and verifies (see the synthetic test's docs)."""
    notify: NotifyConfig | None = None
    """Who hears about every run: a Slack-compatible webhook (URL by reference) and Prometheus textfile metrics."""
    _path: Path | None = PrivateAttr(None)
    _found: list[Host] = PrivateAttr(default_factory=list)  # the hosts `source:` found for this load

    @property
    def found(self) -> list[Host]:
        """The hosts the inventory's `source:` found (recorded with a run, for its resume)."""
        return self._found

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


def _compact(value: Any) -> str:
    """A value as one line of JSON (keys sorted), as `overhaul inventory` shows a section it has no words for."""
    return json.dumps(value, sort_keys=True, default=str)


def _settings(model: BaseModel, skip: tuple[str, ...] = ()) -> str:
    """Every field of a settings model as `name=value`, in its schema's order (secrets by reference)."""
    said = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        if name in skip or value is None:
            continue
        if isinstance(value, SecretRef):
            text = value.describe()
        elif isinstance(value, BaseModel):
            text = _compact(value.model_dump(mode="json", exclude_none=True))
        elif isinstance(value, bool):
            text = str(value).lower()  # as YAML writes it
        else:
            text = f"{value:g}" if isinstance(value, float) else str(value)
        said.append(f"{name}={text}")
    return " ".join(said)


def sections(inventory: Inventory, offline: bool = False) -> dict[str, str]:
    """Every section of the inventory but `environment` and `hosts`, as one line each, in the schema's order:
    what `overhaul inventory` shows, so that nothing the file says (a bastion, a webhook) is hidden from review.
    A section the file leaves out says `none` or its default; a new field shows as JSON until it has words."""
    ssh, notify, source = inventory.ssh, inventory.notify, inventory.source
    bastion = ssh.bastion
    words: dict[str, str] = {
        "ssh": _settings(ssh, skip=("known_hosts", "bastion")),
        "known_hosts": str(ssh.known_hosts),
        "bastion": "none: connections go straight to each host" if bastion is None else
        f"{bastion.user or ssh.user}@{bastion.address}:{bastion.port} key_file={bastion.key_file or ssh.key_file}",
        "source": "none" if source is None else
        f"{source.provider} {_compact(source.model_extra or {})} "
        + ("(not asked: --offline)" if offline else f"({len(inventory.found)} hosts found)"),
        "vars": _compact(inventory.vars) if inventory.vars else "none",
        "role_vars": _compact(inventory.role_vars) if inventory.role_vars else "none",
        "secrets": ", ".join(f"{name} ({ref.describe()})" for name, ref in sorted(inventory.secrets.items())) or "none",
        "policy": _settings(inventory.policy),
        "checks": inventory.checks or "checks/ if there is one (default)",
        "synthetic": "none" if inventory.synthetic is None else
        _compact(inventory.synthetic.model_dump(mode="json", exclude_unset=True)),  # as the file says it
        "notify": "none" if notify is None else "; ".join(filter(None, [
            notify.webhook and f"webhook {notify.webhook.url_secret.describe()} on {', '.join(notify.events)}",
            notify.metrics and f"metrics {notify.metrics.textfile}"])) or "nothing set",
    }
    shown: dict[str, str] = {}
    for name in type(inventory).model_fields:
        if name == "ssh":
            shown.update((key, words[key]) for key in ("ssh", "known_hosts", "bastion"))
        elif name not in ("environment", "hosts"):
            value = getattr(inventory, name)
            fallback = _compact(value.model_dump(mode="json") if isinstance(value, BaseModel) else value)
            shown[name] = words.get(name, fallback)
    return shown


# hosts/NAME.example.yaml: an example of hosts/NAME.yaml to copy, not an environment (it says `environment: NAME`).
EXAMPLE = ".example"


def environments(hosts_dir: Path) -> list[str]:
    """The environments of hosts_dir: its .yaml files but the examples."""
    return sorted(path.stem for path in hosts_dir.glob("*.yaml") if not path.stem.endswith(EXAMPLE))


def examples(hosts_dir: Path) -> list[str]:
    """The example inventories of hosts_dir (NAME.example.yaml), by the name `--env` takes."""
    return sorted(path.stem for path in hosts_dir.glob(f"*{EXAMPLE}.yaml"))


def inventory_path(env: str, hosts_dir: Path = Path("hosts")) -> Path:
    """hosts_dir/<env>.yaml, for an environment name that cannot point outside hosts_dir."""
    path = hosts_dir / f"{plain_name(env, 'environment')}.yaml"
    if not path.exists():
        known = environments(hosts_dir)
        listing = ", ".join(known) if known else f"none: {hosts_dir}/ has no inventory"
        copies = examples(hosts_dir)
        if copies:
            listing += f"; examples to copy to {hosts_dir}/NAME.yaml: {', '.join(copies)}"
        raise ConfigError([f"unknown environment {env!r}: there is no {path} (environments: {listing})"])
    return path


def load_inventory(env: str, hosts_dir: Path = Path("hosts"), found: list[dict[str, Any]] | None = None,
                   offline: bool = False) -> Inventory:
    """Load hosts/<env>.yaml, validate it, resolve its paths and check its key files are readable.

    `found`: the hosts a `source:` found for a run (from its journal), used instead of asking the source
    again, so a resumed run works on the hosts it started with.
    `offline`: validate the file alone: its `source:` settings are checked but no source is asked for hosts
    (no AWS call), and the files it names (keys, known_hosts, secret files) are not looked at. For reviewing a
    file on another machine than the one that runs it (an example, a pull request); never for a run.
    """
    return load_inventory_file(inventory_path(env, hosts_dir), expected_env=env, found=found, offline=offline)


def load_inventory_file(path: Path, expected_env: str | None = None, found: list[dict[str, Any]] | None = None,
                        offline: bool = False) -> Inventory:
    """Load and validate one inventory file (see `load_inventory`)."""
    document = load_document(path)
    inventory = document.validate(Inventory)
    inventory._path = path
    if inventory.source is not None:
        if found is not None:
            hosts = [Host.model_validate(h) for h in found]
        else:
            source = source_settings(inventory.source, document)
            hosts = [] if offline else source_hosts(source, document)
        inventory._found = hosts
        inventory.hosts += hosts
    conflicts = inventory.conflicts()
    if offline and inventory.source is not None and found is None:  # its hosts were not looked up: none is no problem
        conflicts = [(location, message) for location, message in conflicts if location != ("hosts",)]
    problems = [f"{document.where(loc)}: {dotted(loc)}: {message}" for loc, message in conflicts]
    expected = expected_env.removesuffix(EXAMPLE) if expected_env and path.stem.endswith(EXAMPLE) else expected_env
    if expected and inventory.environment != expected:
        problems.append(
            f"{document.where(('environment',))}: environment: the file is {path.name} but says "
            f"{inventory.environment!r} (expected {expected!r})"
        )
    _resolve_paths(inventory, path.parent)
    if not offline:
        problems += _file_problems(inventory, document)
    if problems:
        raise ConfigError(problems)
    return inventory


def source_settings(ref: SourceRef, document: Document) -> Source:
    """The inventory source `ref` names, made from its settings (validated; nothing asked yet)."""
    try:
        plugin = source_class(ref.provider)
    except OverhaulError as exc:
        raise ConfigError([f"{document.where(('source', 'provider'))}: source.provider: {exc}"]) from None
    try:
        return plugin.model_validate(ref.model_extra or {})
    except ValidationError as exc:
        raise ConfigError(document.explain(exc, prefix=("source",))) from None


def source_hosts(source: Source, document: Document) -> list[Host]:
    """The hosts `source` finds now (its plug-in asked once), validated like listed hosts."""
    hosts = []
    for entry in source.hosts():
        try:
            hosts.append(Host.model_validate(entry))
        except ValidationError as exc:
            raise ConfigError([f"{document.where(('source',))}: source: found host {entry.get('name', '?')!r}: "
                               f"{dotted(error['loc'])}: {error['msg']}" for error in exc.errors()]) from None
    return hosts


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
    notify = inventory.notify
    if notify and notify.webhook and notify.webhook.url_secret.file is not None:
        url = notify.webhook.url_secret
        notify.webhook.url_secret = url.model_copy(update={"file": _absolute(url.file, base)})
    if notify and notify.metrics:
        notify.metrics.textfile = _absolute(notify.metrics.textfile, base)


def _file_problems(inventory: Inventory, document: Document) -> list[str]:
    """What is wrong with the files the inventory names: known_hosts unreadable; a key file that is not a
    private key, or open to group/others; a secret file missing or open to group/others."""
    ssh = inventory.ssh
    found: list[tuple[Location, str | None]] = []
    if not os.access(ssh.known_hosts, os.R_OK):
        found.append((("ssh", "known_hosts"),
                      f"{ssh.known_hosts} {'is not readable' if ssh.known_hosts.exists() else 'does not exist'}"))
    keys = [(("ssh", "key_file"), ssh.key_file), (("ssh", "bastion", "key_file"), ssh.bastion and ssh.bastion.key_file)]
    found += [(location, _key_problem(path)) for location, path in keys if path is not None]
    secrets = [(("secrets", name), ref) for name, ref in inventory.secrets.items()]
    secrets.append((("ssh", "sudo_password"), ssh.sudo_password))
    if inventory.notify and inventory.notify.webhook:
        secrets.append((("notify", "webhook", "url_secret"), inventory.notify.webhook.url_secret))
    found += [(location, _secret_problem(ref.file)) for location, ref in secrets if ref is not None and ref.file is not None]
    return [f"{document.where(location)}: {dotted(location)}: {problem}" for location, problem in found if problem]


def _secret_problem(path: Path) -> str | None:
    problem = private_file_problem(path)
    return problem and f"the secret file {problem}"


def _key_problem(path: Path) -> str | None:
    """Why `path` is no usable private key, or None: checked at load, not by three "transient" retries per host."""
    problem = private_file_problem(path)
    if problem:
        return problem
    from cryptography.exceptions import UnsupportedAlgorithm
    from paramiko import PKey, SSHException

    try:
        PKey.from_path(path)  # never prompts: a key with a passphrase raises
    except TypeError:
        return f"{path} is protected by a passphrase; Overhaul uses key files without one (and no agent)"
    except (SSHException, ValueError, UnsupportedAlgorithm):
        return f"{path} is not a private key (expected an OpenSSH or PEM private key file)"
    return None
