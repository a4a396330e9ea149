"""Shell commands as a type: text a program's author wrote, with every value quoted by construction.

A `Command` is what reaches a host's shell. It is made in one of two ways only:

- `sh(template, **values)`: the template is shell written in the code (a literal), and each `{name}` field in
  it is replaced by its value *quoted* for a POSIX shell (a list is quoted item by item); a value that is
  itself a `Command` is inserted as it is, since it was built the same way. No value can become shell syntax.
- `Command.script(text)`: shell that its author wrote as shell on purpose (a `shell` step's `command`, a
  hook's): taken as is. Nothing computed from a parameter should ever go through it.

pyinfra's `StringCommand`/`QuoteString` is the model: quoting is a property of the type, not a habit.
"""

from __future__ import annotations

import functools
import shlex
import string
from collections.abc import Iterable
from pathlib import PurePath
from typing import Any

_FORMATTER = string.Formatter()
# Where a quoted value is not safe (see open_quote), as messages name it.
CONTEXTS = {"'": "'...'", '"': '"..."', "$'": "$'...'", "`": "backticks", "((": "an arithmetic (( ))",
            "[[": "a [[ ]] test (its operands may be arithmetic)", "<<": "a here-document"}


class Command:
    """A shell command ready to send; `str(command)` is its text."""

    __slots__ = ("text",)

    def __init__(self, text: str, _token: object = None) -> None:
        if _token is not _BUILDER:
            raise TypeError("build a Command with sh(template, **values) or Command.script(text)")
        self.text = text

    @classmethod
    def script(cls, text: str) -> Command:
        """Shell written as shell by whoever owns it (a runbook's `command`), taken as is."""
        if not isinstance(text, str):
            raise TypeError(f"a script is text, not {type(text).__name__}")
        return cls(text, _BUILDER)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Command({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Command) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


_BUILDER = object()


def quote(value: Any) -> str:
    """One value as one shell word: a Command stays as built, numbers as written, anything else quoted."""
    if isinstance(value, Command):
        return value.text
    if isinstance(value, bool):
        raise TypeError("a boolean has no shell form: choose the words in the template")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (str, PurePath)):
        return shlex.quote(str(value))
    if isinstance(value, (list, tuple)):
        return " ".join(quote(item) for item in value)
    raise TypeError(f"no shell form for a {type(value).__name__}")


def sh(template: str, /, **values: Any) -> Command:
    """`template` with each `{name}` replaced by `values[name]`, quoted (see `quote`); `{{`/`}}` are braces.

    Only plain names are fields: no attribute access, indexing, conversion or format spec, so a template
    cannot reach into a value and insert part of it unquoted. A field must stand where a shell word can
    start, never inside quotes: `"{x}"` would show the value's own quotes, and `'{x}'` would end them.
    """
    parts: list[str] = []
    for literal, field in _fields(template):
        parts.append(literal)
        if field is None:
            continue
        try:
            value = values[field]
        except KeyError:
            raise KeyError(f"no value for {{{field}}} in {template!r}") from None
        parts.append(quote(value))
    return Command("".join(parts), _BUILDER)


@functools.lru_cache(maxsize=512)
def _fields(template: str) -> tuple[tuple[str, str | None], ...]:
    """The template's (literal, field) pairs, each field checked once per template (see `sh`)."""
    found = []
    before = ""
    for literal, field, spec, conversion in _FORMATTER.parse(template):
        before += literal
        if field is not None:
            if spec or conversion or not field.isidentifier():
                raise ValueError(f"{{{field}}}: a command's field is a plain name (no format, index or attribute)")
            if (opened := open_quote(before)) is not None:
                raise ValueError(f"{{{field}}} stands inside {CONTEXTS[opened]}: a value is quoted by "
                                 f"itself, as a word of its own; write it outside, in {template!r}")
            before += "x"
        found.append((literal, field))
    return tuple(found)


def open_quote(text: str) -> str | None:
    """Where a value written right after the shell text `text` would land, when that is not a plain word: the quote
    still open (`'`, `"`, `$'`), or a context where quoting does not protect a value (backticks `` ` ``, an
    arithmetic `((`, a `[[` test, whose operands bash may evaluate as arithmetic, a here-document `<<`); else None.

    Follows what sh and bash do with quotes, backslashes, `$(...)` and subshells (a new context inside double
    quotes), `case` patterns and comments: enough to tell whether a value would stay one word.
    """
    stack = [""]  # "" unquoted; "'", '"', "$'" quotes; "(" subshell or $( ); "`"; "((" ; "[["; "case"
    i, word_start, heredoc = 0, True, False
    while i < len(text):
        c, top = text[i], stack[-1]
        if top == "'":
            if c == "'":
                stack.pop()
        elif top == "$'":
            if c == "\\":
                i += 1
            elif c == "'":
                stack.pop()
        elif top == '"':
            if c == "\\":
                i += 1
            elif c == '"':
                stack.pop()
            elif c == "`":
                stack.append("`")
            elif text.startswith("$((", i):
                stack.append("((")
                i += 2
            elif text.startswith("$(", i):
                stack.append("(")
                i += 1
        elif c == "\\":
            i += 1
        elif text.startswith("$'", i):
            stack.append("$'")
            i += 1
        elif c in "'\"":
            stack.append(c)
        elif c == "#" and word_start:
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
            continue
        elif text.startswith("<<<", i):
            i += 2  # a here-string: one word, quoted as any other
        elif text.startswith("<<", i):
            heredoc = True  # its body is neither quoted nor a word: nothing may be inserted after one
            i += 1
        elif text.startswith("$((", i) or (word_start and text.startswith("((", i)):
            stack.append("((")
            i += 2 if c == "$" else 1
        elif top == "((" and text.startswith("))", i):
            stack.pop()
            i += 1
        elif word_start and _word_at(text, i, "[["):
            stack.append("[[")
            i += 1
        elif top == "[[" and _word_at(text, i, "]]"):
            stack.pop()
            i += 1
        elif word_start and _word_at(text, i, "case"):
            stack.append("case")
            i += 3
        elif top == "case" and word_start and _word_at(text, i, "esac"):
            stack.pop()
            i += 3
        elif text.startswith("$(", i) or c == "(":
            stack.append("(")
            i += 1 if c == "$" else 0
        elif c == "`":
            if top == "`":
                stack.pop()
            else:
                stack.append("`")
        elif c == ")" and top == "(":
            stack.pop()
        word_start = text[i] in " \t\n;&|(){}"  # (the last character read: the "(" of a "$(" starts a word)
        i += 1
    if stack[-1] in ("'", '"', "$'"):
        return stack[-1]
    unsafe = [context for context in stack if context in ("`", "((", "[[")]
    return unsafe[-1] if unsafe else ("<<" if heredoc else None)


def _word_at(text: str, i: int, word: str) -> bool:
    end = i + len(word)
    return text.startswith(word, i) and (end == len(text) or text[end] in " \t\n;&|()")


def join(commands: Iterable[Command], separator: str = "; ") -> Command:
    """Commands one after another (`separator` is shell: "; ", " && ", " | ")."""
    texts = []
    for command in commands:
        if not isinstance(command, Command):
            raise TypeError(f"join takes Commands, not {type(command).__name__}")
        texts.append(command.text)
    return Command(separator.join(texts), _BUILDER)


def bash(command: Command) -> Command:
    """`command` read by bash (for scripts that use bash's syntax: pipefail, process substitution)."""
    return sh("bash -c {script}", script=command.text)


def as_command(command: Command | str) -> Command:
    """A step author's command: a Command as built, or text the author wrote as shell (see Command.script)."""
    return command if isinstance(command, Command) else Command.script(command)
