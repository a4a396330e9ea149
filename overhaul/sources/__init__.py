"""Inventory sources: plug-ins that find an inventory's hosts (e.g. by EC2 tags) instead of a list of them.

An inventory says `source: {provider: NAME, ...}`. NAME is looked up in the entry-point group
`overhaul.sources` (so another package can ship a source); the plug-in is a `Source` model of the other
keys, and its `hosts()` returns the hosts found now. The core knows only this module, never a plug-in.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from pydantic import BaseModel, ConfigDict

from overhaul.errors import OverhaulError

ENTRY_POINT_GROUP = "overhaul.sources"


class Source(BaseModel):
    """Base of inventory sources: the fields are the source's settings (the `source:` keys but `provider`)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)  # a field's docstring: its description

    def hosts(self) -> list[dict[str, Any]]:
        """The hosts found now, as an inventory would list them (name, address, roles, vars)."""
        raise NotImplementedError


def source_class(name: str) -> type[Source]:
    """The installed inventory source called `name`."""
    found = {entry.name: entry for entry in entry_points(group=ENTRY_POINT_GROUP)}
    if name not in found:
        known = ", ".join(sorted(found)) or f"none installed in the entry-point group {ENTRY_POINT_GROUP}"
        raise OverhaulError(f"unknown inventory source {name!r} (sources: {known})")
    return found[name].load()
