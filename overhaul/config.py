"""Reading YAML documents so that every validation error names the file, the line and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from overhaul.errors import ConfigError

Model = TypeVar("Model", bound=BaseModel)
Location = tuple[str | int, ...]


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
                got = f" (got {error['input']!r})"
            problems.append(f"{self.where(location)}: {field}: {message}{got}")
        return problems


def dotted(location: Location) -> str:
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _is_model_tag(part: str | int) -> bool:
    # pydantic puts union member names ("function-after[...]", "int", "str") into error locations.
    return isinstance(part, str) and ((part.endswith("]") and "[" in part) or part in ("int", "str", "float"))


def load_document(path: Path) -> Document:
    """Parse a YAML file, refusing duplicate keys (which YAML would silently overwrite)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path}:{line}: not valid YAML: {problem}"]) from None
    if node is None:
        raise ConfigError([f"{path}:1: the file is empty"])
    lines: dict[Location, int] = {}
    problems: list[str] = []
    _index(node, (), lines, problems, path)
    if problems:
        raise ConfigError(problems)
    loader = yaml.SafeLoader("")
    try:
        data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from None
    finally:
        loader.dispose()
    return Document(path, data, lines)


def _index(node: yaml.Node, location: Location, lines: dict, problems: list[str], path: Path) -> None:
    lines.setdefault(location, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                problems.append(f"{path}:{line}: {dotted((*location, key))}: duplicate key (first on line {seen[key]})")
            seen[key] = line
            lines[(*location, key)] = line
            _index(value_node, (*location, key), lines, problems, path)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _index(item, (*location, index), lines, problems, path)
