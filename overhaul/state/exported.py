"""The exported journal: what `overhaul state.export` writes and `overhaul state.import` reads.

One JSON object per line, `{"table": TABLE, "row": {COLUMN: VALUE, ...}}`, every column of the table
present and no other: runs first, then results, events, claims and commands (the lease is no history: it
is never exported). A run's `params` and a pair's `facts` are the JSON text the journal keeps, not objects.

Each line is validated on its own, as it is read, by a model made from the journal's own record types
(overhaul.state.records: RunRecord, ResultRecord, EventRecord, ClaimRecord, CommandRecord): the same
columns, each of its type, strictly (no "1" for 1, no 1 for true), plus what the readers of the journal
rely on (a timestamp is a finite time between 1970 and 9999; a status and an outcome are known ones;
JSON text is JSON of what it holds, as is the detail of a check or source-hosts event; an integer fits
the database's; text holds no NUL character, which PostgreSQL cannot store). Blank lines are skipped.
A row that is not so is refused by a BadExport naming the file, the line, the column and what was
expected: an import is all or nothing, so `overhaul history` and `overhaul show` never meet a row they
cannot read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import stat
import sys
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Annotated, Any, Literal, NamedTuple, Union

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
)
from pydantic_core import PydanticCustomError

from overhaul.errors import USAGE_EXIT
from overhaul.state.records import OUTCOMES, STATUSES, StateError
from overhaul.state.sql import COLUMNS, RECORDS

MAX_LINE = 64 << 20  # bytes: a longer line is no journal row (a source's hosts of a large farm are well below)
LATEST_TIME = 253402300799.0  # 9999-12-31 23:59:59 UTC: what the readers can still show as a date
INT_BITS = 31  # PostgreSQL's INTEGER


class BadExport(StateError):
    """The file is not an exported journal, or one of its rows is not a journal row: nothing was imported."""

    exit_code = USAGE_EXIT  # bad input, not a journal that cannot be used


class Row(NamedTuple):
    """One validated journal row: where it was read, its table, its values in COLUMNS order."""

    line: int
    table: str
    values: tuple


# -- the column types -------------------------------------------------------------------------------------
def _no_nul(text: str) -> str:
    if "\x00" in text:
        raise PydanticCustomError("nul", "Text should hold no NUL character (PostgreSQL cannot store one)")
    return text


def _json_value(text: str) -> Any:
    """The value JSON text holds (None if it is no JSON, or holds a lone surrogate, which no output can print)."""
    try:
        value = json.loads(text)
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError):  # (UnicodeEncodeError is a ValueError)
        return None
    return value


def _json_text(kind: type, expected: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        if not isinstance(_json_value(text), kind):
            raise PydanticCustomError("json_text", f"Text should be the JSON of {expected}")
        return text
    return check


Text = Annotated[str, AfterValidator(_no_nul)]
Key = Annotated[str, Field(min_length=1), AfterValidator(_no_nul)]
Integer = Annotated[int, Field(ge=-(2**INT_BITS), le=2**INT_BITS - 1)]
Count = Annotated[int, Field(ge=0, le=2**INT_BITS - 1)]
Number = Annotated[float, Field(allow_inf_nan=False)]
Timestamp = Annotated[float, Field(ge=0, le=LATEST_TIME, allow_inf_nan=False)]
JsonObjectText = Annotated[str, AfterValidator(_no_nul), AfterValidator(_json_text(dict, "an object"))]

TIMESTAMPS = ("started", "ended", "at", "expires")
OVERRIDES: dict[str, dict[str, Any]] = {
    "runs": {"id": Key, "status": Literal[STATUSES]},  # type: ignore[valid-type]
    "results": {"run_id": Key, "host": Key, "attempts": Count, "outcome": Literal[OUTCOMES]},  # type: ignore[valid-type]
    "events": {},
    "claims": {"key": Key},
    "commands": {"run_id": Key, "host": Key},
}
# Event kinds whose detail is JSON that a reader parses (`overhaul show`, a resume), and what it must be.
CHECK_DETAIL = ("check", "host", "status", "message")


def _exported_type(name: str, hint: Any) -> Any:
    """The type of a column as exported: the record's type, made strict about what the readers rely on."""
    optional = typing.get_origin(hint) in (Union, types.UnionType) and type(None) in typing.get_args(hint)
    base = next(arg for arg in typing.get_args(hint) if arg is not type(None)) if optional else hint
    if name in TIMESTAMPS:
        exported: Any = Timestamp
    elif base is bool:
        exported = bool
    elif base is int:
        exported = Integer
    elif base is float:
        exported = Number
    elif base is str:
        exported = Text
    elif typing.get_origin(base) is dict:
        exported = JsonObjectText  # the journal keeps it as JSON text
    else:
        raise TypeError(f"no exported type for {name}: {hint}")
    return exported | None if optional else exported


def _event_detail(detail: str, info: ValidationInfo) -> str:
    kind = info.data.get("kind")
    if kind == "check":
        case = _json_value(detail)
        if not isinstance(case, dict) or not all(isinstance(case.get(name), str) for name in CHECK_DETAIL):
            raise PydanticCustomError("check_detail", "A check event's detail should be the JSON of an object with "
                                                      "the strings check, host, status and message")
    elif kind == "source-hosts":
        hosts = _json_value(detail)
        if not isinstance(hosts, list) or not all(isinstance(host, dict) for host in hosts):
            raise PydanticCustomError("hosts_detail", "A source-hosts event's detail should be the JSON of a list "
                                                      "of objects (the hosts the source found)")
    return detail


STRICT = ConfigDict(strict=True, extra="forbid")


def _models() -> TypeAdapter:
    lines = []
    for table, record in RECORDS.items():
        hints = typing.get_type_hints(record)
        columns: dict[str, Any] = {f.name: (OVERRIDES[table].get(f.name) or _exported_type(f.name, hints[f.name]), ...)
                                   for f in dataclasses.fields(record)}  # every column required: export writes all
        validators = {"detail_of_its_kind": field_validator("detail")(_event_detail)} if table == "events" else None
        row = create_model(f"Exported{record.__name__}", __config__=STRICT, __validators__=validators,
                           **columns)
        lines.append(create_model(f"Exported{table.title()}Line", __config__=STRICT,
                                  table=(Literal[table], ...), row=(row, ...)))  # type: ignore[valid-type]
    return TypeAdapter(Annotated[Union[tuple(lines)], Field(discriminator="table")])  # noqa: UP007


LINE = _models()


# -- reading ----------------------------------------------------------------------------------------------
def _got(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def explain(error: ValidationError) -> str:
    """A validation error in the operator's words: which column, what was expected, what was found."""
    said: list[str] = []
    missing: dict[str, list[str]] = {}
    for problem in error.errors(include_url=False):
        kind, loc, message = problem["type"], problem["loc"], problem["msg"]
        if kind == "json_invalid":
            said.append(f"not a JSON line ({problem['ctx']['error']})")
        elif kind == "union_tag_invalid":
            said.append(f"table {_got(problem['ctx']['tag'])} is no journal table "
                        f"(expected one of: {', '.join(COLUMNS)})")
        elif len(loc) < 2:  # not an object, or an object without "table"
            said.append('not an exported journal row: expected {"table": TABLE, "row": {COLUMN: VALUE, ...}}')
        elif len(loc) == 2 and loc[1] != "row":
            said.append(f"{loc[1]!r} is not part of an exported row (expected only table and row)")
        elif len(loc) == 2:
            said.append(f"{loc[0]}: the row should be an object of the columns {', '.join(COLUMNS[str(loc[0])])}"
                        + ("" if kind == "missing" else f" (got {_got(problem['input'])})"))
        elif kind == "missing":
            missing.setdefault(str(loc[0]), []).append(str(loc[2]))
        elif kind == "extra_forbidden":
            said.append(f"{loc[0]}.{loc[2]}: no column of {loc[0]} (its columns: {', '.join(COLUMNS[str(loc[0])])})")
        else:
            said.append(f"{loc[0]}.{loc[2]}: {message} (got {_got(problem['input'])})")
    said += [f"{table}: missing {', '.join(names)} (every {table} row has: {', '.join(COLUMNS[table])})"
             for table, names in missing.items()]
    return "; ".join(said[:3]) + (f"; and {len(said) - 3} more" if len(said) > 3 else "")


def _row(line: Any) -> tuple[str, tuple]:
    row = line.row.__dict__
    return line.table, tuple(row[name] for name in COLUMNS[line.table])


def validate(item: Any, number: int, source: str = "rows") -> Row:
    """An exported row as `State.export` yields it (a dict), validated."""
    try:
        table, values = _row(LINE.validate_python(item))
    except ValidationError as exc:
        raise BadExport(f"{source}:{number}: {explain(exc)}") from None
    return Row(number, table, values)


class Reader:
    """The rows of an exported journal, read and validated one line at a time (never the whole file)."""

    def __init__(self, stream: IO[bytes], source: str):
        self.stream = stream
        self.source = source
        self.count = 0  # rows read so far

    def __iter__(self) -> Iterator[Row]:
        number = offset = 0
        while raw := self.stream.readline(MAX_LINE + 1):
            number += 1
            where = f"{self.source}:{number}"
            if len(raw) > MAX_LINE:
                raise BadExport(f"{where}: a line longer than {MAX_LINE >> 20} MB: not an exported journal row")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadExport(f"{where}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset {offset + exc.start}): "
                                "binary data, not an exported journal") from None
            offset += len(raw)
            if not text.strip():
                continue  # (export writes none; an editor may leave one)
            try:
                table, values = _row(LINE.validate_json(text))
            except ValidationError as exc:
                cut = "" if raw.endswith(b"\n") else " (the file's last line ends without a newline: it was cut short?)"
                raise BadExport(f"{where}: {explain(exc)}{cut}") from None
            self.count += 1
            yield Row(number, table, values)
        if not self.count:
            raise BadExport(f"{self.source}: no journal rows: expected the JSON lines `overhaul state.export` writes "
                            "(an empty journal has nothing to import)")


def rows_of(items: Iterable[Any], source: str = "rows") -> Iterator[Row]:
    """Rows given to `State.import_rows`: Row as a Reader yields them, or dicts as `State.export` does."""
    for number, item in enumerate(items, 1):
        yield item if isinstance(item, Row) else validate(item, number, source)


NOT_REGULAR = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a named pipe", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


@contextlib.contextmanager
def open_export(file: str) -> Iterator[tuple[IO[bytes], str]]:
    """The exported journal `file` (`-`: standard input) as a byte stream and its name for messages.

    Only a regular file is opened (a directory is no export, a device may do something when opened, a named
    pipe would wait for a writer), checked again on what was opened, non-blocking.
    """
    if file == "-":
        yield sys.stdin.buffer, "standard input"
        return

    def refuse_unless_regular(mode: int) -> None:
        if not stat.S_ISREG(mode):
            kind = NOT_REGULAR.get(stat.S_IFMT(mode), "not a file")
            raise BadExport(f"{file}: not a regular file ({kind}); expected the JSON lines `overhaul state.export` "
                            "writes, in a regular file")

    try:
        refuse_unless_regular(os.stat(file).st_mode)
        descriptor = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise BadExport(f"{file}: cannot read: {exc.strerror}") from None
    with os.fdopen(descriptor, "rb") as stream:
        refuse_unless_regular(os.fstat(stream.fileno()).st_mode)
        yield stream, file
