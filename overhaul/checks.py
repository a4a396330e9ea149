"""pytest-testinfra over Overhaul's own connections: strict host keys, bastion, sudo, one pooled
connection per host, timeouts and redaction, instead of testinfra's paramiko backend (which accepts
any host key and opens connections of its own).

    import overhaul.checks, testinfra
    host = testinfra.get_host("overhaul://db1", env="production")   # or overhaul.checks.get_host("production", "db1")
    assert host.package("scalr-server").version == "1.1.0"
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import testinfra
import testinfra.backend
from testinfra.backend.base import BaseBackend, CommandResult

from overhaul.command import Command, sh
from overhaul.context import probe_script, sections
from overhaul.inventory import Inventory, load_inventory
from overhaul.transport import RemoteHost, Transport

# What testinfra's `host.system_info` asks, one command after the other, once per host and session: the first
# of them reads all three in one round trip (stderr merged) and the other two take their answer, if they come next.
SYSTEM_INFO = ("uname -s", "cat /etc/os-release", "uname -m")
# The login user's shell reads a check's command, as sshd's own exec does for testinfra's other backends (bash for
# root on Debian: checks are written with `[[`, `set -o pipefail`). As sshd does, its $0 is its bare name (`bash`,
# not `/bin/bash`: that is what its error messages start with): `sh -c` execs it as `SHELL -c COMMAND NAME`.
LOGIN_SHELL = sh("sh -c {login} sh", login='s="${SHELL:-sh}"; exec "$s" "$@" "${s##*/}"')
ENV_VARIABLE = "OVERHAUL_CHECKS_ENV"
HOSTS_DIR_VARIABLE = "OVERHAUL_CHECKS_HOSTS_DIR"

_transports: dict[tuple[str, str], Transport] = {}
_transports_lock = threading.Lock()


def _key(env: str, hosts_dir: str) -> tuple[str, str]:
    return env, str(Path(hosts_dir).resolve())


def transport_for(env: str, hosts_dir: str = "hosts", key: tuple[str, str] | None = None) -> Transport:
    """The one Transport of this process for an environment: every check reuses its connections. `key`: the
    environment's key (`_key`), when the caller worked it out already (resolving the folder costs system calls)."""
    key = key or _key(env, hosts_dir)
    with _transports_lock:
        if key not in _transports:
            _transports[key] = Transport(load_inventory(env, Path(hosts_dir)))
        return _transports[key]


@contextmanager
def sharing(transport: Transport, hosts_dir: str = "hosts") -> Iterator[None]:
    """Inside, checks of the transport's environment run on its connections (a run's own, already open):
    no second connection, no second known_hosts parse. The transport stays its owner's to close."""
    key = _key(transport.inventory.environment, hosts_dir)
    with _transports_lock:
        before = _transports.get(key)
        _transports[key] = transport
    try:
        yield
    finally:
        with _transports_lock:
            if before is None:
                _transports.pop(key, None)
            else:
                _transports[key] = before


def inventory_for(env: str, hosts_dir: str = "hosts") -> Inventory:
    return transport_for(env, hosts_dir).inventory


def forget_hosts() -> None:
    """Drop testinfra's cached `overhaul://` hosts: each caches its backend (bound to an environment) and
    facts about the machine, which a later session (another environment, a rebuilt host) must not reuse."""
    for cache in (testinfra.host.Host._host_cache, testinfra.host.Host._hosts_cache):
        for key in [key for key in cache if "overhaul://" in repr(key[0])]:
            del cache[key]


@atexit.register
def close_all() -> None:
    with _transports_lock:
        for transport in _transports.values():
            transport.close()
        _transports.clear()


class OverhaulBackend(BaseBackend):
    """testinfra backend `overhaul://HOST`, the environment given as `env=` or by OVERHAUL_CHECKS_ENV."""

    NAME = "overhaul"

    def __init__(self, hostname: str, *args: Any, env: str | None = None, hosts_dir: str | None = None, **kwargs: Any):
        super().__init__(hostname, *args, **kwargs)
        env = env or os.environ.get(ENV_VARIABLE)
        if not env:
            raise RuntimeError(f"overhaul://{hostname}: say which environment (env=... or {ENV_VARIABLE})")
        self.env = env
        self.hosts_dir = hosts_dir or os.environ.get(HOSTS_DIR_VARIABLE, "hosts")
        self._key = _key(env, self.hosts_dir)  # once, not at each command
        self._read_ahead: dict[str, CommandResult] = {}

    @property
    def remote(self) -> RemoteHost:
        return transport_for(self.env, self.hosts_dir, self._key).host(self.hostname)

    def run(self, command: str, *args: str, **kwargs: Any) -> CommandResult:
        command = self.get_command(command, *args)  # testinfra's own sudo wrapping, if asked for
        answer = self._read_ahead.pop(command, None)
        if answer is not None:
            return answer
        self._read_ahead.clear()  # only the questions asked right after may take them: later ones read afresh
        if command == SYSTEM_INFO[0]:
            return self._system_info()
        return self._ask(command)

    def _ask(self, command: str) -> CommandResult:
        """The command's output as bytes, as testinfra's own backends give it (binary content stays whole; text is
        decoded by testinfra, strictly), every secret redacted."""
        remote = self.remote
        result = remote.execute(Command.script(command), sudo=False, shell=LOGIN_SHELL)
        return self.result(result.exited, self.encode(command), _redacted(result.stdout, remote),
                           _redacted(result.stderr, remote))

    def _system_info(self) -> CommandResult:
        """`uname -s`, read with the two questions testinfra asks next (kept for them, once each)."""
        found = sections(self.remote.run(probe_script(Command.script(c) for c in SYSTEM_INFO), sudo=False).stdout)
        if len(found) != len(SYSTEM_INFO):  # cut short: ask the plain question
            return self._ask(SYSTEM_INFO[0])
        answers = {command: self.result(exited, self.encode(command), output, "")
                   for command, (exited, output) in zip(SYSTEM_INFO, found, strict=True)}
        self._read_ahead = {command: answers[command] for command in SYSTEM_INFO[1:]}
        return answers[SYSTEM_INFO[0]]


def _redacted(output: bytes, remote: RemoteHost) -> bytes:
    """`output` with every secret redacted, its other bytes as they were: text that is not UTF-8 is read as
    Latin-1 (one character per byte, so it comes back byte for byte) and searched all the same."""
    try:
        return remote.redactor(output.decode()).encode()
    except UnicodeDecodeError:
        return remote.redactor(output.decode("latin-1")).encode("latin-1")


testinfra.backend.BACKENDS.setdefault("overhaul", f"{__name__}.OverhaulBackend")


def get_host(env: str, name: str, hosts_dir: str = "hosts", **kwargs: Any) -> testinfra.host.Host:
    return testinfra.get_host(f"overhaul://{name}", env=env, hosts_dir=hosts_dir, **kwargs)
