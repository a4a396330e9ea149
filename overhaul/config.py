"""Reading YAML documents so that every validation error names the file, the line and the field.

Loading is bounded, because an inventory or a runbook may come from anyone: a size cap (of a regular
file: never a device or a pipe), a nesting cap (PyYAML's composer recurses), a cap on the nodes
composed (5 MB of `[0,0,0,...` is 2.5 million of them: half a minute and 1.4 GB to compose, check
and construct; the cap stops the composer as it reaches it) and a cap on what aliases add once
expanded (PyYAML shares one node per anchor, so an "alias bomb" is small as a graph and huge as a tree).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from overhaul.errors import ConfigError
from overhaul.files import read_regular

Model = TypeVar("Model", bound=BaseModel)
Location = tuple[str | int, ...]

MAX_BYTES = 5 * 1024 * 1024
MAX_DEPTH = 64
MAX_NODES = 200_000  # values, keys and aliases composed (a 1,000-host inventory has about 30,000)
MAX_ALIAS_NODES = 100_000  # nodes that aliases may add to a document once expanded
_SIZE_CAP = 1 << 62  # keeps the expanded sizes small integers; a document that big is refused anyway


class Document:
    """A parsed YAML file: its data, plus the line of every key and list item in it."""

    def __init__(self, path: Path, data: Any, lines: dict[Location, int]):
        self.path = path
        self.data = data
        self.lines = lines

    def line(self, location: Location) -> int:
        """The line of `location`, or of its nearest enclosing key that has one."""
        for end in range(len(location), -1, -1):
            if location[:end] in self.lines:
                return self.lines[location[:end]]
        return 1

    def where(self, location: Location) -> str:
        return f"{self.path}:{self.line(location)}"

    def validate(self, model: type[Model], context: dict[str, Any] | None = None) -> Model:
        """Validate the whole document as `model`, turning pydantic errors into ConfigError."""
        try:
            return model.model_validate(self.data, context=context)
        except ValidationError as exc:
            raise ConfigError(self.explain(exc)) from None

    def explain(self, exc: ValidationError, prefix: Location = ()) -> list[str]:
        problems = []
        for error in exc.errors():
            location = prefix + tuple(part for part in error["loc"] if not _is_model_tag(part))
            field = dotted(location) or "(top level)"
            message = error["msg"].removeprefix("Value error, ")
            got = ""
            if error["type"] not in ("missing", "value_error", "assertion_error", "extra_forbidden") and not isinstance(
                error.get("input"), dict | list
            ):
                got = f" (got {_short(repr(error['input']))})"
            problems.append(f"{self.where(location)}: {field}: {message}{got}")
        return problems


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def dotted(location: Location) -> str:
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _is_model_tag(part: str | int) -> bool:
    # pydantic puts union member names ("function-after[...]", "int", "str") into error locations.
    return isinstance(part, str) and ((part.endswith("]") and "[" in part) or part in ("int", "str", "float"))


def plain_name(value: str, what: str) -> str:
    """`value` when it names a file in a folder and no more (letters, digits, '.', '_', '-'; no '/' or '..').

    Checked before any path is built from it, so `--env ../../etc/x` never reads a file.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value) or ".." in value:
        raise ConfigError([f"{what} {value!r}: expected a name of letters, digits, '.', '_' or '-' "
                           "(no path separators, no '..')"])
    return value


def load_document(path: Path) -> Document:
    """Parse a YAML file within bounds, refusing duplicate keys (which YAML would silently overwrite)."""
    text = _read_text(path)
    loader = None
    try:
        loader = _BoundedLoader(text, path)  # its reader refuses control characters at once
        node = loader.get_single_node()
        if node is None:
            raise ConfigError([f"{path}:1: the file is empty"])
        _check_aliases(node, path)
        lines: dict[Location, int] = {}
        problems: list[str] = []
        _index(node, (), lines, problems, path, set())
        if problems:
            raise ConfigError(problems)
        data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        if "maximum nesting depth" in _problem(exc):  # libyaml's own bound (1,000 levels), met before ours
            raise ConfigError([f"{path}:{_error_line(exc, text)}: nested more than {MAX_DEPTH} levels deep"]) from None
        raise ConfigError([f"{path}:{_error_line(exc, text)}: not valid YAML: {_problem(exc)}"]) from None
    except (ValueError, OverflowError) as exc:  # a value YAML resolves but Python refuses: a 5000-digit int, 2024-13-45
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from None
    finally:
        if loader is not None:
            loader.dispose()
    return Document(path, data, lines)


def _read_text(path: Path) -> str:
    """The file's text: a regular file of at most MAX_BYTES, in UTF-8."""
    try:
        raw = read_regular(path, MAX_BYTES, "an inventory or runbook")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError([f"{path}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start}); "
                           "save the file as UTF-8"]) from None


def _error_line(exc: yaml.YAMLError, text: str) -> int:
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        return mark.line + 1
    if isinstance(exc, yaml.reader.ReaderError):  # (libyaml's position counts bytes, PyYAML's characters)
        found = yaml.reader.Reader.NON_PRINTABLE.search(text)
        return text.count("\n", 0, found.start() if found else exc.position) + 1
    return 1


def _problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.reader.ReaderError):
        return f"control character #x{exc.character:04x} is not allowed"
    return getattr(exc, "problem", None) or str(exc)


class _PythonParser(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
    """PyYAML's own parser (what yaml.SafeLoader parses with), for where PyYAML has no libyaml."""

    def __init__(self, text: str):
        yaml.reader.Reader.__init__(self, text)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)


def bounded_loader(parser: type) -> type:
    """PyYAML's safe loader on `parser`'s events, refusing to nest deeper than MAX_DEPTH (its composer recurses
    per level) or to compose more than MAX_NODES nodes (counted as they are composed, so it stops there)."""

    class BoundedLoader(yaml.composer.Composer, yaml.constructor.SafeConstructor, yaml.resolver.Resolver, parser):
        def __init__(self, text: str, path: Path):
            parser.__init__(self, text)
            yaml.composer.Composer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)
            self._path = path
            self._depth = 0
            self._nodes = 0

        def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
            if self._depth >= MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise ConfigError([f"{self._path}:{line}: nested more than {MAX_DEPTH} levels deep"])
            self._nodes += 1
            if self._nodes > MAX_NODES:
                line = self.peek_event().start_mark.line + 1
                raise ConfigError([f"{self._path}:{line}: more than {MAX_NODES:,} values (keys, items and aliases "
                                   "count); an inventory or runbook may have at most that many"])
            self._depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

    return BoundedLoader


# libyaml's parser (C: 5x faster on a 1,000-host inventory) where PyYAML has it, PyYAML's own otherwise; the
# nodes are composed by PyYAML's Python composer either way, so the depth bound holds for both.
PARSERS = {"libyaml": yaml.cyaml.CParser} if yaml.__with_libyaml__ else {}
PARSERS["python"] = _PythonParser
_BoundedLoader = bounded_loader(PARSERS.get("libyaml", _PythonParser))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_aliases(root: yaml.Node, path: Path) -> None:
    """Refuse a document whose aliases refer to their own ancestor, or add more than MAX_ALIAS_NODES nodes.

    The size of each node's expanded tree is computed once per node (not once per path to it), so
    this costs time in the number of distinct nodes, not in the size of the expansion.
    """
    sizes: dict[int, int] = {}
    ancestors: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            ancestors.discard(key)
            sizes[key] = min(1 + sum(sizes[id(child)] for child in _children(node)), _SIZE_CAP)
        elif key in ancestors:
            raise ConfigError([f"{path}:{node.start_mark.line + 1}: an alias refers to a node that contains it "
                               "(a recursive structure)"])
        elif key not in sizes:
            ancestors.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node))
    added = sizes[id(root)] - len(sizes)
    if added > MAX_ALIAS_NODES:
        raise ConfigError([f"{path}: its aliases (*name) expand to more than {MAX_ALIAS_NODES} extra values "
                           "(an alias bomb?); write the values out or use fewer aliases"])


def _index(node: yaml.Node, location: Location, lines: dict, problems: list[str], path: Path, seen_nodes: set[int]) -> None:
    """Record the line of every key and list item, visiting each node once (an alias is not walked again)."""
    lines.setdefault(location, node.start_mark.line + 1)
    if id(node) in seen_nodes:
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                problems.append(f"{path}:{line}: {dotted(location) or '(top level)'}: a key must be a plain value, "
                                "not a list or a mapping")
                continue
            key = key_node.value
            if key in seen:
                problems.append(f"{path}:{line}: {dotted((*location, key))}: duplicate key (first on line {seen[key]})")
            seen[key] = line
            lines[(*location, key)] = line
            _index(value_node, (*location, key), lines, problems, path, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _index(item, (*location, index), lines, problems, path, seen_nodes)
