"""The troubleshooting table quotes messages the tool really prints: each is found in the code's own strings.

A quoted message is a `code span` of the table's first column. In it, `...` and words in capitals (HOST, N,
ENV) are placeholders: they stand for what the code fills in (a `{value}` of an f-string, a `%s`), and may
stand for fixed text too. Everything else must be the code's own text, in one string: a message the code
builds from pieces ("refused: " + "HOST: " + "unreachable: " + a reason) is matched piece by piece, each
leading "LABEL: " being a string of the code that ends with the value it wraps.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "troubleshooting.md"
VALUE = "\x00"  # what the code fills in, in a string of the code
PLACEHOLDER = re.compile(r"\.\.\.|\b[A-Z][A-Z_]*\b")
PRINTF = re.compile(r"%(?:\.\d+)?[sdrfgi]")


def _text(node: ast.expr) -> str | None:
    """A string expression as its fixed text, each filled-in value as VALUE (a repr's value in quotes); else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return PRINTF.sub(VALUE, node.value)
    if isinstance(node, ast.JoinedStr):
        parts = [(part.value if isinstance(part, ast.Constant) else
                  f"'{VALUE}'" if part.conversion == ord("r") else VALUE) for part in node.values]
        return "".join(str(part) for part in parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _text(node.left), _text(node.right)
        if left is not None or right is not None:
            return (VALUE if left is None else left) + (VALUE if right is None else right)
    return None


@cache
def code_strings() -> tuple[str, ...]:
    """Every string the package's code can print (docstrings left out), from overhaul/ and steps/."""
    found: set[str] = set()
    for path in [*ROOT.joinpath("overhaul").rglob("*.py"), *ROOT.joinpath("steps").rglob("*.py")]:
        tree = ast.parse(path.read_text(), str(path))
        docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
        for node in ast.walk(tree):
            if id(node) not in docstrings and (text := _text(node)) is not None:
                found.add(text)
    return tuple(found)


def pattern(message: str) -> re.Pattern[str]:
    """The quoted message as a pattern over the code's strings: placeholders match anything, the rest itself."""
    pieces = PLACEHOLDER.split(message)
    return re.compile(".*?".join(map(re.escape, pieces)), re.DOTALL)


def found(message: str) -> bool:
    """True if the code prints `message`: one string of the code holds it, or its leading `LABEL: ` is a string
    of the code that ends with the value it wraps, and the rest is found in turn."""
    if any(pattern(message).search(text) for text in code_strings()):
        return True
    wrappers = {text.rstrip(VALUE) for text in code_strings() if text.endswith(VALUE)}
    for cut in (match.end() for match in re.finditer(": ", message)):
        head = pattern(message[:cut])
        if any(head.fullmatch(wrapper) for wrapper in wrappers) and found(message[cut:]):
            return True
    return False


def quoted_messages() -> list[str]:
    """The code spans of the table's first column."""
    rows = [line for line in PAGE.read_text().splitlines() if line.startswith("| ") and not line.startswith("| message")]
    return [span for row in rows for span in re.findall(r"`([^`]+)`", row.split(" | ")[0])]


def test_every_message_the_table_quotes_is_printed_by_the_code():
    messages = quoted_messages()
    assert len(messages) >= 20, messages
    assert [message for message in messages if not found(message)] == []


def test_the_table_has_the_messages_an_operator_meets_most():
    text = " ".join(quoted_messages())
    for words in ("unknown environment", "refused before any change", "is locked by", "is unfinished", "drift:",
                  "unreachable:", "host frozen or overloaded", "does not match", "is protected"):
        assert words in text, words


def test_the_matcher_tells_a_printed_message_from_a_stale_one():
    """The check above is only as good as this: real messages (placeholders and pieces) pass, altered ones fail."""
    assert found("refused: HOST: unreachable: REASON after N attempts")
    assert found("environment 'ENV' is locked by HOLDER (pid N, run RUN)")
    assert not found("unreachable: connection refused after 3 attempts")  # "connection refused" is the OS's text
    assert not found("environment 'ENV' is locked by HOLDER (process N)")
    assert not found("run RUN was unfinished")
    assert not found("refused: no such message anywhere")
