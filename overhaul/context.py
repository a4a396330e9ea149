"""What a step sees of a host during one (stage, host) pair: `StepHost`, and the run's `Facts`.

The runner gives each pair its own view of the host's pooled connection instead of changing the
connection's settings stage by stage: the stage's command timeout, the run's id (steps name their
artefacts with it), the commands this pair ran (its output for the journal and the host log), and
the run's facts cache.

Facts are what steps read about a host (the installed version, the package manager, the programs'
states): read once per run and shared by every step that asks the same question, until a step
applies on that host; from then on they are read afresh (a verify after an apply never sees a value
read before it). A `Probe` is a fact read by one shell command; probes asked back to back (by a
step before its check, after an apply, by the preflight) go to the host as one command.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

from overhaul.command import Command, as_command, join, sh
from overhaul.errors import HostUnreachable
from overhaul.files import append_private
from overhaul.inventory import Inventory
from overhaul.secrets import Redactor
from overhaul.transport import CommandResult, RemoteHost, durable_command

T = TypeVar("T")
MARK = "::overhaul-probe::"  # separates the answers of probes sent as one command


@dataclass(frozen=True)
class Probe(Generic[T]):
    """A fact read by one shell command: `parse` turns the command's result (stderr merged) into the answer.

    The run's cache knows it by what is asked (`key`: the command, and the parser that reads it), never by
    `question`, which only names it: two plug-ins asking different things under the same words never share an
    answer, and probes that run the same command through the same parser share one read."""

    question: str
    command: Command
    parse: Callable[[CommandResult], T]
    stable: bool = False

    @functools.cached_property
    def key(self) -> str:  # (worked out once: a prefetch asks it of each probe twice)
        return f"{self.command.text}\0{parser_key(self.parse)}"


def parser_key(parse: Any) -> str:
    """What a parser is, as far as the answer it gives goes: its code (where it is defined), the values it closes
    over, the object a method is bound to, a partial's arguments. Two lambdas of one module differ by their line;
    one factory's parsers by what each closes over; a probe made afresh by each step from the same code and values
    is the same parser."""
    if isinstance(parse, functools.partial):
        return f"partial({parser_key(parse.func)}, {parse.args!r}, {parse.keywords!r})"
    bound = getattr(parse, "__self__", None)
    function = getattr(parse, "__func__", parse)
    code = getattr(function, "__code__", None)
    where = f"{code.co_filename}:{code.co_firstlineno}" if code is not None else repr(function)
    cells = []
    for cell in getattr(function, "__closure__", None) or ():
        try:
            cells.append(repr(cell.cell_contents))
        except ValueError:  # a cell not yet filled
            cells.append("<empty>")
    owner = f" of {type(bound).__qualname__}@{id(bound)}" if bound is not None else ""
    return f"{getattr(function, '__module__', '')}.{getattr(function, '__qualname__', '')} {where}{owner} {cells}"


def file_probe(path: str) -> Probe[str]:
    """The contents of a file on the host, stripped ("" when it does not exist): e.g. a step's marker."""
    return Probe(f"marker {path}", sh("cat -- {path} 2>/dev/null", path=path), lambda result: result.stdout.strip())


class Facts:
    """The run's cache of host facts: (host, question) -> answer.

    A stable fact (the package manager, whether a command exists) is not changed by the run's steps and
    survives their applies; every other fact is forgotten when a step applies on its host.
    """

    def __init__(self) -> None:
        # host -> question -> (answer, when it was read, stable): per host, so forgetting a host costs what
        # that host holds, not what the whole farm does (once per pair: quadratic at 1,000 hosts otherwise)
        self._hosts: dict[str, dict[str, tuple[Any, float, bool]]] = {}
        self._lock = threading.Lock()

    def get(self, host: str, question: str, read: Callable[[], T], stable: bool = False) -> T:
        with self._lock:
            known = self._hosts.get(host, {}).get(question)
        if known is not None:
            return known[0]
        answer = read()  # outside the lock: hosts read in parallel; one host's pairs never overlap
        self.put(host, question, answer, stable)
        return answer

    def known(self, host: str, question: str) -> bool:
        with self._lock:
            return question in self._hosts.get(host, {})

    def put(self, host: str, question: str, answer: Any, stable: bool = False) -> None:
        with self._lock:
            self._hosts.setdefault(host, {})[question] = (answer, time.monotonic(), stable)

    def forget(self, host: str, older_than: float = 0.0) -> None:
        """A step applied on `host` (or may have): what was read there before no longer holds. With
        `older_than`, only what was read more than that many seconds ago is forgotten."""
        now = time.monotonic()
        with self._lock:
            answers = self._hosts.get(host, {})
            for question in [question for question, (_, read_at, stable) in answers.items()
                             if not stable and now - read_at > older_than]:
                del answers[question]


class StepHost:
    """One host, for one step: run commands on it, read its vars and secrets."""

    def __init__(self, remote: RemoteHost, *, timeout: float, run_id: str, facts: Facts | None = None,
                 log: Path | None = None, on_log_error: Callable[[str], None] | None = None,
                 on_command: Callable[[CommandResult], None] | None = None,
                 on_start: Callable[[str, bool], None] | None = None):
        self.remote = remote
        self.timeout = timeout
        self.run_id = run_id
        self.facts = facts or Facts()
        self.log = log  # each command and its output (redacted) is appended here as it completes
        self._on_log_error = on_log_error or (lambda why: None)
        self._on_command = on_command or (lambda result: None)  # the live view: each command as it completes
        # ... and as it starts: (the command as the step wrote it, redacted; whether it only reads the host)
        self._on_start = on_start or (lambda command, read: None)
        self.history: list[CommandResult] = []  # every command of this pair, redacted
        self._reported: list[tuple[str, Any, bool]] = []

    @property
    def name(self) -> str:
        return self.remote.name

    @property
    def roles(self) -> list[str]:
        return self.remote.roles

    @property
    def user(self) -> str:
        return self.remote.user

    @property
    def vars(self) -> dict[str, Any]:
        return self.remote.vars

    @property
    def inventory(self) -> Inventory:
        return self.remote.inventory

    @property
    def redactor(self) -> Redactor:
        return self.remote.redactor

    def __repr__(self) -> str:
        return f"<StepHost {self.name} run {self.run_id}>"

    def fact(self, question: str, read: Callable[[StepHost], T], stable: bool = False) -> T:
        """The answer to `question` about this host: read with `read(self)` once, then shared until an apply
        on this host (for ever, if `stable`: the run's steps do not change it)."""
        return self.facts.get(self.name, question, lambda: read(self), stable)

    def read(self, probe: Probe[T]) -> T:
        """The answer of `probe` on this host (read now unless already known)."""
        return self.facts.get(self.name, probe.key, lambda: probe.parse(self._read([probe])), probe.stable)

    def prefetch(self, probes: Iterable[Probe]) -> None:
        """Read every probe not yet known in one command, so the steps that ask later find their answers."""
        missing = list({p.key: p for p in probes if not self.facts.known(self.name, p.key)}.values())
        if len(missing) < 2:
            return  # a single probe is read when it is asked
        result = self._read(missing)
        self._keep(missing, result.stdout, self.facts.put)

    def _read(self, probes: list[Probe]) -> CommandResult:
        """Send `probes` (one: its command; more: framed in one `probe_script`), told and logged as reads. More
        than one: the result returned holds the framed answers (see `sections`); the one kept in the history, the
        log and the views has each probe's answer in turn, without the marks."""
        if len(probes) == 1:
            result = self._send(probes[0].command, probes[0].command.text, read=True)
            self._done(result)
            return result
        result = self._send(probe_script(p.command for p in probes), "\n".join(p.command.text for p in probes),
                            read=True)
        answers = sections(result.stdout)
        log = (_answers(probes, answers) + _ended(result.stderr)
               + f"[{len(probes)} reads in one command: exit {result.exited}, {result.duration * 1000:.0f} ms]\n")
        self._done(replace(result, stdout="".join(_ended(output) for _, output in answers)), log)
        return result

    def run_then_read(self, command: Command | str, probes: list[Probe], *, stdin: str | None = None,
                      durable: str | None = None, label: str | None = None) -> CommandResult:
        """Run `command` (see `run`), then read `probes` in the same round trip; returns the command's result.

        The probes' answers are read after the change, so they hold after it: the runner keeps them once the
        apply has ended (everything read before it is forgotten then).
        """
        command = as_command(command)
        body = durable_command(command, durable, self.timeout) if durable else command
        sent = self._send(sh("{{ {body}\n}}; rc=$?; {probes}; exit $rc", body=body,
                             probes=probe_script(p.command for p in probes)), command.text, stdin=stdin, label=label)
        output, _, answers = sent.stdout.partition(MARK + "\n")
        result = replace(sent, stdout=output)
        self._done(result, self._logged(result) + "# read after it, in the same command:\n"
                   + _answers(probes, sections(MARK + "\n" + answers)))
        self._keep(probes, MARK + "\n" + answers, lambda host, question, answer, stable: self._reported.append(
            (question, answer, stable)))
        return result

    def forget(self) -> None:
        """This step just changed the host: what was read of it before no longer holds (read it again)."""
        self.facts.forget(self.name)

    def keep_reported(self) -> None:
        """Cache what an apply read after its change (see `run_then_read`); called by the runner after it."""
        for question, answer, stable in self._reported:
            self.facts.put(self.name, question, answer, stable)
        self._reported.clear()

    def _keep(self, probes: list[Probe], stdout: str, store: Callable[[str, str, Any, bool], None]) -> None:
        for probe, (exited, output) in zip(probes, sections(stdout), strict=False):
            try:
                answer = probe.parse(CommandResult(probe.command.text, exited, output, "", 0.0, read=True))
            except Exception:  # not cached: the step's own read reports it
                continue
            store(self.name, probe.key, answer, probe.stable)

    def run(self, command: Command | str, *, sudo: bool | None = None, stdin: str | None = None,
            timeout: float | None = None, durable: str | None = None, label: str | None = None) -> CommandResult:
        """Run `command` with sh on the host (see `RemoteHost.run`); the stage's timeout unless given.

        `command` is best built with `overhaul.command.sh` (values quoted by construction); a plain string is
        taken as shell its author wrote (see `Command.script`). `label`: what the live view shows while it runs,
        when the command's own text starts with guards that would hide its point (`apt-get install ...`); the
        log, -v and the journal keep the whole command."""
        command = as_command(command)
        result = self._send(command, command.text, sudo=sudo, stdin=stdin, timeout=timeout, durable=durable,
                            label=label)
        self._done(result)
        return result

    def _send(self, command: Command, shown: str, *, read: bool = False, sudo: bool | None = None,
              stdin: str | None = None, timeout: float | None = None, durable: str | None = None,
              label: str | None = None) -> CommandResult:
        """Run `command`, told as `shown` (the step's own command, without the engine's framing; or its `label`) as
        it starts."""
        shown = self.redactor(shown)
        self._on_start(self.redactor(label) if label else shown, read)
        try:
            result = self.remote.run(command, sudo=sudo, stdin=stdin, timeout=timeout or self.timeout, durable=durable)
        except HostUnreachable as exc:  # a frozen or lost host: the log still says which command it was in
            self._log(self.redactor(f"$ {shown}\n[no answer: {exc}]\n"))
            raise
        return replace(result, command=shown, read=read)

    def _done(self, result: CommandResult, log: str | None = None) -> None:
        """A command ended: kept in the pair's history, written to its log (`log`, else the command and its
        output), told to the live view."""
        self.history.append(result)
        # now, not when the step ends: after a crash the log shows the step in flight. Redacted again as a whole:
        # a secret split between stdout and stderr is whole only once they are joined.
        self._log(self.redactor(log if log is not None else self._logged(result)))
        self._on_command(result)

    @staticmethod
    def _logged(result: CommandResult) -> str:
        """A command as the pair's log shows it: the command as written, its output, its exit code and time."""
        return (f"$ {result.command}\n{_ended(result.stdout + result.stderr)}[exit {result.exited}, "
                f"{result.duration * 1000:.0f} ms]\n")

    def note(self, text: str) -> None:
        """A line of this pair's log that is not a command's (where its answers were read, say)."""
        self._log(f"# {text}\n")

    def _log(self, text: str) -> None:
        if self.log is not None:
            try:
                append_private(self.log, text)  # 0600 in 0700 folders: command output is nobody else's
            except OSError as exc:
                self._on_log_error(f"cannot write the run log {self.log}: {exc}")
                self.log = None

    def write_file(self, path: str, content: str, mode: int = 0o600, sudo: bool | None = None) -> CommandResult:
        """Create `path` with `mode` from the start (no window where others can read it); content on stdin."""
        return self.run(sh("umask 077 && cat > {path} && chmod {mode} -- {path}", path=path, mode=f"{mode:o}"),
                        stdin=content, sudo=sudo)

    def download(self, remote_path: str, local_path: Path) -> None:
        self.remote.download(remote_path, local_path)

    def secret(self, name: str) -> str:
        """The value of an inventory secret; from now on it is redacted from every output."""
        return self.remote.secret(name)


def _answers(probes: list[Probe], answers: list[tuple[int, str]]) -> str:
    """Probes read in one command, as a log shows them: each probe's command, its answer and exit code (a probe
    whose answer was cut short: its command alone)."""
    said = "".join(f"$ {probe.command.text}\n{_ended(output)}[exit {code}]\n"
                   for probe, (code, output) in zip(probes, answers, strict=False))
    return said + "".join(f"$ {probe.command.text}\n" for probe in probes[len(answers):])


def _ended(text: str) -> str:
    """`text` ending with a newline (nothing when empty), so what follows it in a log starts a line."""
    return text if not text or text.endswith("\n") else text + "\n"


def probe_script(commands: Iterable[Command]) -> Command:
    """One shell script that prints each command's output (stderr merged) and exit code between marks."""
    return join(sh("printf '%s\\n' {mark}; ( {command}\n) 2>&1; printf '\\n%s%d\\n' {mark} $?", mark=MARK,
                   command=command) for command in commands)


def sections(stdout: str) -> list[tuple[int, str]]:
    """(exit code, output) of each command of a `probe_script`, from its output."""
    found = []
    for chunk in stdout.split(MARK + "\n")[1:]:
        output, closed, tail = chunk.rpartition("\n" + MARK)
        code = tail.strip()
        if closed and code.lstrip("-").isdigit():  # (an answer cut short, by a timeout say, has no closing mark)
            found.append((int(code), output))
    return found
