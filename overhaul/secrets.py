"""Secrets by reference (`{env: VAR}`, `{file: path}`, AWS SSM / Secrets Manager) and their redaction."""

from __future__ import annotations

import base64
import json
import os
import re
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
    """`value` as it commonly appears in output: itself, base64, URL-encoded, JSON-escaped and shell-quoted.

    The shell forms: `shlex.quote(value)` (`'a'"'"'b'` for a'b), and the value as it stands inside a longer
    single-quoted word, split by the quoting at each `'` (`a'"'"'b`, or `a'\\''b` as other tools write it), or
    inside double quotes (each of the four characters `"`, `$`, backquote and backslash preceded by a backslash).
    """
    data = value.encode()
    forms = {value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1],
             urllib.parse.quote(value), urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value),
             shlex.quote(value), value.replace("'", "'\"'\"'"), value.replace("'", "'\\''"),
             re.sub(r'(["$`\\])', r"\\\1", value)}
    for encoded in (base64.b64encode(data).decode(), base64.urlsafe_b64encode(data).decode()):
        forms |= {encoded, encoded.rstrip("=")}
    return forms


_SSH_SCHEMES = {"ssh", "git", "git+ssh", "ssh+git", "sftp", "scp", "rsync"}  # a user alone there is a login name


def url_secrets(value: str) -> set[str]:
    """The secret parts of a URL with userinfo (`scheme://user:password@host/...`): the password (or, with no
    password, the user, a token as in https://TOKEN@host: not on ssh-like schemes, where it is a login name), the
    userinfo, and the Basic authorization it makes (base64 of user:password). Empty for anything else."""
    try:
        parts = urllib.parse.urlsplit(value.strip())
    except ValueError:
        return set()
    if not parts.scheme or "@" not in parts.netloc:
        return set()
    userinfo = parts.netloc.rpartition("@")[0]
    user, colon, password = userinfo.partition(":")
    if not colon and parts.scheme.lower() in _SSH_SCHEMES:
        return set()
    plain = urllib.parse.unquote(user) + ":" + urllib.parse.unquote(password)
    found = {userinfo, urllib.parse.unquote(userinfo), base64.b64encode(plain.encode()).decode()}
    found |= {password, urllib.parse.unquote(password)} if colon else {user, urllib.parse.unquote(user)}
    return {part for part in found if part}


# Any URL's userinfo (`scheme://USERINFO@host`), and the values of query parameters that commonly carry a token, are
# redacted whether the Redactor knows them or not. Userinfo may hold a raw `@`: it runs to the last `@` before the
# host's end; characters never found unencoded in a URL end it too.
_USERINFO = re.compile(r"\b(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<userinfo>[^\s/?#\"<>\\^`{|}]+)@")
TOKEN_PARAMETERS = ("access_token", "api_key", "apikey", "auth", "auth_token", "client_secret", "key", "password",
                    "passwd", "private_token", "pwd", "secret", "sig", "signature", "token", "x-amz-credential",
                    "x-amz-security-token", "x-amz-signature")
_TOKEN_PARAMETER = re.compile(r"(?i)(?P<name>[?&](?:" + "|".join(map(re.escape, TOKEN_PARAMETERS)) + r")=)"
                              r"(?P<value>[^&#\s\"'<>]+)")


def _without_userinfo(match: re.Match[str]) -> str:
    userinfo = match["userinfo"]
    if ":" not in userinfo and match["scheme"].lower() in _SSH_SCHEMES:
        return match[0]
    return f"{match['scheme']}://{REDACTED}@"


def _common_prefix(words: list[str]) -> str:
    """The longest string every one of `words` starts with (character by character)."""
    shortest, longest = min(words), max(words)  # (what the smallest and largest share, all share)
    size = 0
    while size < len(shortest) and shortest[size] == longest[size]:
        size += 1
    return shortest[:size]


def _pattern(values: set[str]) -> re.Pattern[str] | None:
    """One regular expression matching any of `values`, and at any position the longest of those found there.

    The alternation is written as a trie (`ab(?:c(?:def)?|d)` for abc, abcdef, abd), so that at each position the
    engine follows one branch instead of trying every value in turn; a long value stays one literal."""
    def branches(words: list[str]) -> str:  # words: sorted, distinct; "" among them: a value may end here
        ends = "" in words
        rest = [word for word in words if word]
        parts, first = [], 0
        while first < len(rest):
            last = first
            while last < len(rest) and rest[last][0] == rest[first][0]:
                last += 1
            group = rest[first:last]
            prefix = _common_prefix(group)
            tails = [word[len(prefix):] for word in group]
            parts.append(re.escape(prefix) + (branches(tails) if len(tails) > 1 else ""))
            first = last
        if not parts:
            return ""
        body = parts[0] if len(parts) == 1 and not ends else "(?:" + "|".join(parts) + ")"
        return body + ("?" if ends else "")

    if not values:
        return None
    try:
        return re.compile(branches(sorted(values)))
    except (RecursionError, re.error):  # a pathological set (values nested hundreds deep): one flat alternation
        return re.compile("|".join(re.escape(value) for value in sorted(values, key=len, reverse=True)))


def _glued(text: str, start: int, end: int) -> bool:
    """Whether text[start:end] continues a run of letters or digits on one side (it is part of a longer word)."""
    return ((start > 0 and text[start - 1].isalnum() and text[start].isalnum())
            or (end < len(text) and text[end].isalnum() and text[end - 1].isalnum()))


def redacted_in(value: Any) -> list[str]:
    """The strings of a journaled value that hold the redaction mark: values a secret was cut out of."""
    if isinstance(value, str):
        return [value] if REDACTED in value else []
    if isinstance(value, dict):
        return [found for item in value.values() for found in redacted_in(item)]
    if isinstance(value, list | tuple):
        return [found for item in value for found in redacted_in(item)]
    return []


def _run_of(text: str, start: int, end: int, character: str) -> tuple[int, int]:
    """The span of the longest run of `character` in `text` around text[start:end] (made of it)."""
    while start > 0 and text[start - 1] == character:
        start -= 1
    while end < len(text) and text[end] == character:
        end += 1
    return start, end


class Redactor:
    """Replaces every secret value it was told about, and its common encodings, with ******** in any text; and the
    userinfo of any URL, and token-bearing query parameters (`?token=`, `&sig=`, ...), whether known or not.

    One pass over the text with one compiled expression (rebuilt at the next use after a new value was added; a
    value told again changes nothing). Where secrets overlap (the end of one is the start of another) the whole
    stretch they cover becomes one ********; where several start at one place, the longest is taken. Text already
    replaced is never looked at again, so a secret that is part of the mark itself (`****`) cannot eat into it, and
    such a secret (made only of asterisks) is not searched for inside a run of whole marks (what an earlier
    redaction left): redacting twice gives what redacting once gave.

    `walk` redacts a structured value (a fact, a run's parameters) before it is serialized: see there.
    """

    MIN_LENGTH = 4  # shorter values would redact ordinary text (and are no secret anyway)
    GLUED_BELOW = 12  # in a structured value, a secret shorter than this glued to letters or digits is a coincidence

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._lock = threading.Lock()
        # The expression, and whether some value is made only of the mark's character (replaced as one pair);
        # None: to be built again from _values at the next use.
        self._search: tuple[re.Pattern[str] | None, bool] | None = (None, False)

    def add(self, value: str) -> str:
        """Redact `value` (its base64, URL-encoded, JSON-escaped and shell-quoted forms too) from now on; and, when
        it is a URL with userinfo, its password (see `url_secrets`). Returns `value` unchanged."""
        if len(value) < self.MIN_LENGTH:
            return value
        forms = encodings(value)
        for part in url_secrets(value):
            if len(part) >= self.MIN_LENGTH:
                forms |= encodings(part)
        forms = {form for form in forms if form}
        with self._lock:
            if not forms <= self._values:  # (a value told again, e.g. the sudo password at each command: no rebuild)
                self._values |= forms
                self._search = None  # (many secrets told at once are compiled once)
        return value

    def __call__(self, text: str) -> str:
        return self._generic(self._known(text))

    def walk(self, value: Any) -> Any:
        """`value` (JSON-like: dicts, lists, strings, numbers, booleans, None) with every secret redacted inside its
        strings, before it is serialized, so that what is written is always valid JSON.

        A string holding a secret is redacted where the secret stands on its own: not glued to a letter or a digit on
        either side. A short secret (under GLUED_BELOW characters) inside a longer run of letters and digits is a
        coincidence, not a leak: the secret 2026 inside /var/backups/db-20261207T101010Z-abc.sql.gz, or inside a
        SHA-256, is left alone, since those values are what rollback and undo read back (redacted, they would name
        no file and match no digest); `password=2026`, `2026`, `1.0.2026` are redacted. A longer secret is redacted
        wherever it is. Mapping keys are left as they are (names a step chose, not values read from a host), and so
        are numbers, booleans and None: a number equal to a secret stays that number and is never turned into a
        string. Tuples come back as lists (JSON has no tuple). What the way back reads must then be checked for the
        mark (see `redacted_in`)."""
        if isinstance(value, str):
            return self._generic(self._known(value, glued_ok=True))
        if isinstance(value, dict):
            return {key: self.walk(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self.walk(item) for item in value]
        return value

    def _known(self, text: str, glued_ok: bool = False) -> str:
        pattern, starry = self._expression()
        if pattern is None or not text:
            return text
        pieces, done, stars = [], 0, (0, 0)  # stars: the last run of asterisks looked at
        match = pattern.search(text)
        while match:
            start, end = match.span()
            if glued_ok and end - start < self.GLUED_BELOW and _glued(text, start, end):
                match = pattern.search(text, start + 1)
                continue
            if starry and not text[start:end].strip(REDACTED[0]):
                if not stars[0] <= start < end <= stars[1]:
                    stars = _run_of(text, start, end, REDACTED[0])
                if (stars[1] - stars[0]) % len(REDACTED) == 0:  # inside whole marks: already redacted
                    match = pattern.search(text, start + 1)
                    continue
            probe = start + 1
            while probe < end:  # a secret that starts inside this one and ends after it: one stretch
                inner = pattern.match(text, probe)
                if inner and inner.end() > end:
                    end = inner.end()
                probe += 1
            pieces += [text[done:start], REDACTED]
            done = end
            match = pattern.search(text, end)
        return "".join(pieces) + text[done:] if pieces else text

    def _expression(self) -> tuple[re.Pattern[str] | None, bool]:
        """The compiled expression of every value told so far (built once after each new value)."""
        search = self._search
        if search is None:
            with self._lock:
                if self._search is None:
                    starry = any(not form.strip(REDACTED[0]) for form in self._values)
                    self._search = (_pattern(self._values), starry)
                search = self._search
        return search

    @staticmethod
    def _generic(text: str) -> str:
        if "@" in text:
            text = _USERINFO.sub(_without_userinfo, text)
        if "=" in text:
            text = _TOKEN_PARAMETER.sub(lambda match: match["name"] + REDACTED, text)
        return text
