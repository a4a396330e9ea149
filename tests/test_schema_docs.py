"""Every field of every published schema says what it is: an editor shows it on hover, the docs print it."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from overhaul.cli import file_schemas
from overhaul.sources import ENTRY_POINT_GROUP as SOURCES
from overhaul.step import Registry
from overhaul.stepdocs import reference


def undescribed(schema: Any, path: str = "", restated: frozenset[str] = frozenset()) -> list[str]:
    """The path of each property anywhere in `schema` (its $defs too) that has no description.

    An `if` only tests values, and a `then` may restate a field its schema declares (and describes) to
    narrow it, as a stage's `params` is narrowed to its step's parameters: those need no description of
    their own, the properties inside them do.
    """
    found = []
    if isinstance(schema, dict):
        declared = schema.get("properties") or {}
        for name, prop in declared.items():
            if name not in restated and not (isinstance(prop, dict) and str(prop.get("description", "")).strip()):
                found.append(f"{path}.properties.{name}")
        for key, value in schema.items():
            if key == "if":
                continue
            branch = key in ("allOf", "then", "else")
            found += undescribed(value, f"{path}.{key}", (restated | set(declared)) if branch else frozenset())
    elif isinstance(schema, list):
        for index, value in enumerate(schema):
            found += undescribed(value, f"{path}[{index}]", restated)
    return found


def test_every_field_of_the_inventory_and_runbook_schemas_has_a_description():
    schemas = file_schemas(Registry())
    assert {name: undescribed(schema) for name, schema in schemas.items()} == {"inventory": [], "runbook": []}


def test_every_step_parameter_has_its_own_description():
    """A stage's `params` in the runbook schema, and the steps reference, show the step's own words for each."""
    registry = Registry()
    missing = {name: undescribed(registry.get(name).Params.model_json_schema()) for name in registry.names()}
    assert {name: paths for name, paths in missing.items() if paths} == {}
    by_step = file_schemas(registry)["runbook"]["$defs"]["Stage"]["allOf"]
    label = next(rule for rule in by_step if rule["if"]["properties"]["step"]["const"] == "mysql.backup")
    assert label["then"]["properties"]["params"]["properties"]["label"]["description"] == \
        registry.get("mysql.backup").Params.model_fields["label"].description
    page = reference(registry)  # docs/steps.md: a description column
    assert "| `threshold` | `int` | `80` | Usage in percent at which a mount fails the check. |" in page


def test_every_inventory_source_setting_has_a_description():
    sources = {entry.name: entry.load() for entry in entry_points(group=SOURCES)}
    assert "aws-ec2" in sources
    assert {name: undescribed(source.model_json_schema()) for name, source in sources.items()} == \
        {name: [] for name in sources}
