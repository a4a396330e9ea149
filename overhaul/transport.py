"""SSH transport: one strict, pooled Fabric connection per host, reused for every command of a run.

- Host keys are checked against the inventory's known_hosts on every hop (bastion included); an
  unknown or changed key is refused, never added (Fabric's default AutoAddPolicy is replaced).
- TCP_NODELAY is set on every socket: without it each small reply waits on the 40 ms delayed ACK.
- Commands run on a paramiko channel read with select (no polling threads), are wrapped in the
  remote `timeout` so a timed-out command dies on the host too, and take secrets only on stdin.
- Connecting is retried with exponential backoff and jitter on transient faults; authentication and
  host-key failures are not retried. A command that was running when the link dropped is reported,
  not silently re-run: its effect on the host is unknown.
- A host that stops answering (frozen, overloaded) costs one deadline, not one per command: SSH
  keepalives run on every connection, and a command with no answer by its deadline closes the
  connection and reports the host unreachable.
- Durable commands run under a host-side lock named by the caller, so a retry or a resume waits for
  the one still running (from a dropped link or a killed controller) instead of starting a second.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import re
import resource
import select
import socket
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fabric
import paramiko
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from overhaul.command import Command, as_command, sh
from overhaul.errors import ConfigError, HostUnreachable, StepFailed
from overhaul.files import read_regular
from overhaul.inventory import Host, Inventory
from overhaul.secrets import Redactor

# paramiko's own thread logs a traceback when a connection is cut mid-handshake (Ctrl-C, a host gone);
# what failed reaches the operator as our own one-line error instead.
logging.getLogger("paramiko").addHandler(logging.NullHandler())
log = logging.getLogger(__name__)  # warnings for the operator: the command line shows them, a library's caller decides

KILL_GRACE = 5  # seconds `timeout` waits after SIGTERM before SIGKILL on the host
OUTPUT_GRACE = 5  # seconds a command's output may still come after its exit status (its end: EOF)
DEFAULT_TIMEOUT = 300.0  # per command, when the caller gives none
KEEPALIVE = 15  # seconds between SSH keepalives
# Seconds paramiko's thread of a connection waits for the host's next packet before it looks again whether to send a
# keepalive (at most KEEPALIVE). paramiko's own 0.1 s woke 1,000 idle connections' threads 10,000 times a second (37 %
# of a core doing nothing); data wakes the thread at once whatever this is, and a close wakes it (see _close_connection).
IDLE_WAKE = 5.0
CLOSE_WAIT = 2.0  # seconds a close waits for the connection's paramiko thread to end (it ends at once once woken)
KEEP_PER_WORKER = 10  # idle connections a pool keeps open between a host's uses, per worker, at most (see idle_bound)
LOCKS = "/var/lib/overhaul/locks"  # host-side locks of durable commands
KILLED = -1  # `exited` of a command whose process died by a signal (paramiko ignores exit-signal)


class UnknownHostKey(paramiko.SSHException):
    """The host offered a key that known_hosts does not list."""


class _RejectUnknown(paramiko.MissingHostKeyPolicy):
    def __init__(self, known_hosts: str):
        self.known_hosts = known_hosts

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise UnknownHostKey(
            f"host key of {hostname} ({key.get_name()}) is not in {self.known_hosts}: refusing to connect "
            f"(add it after checking its fingerprint SHA256:{_fingerprint(key)})"
        )


def _fingerprint(key: paramiko.PKey) -> str:
    import base64
    import hashlib

    return base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


NEVER_RETRY = (paramiko.AuthenticationException, paramiko.BadHostKeyException, UnknownHostKey)
TRANSIENT = (paramiko.SSHException, OSError, EOFError)
AUTH_TIMEOUT = "Authentication timeout."  # paramiko's, when the server did not answer the login in `auth_timeout`


def retryable(exc: BaseException) -> bool:
    """A connection fault worth another try: the network, the SSH protocol, or a login the server did not answer in
    time (a loaded sshd); never a login refused, nor a host key that does not match."""
    if isinstance(exc, paramiko.AuthenticationException):
        return str(exc) == AUTH_TIMEOUT
    return isinstance(exc, TRANSIENT) and not isinstance(exc, NEVER_RETRY)


@dataclass
class CommandResult:
    """What one remote command did. Output is already redacted.

    `command` is the command as its caller wrote it, without what the transport wraps around it (the durable lock,
    the remote `timeout`, sudo); `read`: it only read the host's state (a probe), which views leave out unless -v."""

    command: str
    exited: int
    stdout: str
    stderr: str
    duration: float
    timed_out: bool = False
    read: bool = False

    @property
    def ok(self) -> bool:
        return self.exited == 0

    @property
    def killed(self) -> bool:
        return self.exited == KILLED

    def tail(self, limit: int = 400) -> str:
        if self.killed:
            return "killed by a signal on the host (the connection is fine)"
        text = (self.stderr.strip() or self.stdout.strip()) or "(no output)"
        return text if len(text) <= limit else "..." + text[-limit:]


class RemoteHost:
    """An inventory host as steps see it: its name, roles and vars, and commands run on it."""

    def __init__(self, host: Host, inventory: Inventory, redactor: Redactor, gateway: fabric.Connection | None,
                 gateway_lock: threading.Lock | None = None, host_keys: paramiko.HostKeys | None = None):
        self.host = host
        self.inventory = inventory
        self.redactor = redactor
        self.vars = inventory.host_vars(host)
        self.history: list[CommandResult] = []
        self._gateway = gateway
        self._gateway_lock = gateway_lock or threading.Lock()
        self._host_keys = host_keys
        self._sudo_password_needed: bool | None = None
        self._connection: fabric.Connection | None = None
        self._lock = threading.Lock()
        self._sessions = threading.BoundedSemaphore(inventory.ssh.max_sessions)
        self._opening = threading.Lock()
        self._cut = False  # the run cut its connections (a second Ctrl-C): no command may reconnect
        self._in_flight = 0  # commands running on the connection: a close waits for them (see close)
        self._close_when_idle = False
        self.opened = 0  # connections opened (SSH handshakes made) to this host, by this object

    @property
    def connected(self) -> bool:
        """Whether this host's connection is open now."""
        connection = self._connection
        return connection is not None and connection.is_connected

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def roles(self) -> list[str]:
        return self.host.roles

    @property
    def user(self) -> str:
        return self.host.user or self.inventory.ssh.user

    def __repr__(self) -> str:
        return f"<RemoteHost {self.name} {self.host.address}>"

    # -- connecting ------------------------------------------------------------------------
    def connect(self) -> fabric.Connection:
        """The open connection (opened, retrying transient faults, unless it already is)."""
        with self._lock:
            if self._cut:
                raise HostUnreachable(f"{self.name}: not connecting: the run's connections were cut (Ctrl-C)")
            if self.connected:
                return self._connection
            ssh = self.inventory.ssh
            retrying = Retrying(
                retry=retry_if_exception(retryable),
                stop=stop_after_attempt(ssh.connect_retries),
                wait=wait_exponential_jitter(max=8, jitter=0.5),
                reraise=True,
            )
            endpoint = f"{self.name} ({self.user}@{self.host.address}:{self.host.port or ssh.port})"
            try:
                self._connection = retrying(self._open)
                self.opened += 1
            except paramiko.BadHostKeyException as exc:
                raise HostUnreachable(
                    f"{endpoint}: host key does not match {ssh.known_hosts} (expected "
                    f"SHA256:{_fingerprint(exc.expected_key)}, got SHA256:{_fingerprint(exc.key)}): refusing to "
                    "connect; if the host was rebuilt, check and update known_hosts"
                ) from None
            except UnknownHostKey as exc:
                raise HostUnreachable(f"{endpoint}: {exc}") from None
            except paramiko.AuthenticationException as exc:
                raise HostUnreachable(f"{endpoint}: authentication failed: {exc}") from None
            except TRANSIENT as exc:
                reason = (exc.strerror or str(exc)).lower() if isinstance(exc, OSError) else str(exc)
                raise HostUnreachable(
                    f"{endpoint}: {reason or type(exc).__name__} after {ssh.connect_retries} attempts"
                ) from None
            return self._connection

    def _open(self) -> fabric.Connection:
        ssh = self.inventory.ssh
        port = self.host.port or ssh.port
        kwargs: dict[str, Any] = {}
        if self._gateway is None:
            kwargs["sock"] = _fast_socket(self.host.address, port, ssh.connect_timeout)
        else:
            with self._gateway_lock:  # one thread opens the shared bastion connection; the others reuse it
                self._gateway.open()
                _set_nodelay(self._gateway)
        connection = make_connection(self.host.address, port, self.user, self.inventory, self._gateway, kwargs,
                                     self._host_keys)
        try:
            connection.open()
        except BaseException:
            connection.client.close()
            raise
        _set_nodelay(connection)
        connection.transport.set_keepalive(KEEPALIVE)
        connection.transport.sock.settimeout(IDLE_WAKE)  # (set after the handshake, whose own timeout it would delay)
        return connection

    def cut(self) -> None:
        """Close now, and refuse to connect again: commands still queued for a channel end unreachable."""
        with self._lock:
            self._cut = True
        self.close(now=True)

    def close(self, now: bool = False) -> None:
        """Close the connection; one that commands are still running on is closed as the last of them ends,
        unless `now` (Ctrl-C, the run's end): between two uses of a host, a check's command is never cut."""
        with self._lock:
            if self._in_flight and not now:
                self._close_when_idle = True
                return
            connection, self._connection = self._connection, None
        if connection is not None:
            _close_connection(connection)

    def _drop(self, connection: fabric.Connection) -> None:
        """This connection failed: close it, unless a reconnect already replaced it."""
        with self._lock:
            if self._connection is connection:
                self._connection = None
        _close_connection(connection)

    # -- running ---------------------------------------------------------------------------
    def run(
        self, command: Command | str, *, sudo: bool | None = None, stdin: str | None = None,
        timeout: float | None = None, durable: str | None = None,
    ) -> CommandResult:
        """Run `command` with sh on the host; stdin (for secrets and file contents) never shows in logs.

        Exit codes are returned, not raised: the step decides what a failure means. With `durable` (a lock
        name), the command's output goes to files on the host until it ends, so a dropped connection (or a
        killed controller) cannot kill it half-way with SIGPIPE: package installs and reconfigures finish.
        It runs under the host-side lock `durable`: a second one (a retry, a resume) waits for the first to
        end, and should then find its work done (the command checks that itself, under the lock).
        """
        timeout = timeout or DEFAULT_TIMEOUT
        command = as_command(command)
        sent = durable_command(command, durable, timeout) if durable else command
        raw = self.execute(sent, sudo=sudo, stdin=stdin, timeout=timeout)
        out, err = raw.stdout.decode(errors="replace"), raw.stderr.decode(errors="replace")
        if raw.exited == KILLED:
            err += "\n[the command was killed by a signal on the host]"
        result = CommandResult(
            command=self.redactor(command.text), exited=raw.exited, stdout=self.redactor(out),
            stderr=self.redactor(err), duration=raw.duration, timed_out=raw.timed_out,
        )
        self.history.append(result)
        return result

    def execute(self, command: Command, *, sudo: bool | None = None, stdin: str | None = None,
                timeout: float | None = None, shell: Command | None = None) -> RawResult:
        """Run `command` under the remote `timeout` and give its output as bytes, neither decoded nor redacted.

        `shell`: the shell that reads the command (default `sh`; the checks use the login user's own).
        """
        timeout = timeout or DEFAULT_TIMEOUT
        use_sudo = self.inventory.ssh.sudo if sudo is None else sudo
        line = sh("timeout -k {grace} {seconds} {shell} -c {command}", grace=KILL_GRACE, seconds=timeout,
                  shell=shell or sh("sh"), command=command.text)
        payload = stdin or ""
        connection = self.connect()
        if use_sudo and self.user != "root":
            if self._sudo_needs_password(connection):
                # -k: sudo ignores any cached ticket, so it always reads the password first and the
                # command's own stdin never receives it.
                line = sh("sudo -k -S -p '' -- {line}", line=line)
                payload = self.redactor.add(self._sudo_password()) + "\n" + payload
            else:
                line = sh("sudo -n -- {line}", line=line)
        exited, out, err, duration = self._exec(connection, line.text, payload.encode(), timeout + KILL_GRACE + 5)
        return RawResult(exited, out, err, duration, exited == 124)

    def _sudo_needs_password(self, connection: fabric.Connection) -> bool:
        """Asked once per host: does sudo want a password here (no NOPASSWD rule)?"""
        if self._sudo_password_needed is None:
            probe = self._exec(connection, "sudo -k -n true", b"", self.inventory.ssh.connect_timeout)
            self._sudo_password_needed = probe[0] != 0
        return self._sudo_password_needed

    def _sudo_password(self) -> str:
        if self.inventory.ssh.sudo_password is None:
            raise HostUnreachable(f"{self.name}: sudo needs a password here, and the inventory has no ssh.sudo_password")
        return self.inventory.ssh.sudo_password.resolve()

    def _exec(self, connection: fabric.Connection, line: str, stdin: bytes,
              budget: float) -> tuple[int, bytes, bytes, float]:
        """One command on one channel of `connection`, which stays open while it runs (see `close`): (exit code,
        stdout, stderr, seconds it ran). `budget`: how long the host has to answer once the command started; the
        wait for a free channel before it is not counted (a queue is not a frozen host)."""
        with self._lock:
            self._in_flight += 1
        try:
            with self._sessions:  # at most ssh.max_sessions channels at once: sshd refuses the ones past its own
                return self._exec_channel(connection, line, stdin, budget)
        finally:
            with self._lock:
                self._in_flight -= 1
                idle_close = self._in_flight == 0 and self._close_when_idle
                if idle_close:
                    self._close_when_idle = False
            if idle_close:
                self.close()

    def _open_channel(self, connection: fabric.Connection, budget: float) -> tuple[fabric.Connection,
                                                                                      paramiko.Channel]:
        """A new session channel. A refused one (sshd's MaxSessions, when others hold channels on this connection
        too) is waited for, up to `budget` seconds while other commands of ours hold channels (they free one by
        then), `connect_timeout` when none does (the host refuses sessions outright); a link that dropped before
        the command started is reconnected once."""
        connect_timeout = self.inventory.ssh.connect_timeout
        with self._lock:
            others = self._in_flight > 1
        deadline = time.monotonic() + (budget if others else connect_timeout)
        delay = 0.05
        while True:
            transport = connection.transport
            wait = connect_timeout
            try:
                # One open at a time per connection: paramiko keeps a refusal in one slot per transport, which a
                # concurrent open could take for its own (it then says "Unable to open channel.").
                with self._opening:
                    return connection, transport.open_session(timeout=wait)
            except TRANSIENT as exc:
                refused = isinstance(exc, paramiko.SSHException) and "Timeout" not in str(exc)
                if refused and transport.is_active():
                    if time.monotonic() + delay > deadline:
                        raise HostUnreachable(f"{self.name}: the host refused a new session for "
                                              f"{budget if others else connect_timeout:g} s (sshd MaxSessions lower "
                                              "than ssh.max_sessions, or sessions not allowed?)") from None
                    time.sleep(delay)  # back-pressure, not a dead host: the running commands go on
                    delay = min(delay * 2, 1.0)
                    continue
                if transport.is_active():  # the link is up, the host does not answer: frozen or overloaded
                    self._drop(connection)
                    raise HostUnreachable(f"{self.name}: no answer within {wait:g} s (host frozen or overloaded?)") \
                        from None
                self._drop(connection)  # the link dropped and the command never started: reconnect once
                connection = self.connect()
                try:
                    with self._opening:
                        return connection, connection.transport.open_session(timeout=self.inventory.ssh.connect_timeout)
                except TRANSIENT:
                    raise HostUnreachable(f"{self.name}: cannot open a session: {exc}") from None

    def _exec_channel(self, connection: fabric.Connection, line: str, stdin: bytes,
                      budget: float) -> tuple[int, bytes, bytes, float]:
        connection, channel = self._open_channel(connection, budget)
        transport = connection.transport
        started = time.monotonic()
        deadline = started + budget
        out, err = bytearray(), bytearray()
        try:
            channel.exec_command(line)
            if stdin:
                channel.sendall(stdin)
            channel.shutdown_write()
            readable = select.poll()  # not select.select: it refuses file descriptors >= 1024 (many hosts)
            readable.register(channel, select.POLLIN)
            exited = 0.0  # when the exit status came, while the output had not ended
            while True:
                if channel.recv_ready():
                    out += channel.recv(65536)
                elif channel.recv_stderr_ready():
                    err += channel.recv_stderr(65536)
                elif channel.closed or (channel.eof_received and channel.exit_status_ready()):
                    break
                elif exited and time.monotonic() > min(exited + OUTPUT_GRACE, deadline):
                    break  # a background process the command started holds its output open
                else:
                    if not exited and channel.exit_status_ready():
                        # sshd sends the exit status as the command ends, while what it wrote last may still be in
                        # its pipe: the output ends at EOF.
                        exited = time.monotonic()
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        # Past the remote `timeout` and its grace: the host itself is not answering.
                        self._drop(connection)
                        raise HostUnreachable(f"{self.name}: no answer by the command's deadline (timeout + "
                                              f"{KILL_GRACE + 5} s): host frozen or overloaded?")
                    if channel.eof_received:
                        # The output has ended, the exit status has not come: paramiko leaves the channel's pipe
                        # readable after EOF, so poll would return at once (hundreds of turns per command).
                        channel.status_event.wait(min(remaining, 1.0))
                    else:
                        readable.poll(min(remaining, 1.0) * 1000)
            # The transport thread may have fed the last data just before the end: drain it.
            while channel.recv_ready():
                out += channel.recv(65536)
            while channel.recv_stderr_ready():
                err += channel.recv_stderr(65536)
            status = channel.recv_exit_status()
        except TRANSIENT as exc:
            self._drop(connection)
            raise HostUnreachable(self._lost(f": {exc}")) from None
        finally:
            channel.close()
        if status == -1 and not transport.is_active():
            self._drop(connection)
            raise HostUnreachable(self._lost())
        return status, bytes(out), bytes(err), time.monotonic() - started

    def _lost(self, detail: str = "") -> str:
        """Why a command's connection ended under it: the operator's cut, or a lost connection."""
        if self._cut:
            return f"{self.name}: the operator cut the connection during a command (Ctrl-C twice; its effect is unknown)"
        return f"{self.name}: connection lost during a command (its effect is unknown){detail}"

    def download(self, remote_path: str, local_path: Path) -> None:
        """Copy a file from the host over this host's connection (SFTP)."""
        connection = self.connect()
        try:
            connection.sftp().get(remote_path, str(local_path))
        except TRANSIENT as exc:
            raise HostUnreachable(f"{self.name}: cannot copy {remote_path}: {exc}") from None

    def secret(self, name: str) -> str:
        """The value of an inventory secret; from now on it is redacted from every output."""
        try:
            ref = self.inventory.secrets[name]
        except KeyError:
            known = ", ".join(sorted(self.inventory.secrets)) or "none"
            raise StepFailed(f"no secret named {name!r} in the inventory (secrets: {known})") from None
        return self.redactor.add(ref.resolve())


def durable_command(command: Command, lock: str, wait: float) -> Command:
    """`command` under the host-side lock `lock`, its output kept in files until it ends.

    `flock -o`: the lock belongs to flock itself, not to daemons the command may start. The lock's file name
    keeps only safe characters of `lock` (a step may name it after a parameter), with a digest when it differs.
    """
    body = sh('o=$(mktemp) e=$(mktemp); ( {command}\n) >"$o" 2>"$e"; rc=$?; '
              'cat "$o"; cat "$e" >&2; rm -f "$o" "$e"; exit $rc', command=command)
    return sh("mkdir -p {locks} && {{ flock -o -n {path} true || echo {waiting} >&2; }} && "
              "flock -o -w {wait} {path} sh -c {body}", locks=LOCKS, path=f"{LOCKS}/{lock_file_name(lock)}",
              waiting=f"overhaul: waiting for the same command, still running on this host ({lock})", wait=wait,
              body=body.text)


def lock_file_name(lock: str) -> str:
    """A file name for a host-side lock: `lock`'s letters, digits, '.', '_' and '-', plus a digest if others were
    dropped (two different names never share a lock file by accident)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", lock)[:80].lstrip(".") or "_"
    if safe != lock:
        safe += "-" + hashlib.sha256(lock.encode()).hexdigest()[:12]
    return safe + ".lock"


@dataclass
class RawResult:
    """What a command gave, as bytes (see RemoteHost.execute)."""

    exited: int
    stdout: bytes
    stderr: bytes
    duration: float
    timed_out: bool = False


class KnownHosts(paramiko.HostKeys):
    """paramiko's HostKeys, with a lookup by name in constant time.

    paramiko compares the name with every entry at each lookup: once per connection, so a run over N
    hosts with N known_hosts lines made N^2 comparisons (2 million at 1,000 hosts, seconds of CPU).
    Here plain names are indexed; hashed (`|1|`) entries, which only a hash of the name can match, are
    still tried one by one, and the first matching line in file order wins, as before. Filled by
    load_known_hosts only (connections refuse unknown keys, never add one).
    """

    def __init__(self) -> None:
        super().__init__()
        self._plain: dict[str, list[int]] = {}  # name -> positions of its lines in _entries
        self._hashed: list[int] = []

    def append(self, entry: paramiko.hostkeys.HostKeyEntry) -> None:
        position = len(self._entries)
        self._entries.append(entry)
        for name in entry.hostnames:
            if name.startswith("|1|"):
                self._hashed.append(position)
            else:
                self._plain.setdefault(name, []).append(position)

    def lookup(self, hostname: str) -> _KeysOfHost | None:
        """The host's keys by type (the first line of each type wins), or None; as paramiko's, without the
        class paramiko's lookup defines at each call (hundreds of microseconds, twice per connection)."""
        positions = sorted(set(self._plain.get(hostname, [])) | set(self._hashed))
        keys = _KeysOfHost()
        for entry in (self._entries[position] for position in positions):
            if entry.key is not None and self._hostname_matches(hostname, entry):
                keys.setdefault(entry.key.get_name(), entry.key)
        return keys or None


class _KeysOfHost(dict):
    """A host's known keys by type. `keys()` is a list, as in paramiko's lookup result: SSHClient.connect
    indexes it (the type it asks the server for first)."""

    def keys(self) -> list[str]:  # type: ignore[override]
        return list(super().keys())


KNOWN_HOSTS_LIMIT = 64 * 1024 * 1024  # bytes: far above any real known_hosts, far below what /dev/zero would feed


def load_known_hosts(path: Path) -> KnownHosts:
    """known_hosts parsed once, in linear time (paramiko's own load checks each line against all before it).

    Duplicate lines are kept rather than merged: a lookup finds the first, as OpenSSH does. A line that is not a
    valid entry (cut short, a bad key) is skipped with a warning naming it, as OpenSSH does: it must not stop
    connections to every other host. Only a regular file is read (a FIFO or /dev/zero would hang or fill memory).
    """
    keys = KnownHosts()
    text = _read_known_hosts(path)
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            entry = paramiko.hostkeys.HostKeyEntry.from_line(line, number)
        except Exception as exc:  # paramiko raises SSHException, InvalidHostKey, binascii or ValueError by case
            reason = exc.args[-1] if isinstance(exc, paramiko.hostkeys.InvalidHostKey) else exc
            log.warning("%s:%d: not a valid known_hosts entry, skipped (%s)", path, number,
                        str(reason) or type(reason).__name__)
            continue
        if entry is None:
            log.warning("%s:%d: not a valid known_hosts entry, skipped", path, number)
            continue
        keys.append(entry)
    return keys


def _read_known_hosts(path: Path) -> str:
    try:
        return read_regular(path.expanduser(), KNOWN_HOSTS_LIMIT, "a known_hosts file").decode(errors="replace")
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the known_hosts file: {exc.strerror}"]) from None


class _Connection(fabric.Connection):
    # fabric's __init__ sets this attribute without declaring it, and invoke stores an undeclared attribute in
    # the configuration, which it then merges again (clears and refills): with one configuration shared by
    # every connection, a connection made in one thread made another's read of it fail.
    inline_ssh_env = None


@functools.cache
def _fabric_config() -> fabric.Config:
    """One Fabric configuration for every connection (building one reads its files and merges its levels:
    3 ms of CPU per host); connections only read it. ~/.ssh/config is not read: the inventory says it all."""
    return fabric.Config(overrides={"load_ssh_configs": False})


def make_connection(
    address: str, port: int, user: str, inventory: Inventory, gateway: fabric.Connection | None,
    connect_kwargs: dict[str, Any] | None = None, host_keys: paramiko.HostKeys | None = None,
    key_file: Path | None = None,
) -> fabric.Connection:
    """A Fabric connection that checks host keys strictly and ignores ~/.ssh/config.

    `host_keys`: the run's known_hosts, parsed once and shared (read-only) by every connection.
    `key_file`: the private key to log in with (default: the inventory's `ssh.key_file`).
    """
    ssh = inventory.ssh
    kwargs: dict[str, Any] = {
        "look_for_keys": False, "allow_agent": False,
        "banner_timeout": ssh.connect_timeout, "auth_timeout": ssh.connect_timeout,
        **(connect_kwargs or {}),
    }
    key_file = key_file or ssh.key_file
    if key_file:
        kwargs["pkey"] = private_key(key_file)
    connection = _Connection(
        address, user=user, port=port, config=_fabric_config(), gateway=gateway,
        connect_timeout=ssh.connect_timeout, connect_kwargs=kwargs,
    )
    connection.client._host_keys = host_keys if host_keys is not None else load_known_hosts(ssh.known_hosts)
    connection.client._system_host_keys = KnownHosts()  # none: only the inventory's known_hosts counts
    connection.client.set_missing_host_key_policy(_RejectUnknown(str(ssh.known_hosts)))
    return connection


def private_key(path: Path) -> paramiko.PKey:
    """The private key at `path`, with its OpenSSH certificate (`-cert.pub`) when there is one, read once per
    version of the two files (given as `key_filename`, paramiko reads and parses them at every connection). A
    renewed certificate is read at the next connection; the bastion's connection keeps what it was made with."""
    return _read_private_key(str(path), _version(path), _version(Path(f"{path}-cert.pub")))


def _version(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=8)
def _read_private_key(path: str, key: tuple[int, int] | None, certificate: tuple[int, int] | None) -> paramiko.PKey:
    return paramiko.PKey.from_path(path)


def _fast_socket(address: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((address, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _set_nodelay(connection: fabric.Connection) -> None:
    sock = connection.transport.sock
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _close_connection(connection: fabric.Connection) -> None:
    """Close `connection`, and let its paramiko thread end now rather than at its next wake (up to IDLE_WAKE later).

    Closing the socket does not wake a thread blocked reading it (Linux), and that thread keeps the connection open
    until it wakes: shutting the socket down first ends its read at once; then wait for the thread, so that a pool's
    count of threads is exact (a run of more hosts than its pool keeps closes connections all along)."""
    transport = connection.transport
    if transport is not None and isinstance(transport.sock, socket.socket):
        with contextlib.suppress(OSError):  # already closed, or never connected
            transport.sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(EOFError, OSError, paramiko.SSHException):  # (its goodbyes meet the shut socket)
        connection.close()
    if transport is not None and transport.is_alive() and transport is not threading.current_thread():
        transport.join(CLOSE_WAIT)


def idle_bound(workers: int, hosts: int) -> int:
    """How many idle connections a pool of `workers` keeps open between their hosts' uses, for a farm of `hosts`.

    A kept connection costs a socket, paramiko's thread (asleep while idle, see IDLE_WAKE) and about 64 KB; a
    reopened one costs an SSH handshake (a few ms of the controller's CPU, tens of the host's). The bound is the
    farm (no reconnection at all), but at most KEEP_PER_WORKER per worker (forks 100: 1,000 hosts), and half of the
    process's open-files limit left after the workers' own connections."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    files = soft // 2 - workers if soft != resource.RLIM_INFINITY else hosts
    return max(0, min(hosts, KEEP_PER_WORKER * workers, files))



class HostPool:
    """One connection per host, shared by a run's users (its runner, verify's checks): who holds which host, which
    idle connections stay open between a host's uses (see park), and connecting many at once. Subclasses (the SSH
    `Transport`, the test kit's fake) make the hosts (`host`), set `max_workers` and `_hosts`, and keep both under
    `_lock`; `keep` (None: `idle_bound` of the workers and the inventory's hosts) may be set to bound the idle ones."""

    inventory: Inventory
    max_workers: int
    keep: int | None = None
    _hosts: dict[str, Any]

    def __init__(self) -> None:
        self._users: Counter[str] = Counter()  # hosts held open (see hold/release), by how many users
        self._idle: OrderedDict[str, None] = OrderedDict()  # parked hosts, the longest idle first (see park)
        self._cut = False  # see cut
        self._lock = threading.Lock()

    @property
    def idle_limit(self) -> int:
        """How many idle connections park keeps open at most: `keep`, or `idle_bound` of this pool."""
        if self.keep is not None:
            return self.keep
        return idle_bound(self.max_workers, len(self.inventory.hosts))

    def host(self, name: str) -> Any:
        raise NotImplementedError

    def hold(self, names: Iterable[str]) -> None:
        """One more user (a runner, the checks) works on these hosts: `release` closes none of them before it."""
        with self._lock:
            for name in names:  # (not Counter.update: given a dict, it would add its values)
                self._users[name] += 1

    def release(self, name: str) -> None:
        """A user is done with a host: once no user holds it, its connection (and paramiko's thread) is closed.

        This is what keeps a 1,000-host run at `forks` connections and threads, not 1,000. A host used
        again reconnects."""
        with self._lock:
            self._users[name] -= 1
            if self._users[name] > 0:
                return
            del self._users[name]
            self._idle.pop(name, None)
            host = self._hosts.get(name)
        if host is not None:
            host.close()

    def take(self, name: str) -> None:
        """A worker starts on this host (in a run that parks its hosts): its idle connection is in use again, not one
        `park` may close to keep the idle ones within `idle_limit`."""
        with self._lock:
            self._idle.pop(name, None)

    def park(self, name: str, held: bool = True) -> None:
        """Between two uses of a host, in a run of more hosts than workers: keep its connection open, idle, for its
        next use; if the pool then keeps more idle connections than `idle_limit`, close the one idle longest (its
        host's next use reconnects). A host another user holds (a verify's checks) is left to them; `held`: the
        caller holds it too.

        Idle, a connection costs a socket, some memory and paramiko's thread, which sleeps (IDLE_WAKE); reopened,
        an SSH handshake. So a run keeps at most `max_workers` connections in use plus `idle_limit` idle ones
        (threads likewise), and a farm within that bound is connected to once per run, not once per stage."""
        with self._lock:
            if self._users[name] > (1 if held else 0):
                return
            host = self._hosts.get(name)
            if host is None or not host.connected:
                self._idle.pop(name, None)
                return
            self._idle[name] = None
            self._idle.move_to_end(name)
            limit = self.idle_limit
            while len(self._idle) > limit:
                oldest, _ = self._idle.popitem(last=False)
                self._hosts[oldest].close()  # (under the lock: `take` cannot hand out a connection being closed)

    def warm_first(self, names: list[str]) -> list[str]:
        """`names` with those whose idle connection is still open first, the longest idle first (those `park` would
        close next), then the others in their order: a stage walked in this order reuses every connection kept."""
        wanted = set(names)
        with self._lock:
            warm = [name for name in self._idle if name in wanted]
        kept = set(warm)
        return warm + [name for name in names if name not in kept]

    def parks(self, names: Collection[str]) -> bool:
        """Whether a run over these hosts parks each one between its uses (see `park`): more hosts than workers."""
        return len(names) > self.max_workers

    def connect(self, names: list[str], then: Callable[[str], None] | None = None) -> dict[str, HostUnreachable]:
        """Connect to every named host in parallel (at most `max_workers` at once); the hosts that could not be
        reached. With `then`, a host's worker goes on to `then(name)` once connected, and parks the host after it
        when this pool parks these hosts (more of them than workers)."""
        failures: dict[str, HostUnreachable] = {}
        parking = then is not None and self.parks(names)

        def attempt(name: str) -> None:
            if parking:
                self.take(name)
            try:
                self.host(name).connect()
            except HostUnreachable as exc:
                failures[name] = exc
                return
            if then is None:
                return
            try:
                then(name)
            finally:
                if parking:
                    self.park(name, held=False)

        with ThreadPoolExecutor(max_workers=min(self.max_workers, max(len(names), 1))) as pool:
            list(pool.map(attempt, names))
        return failures

    def close(self, cut: bool = False) -> None:
        """Close every connection now; with `cut`, let none be opened again (see `cut`)."""
        with self._lock:  # (workers may still be adding hosts: Ctrl-C's grace timer closes under them)
            self._cut = self._cut or cut
            self._idle.clear()
            hosts = list(self._hosts.values())
        for host in hosts:
            if cut:
                host.cut()
            else:
                host.close(now=True)

    def cut(self) -> None:
        """Ctrl-C's cut: close every connection now, and let none be opened again (a command queued for a channel
        or waiting out a refusal would otherwise reconnect after the operator asked to stop)."""
        self.close(cut=True)


class Transport(HostPool):
    """The connections of one run: one per host, opened in parallel, closed together."""

    def __init__(self, inventory: Inventory, redactor: Redactor | None = None, max_workers: int | None = None):
        self.inventory = inventory
        self.redactor = redactor or Redactor()
        super().__init__()
        self.max_workers = max_workers or max(1, min(inventory.ssh.forks, len(inventory.hosts)))
        self.host_keys = load_known_hosts(inventory.ssh.known_hosts)  # once per run, shared by every connection
        self._hosts: dict[str, RemoteHost] = {}
        self._gateway = self._make_gateway()
        self._gateway_lock = threading.Lock()

    def _make_gateway(self) -> fabric.Connection | None:
        bastion = self.inventory.ssh.bastion
        if bastion is None:
            return None
        return make_connection(bastion.address, bastion.port, bastion.user or self.inventory.ssh.user, self.inventory,
                               None, host_keys=self.host_keys, key_file=bastion.key_file)

    def host(self, name: str) -> RemoteHost:
        with self._lock:  # the runner's workers and the checks' sessions ask at once: one RemoteHost per name
            if name not in self._hosts:
                self._hosts[name] = RemoteHost(self.inventory.host(name), self.inventory, self.redactor, self._gateway,
                                               self._gateway_lock, self.host_keys)
                self._hosts[name]._cut = self._cut
            return self._hosts[name]

    def connect(self, names: list[str], then: Callable[[str], None] | None = None) -> dict[str, HostUnreachable]:
        """Connect to every named host in parallel; return the hosts that could not be reached.

        With `then`, a host's worker goes on to `then(name)` once it is connected, and parks the host after it
        when there are more hosts than workers (see `park`: it stays open, idle, within the pool's bound)."""
        if self._gateway is not None:
            try:
                self._gateway.open()
                _set_nodelay(self._gateway)
            except (*TRANSIENT, *NEVER_RETRY) as exc:
                bastion = self.inventory.ssh.bastion
                assert bastion is not None
                error = HostUnreachable(f"bastion {bastion.address}:{bastion.port}: {exc}")
                return dict.fromkeys(names, error)
        return super().connect(names, then)

    def close(self, cut: bool = False) -> None:
        super().close(cut)
        if self._gateway is not None:
            self._gateway.close()

