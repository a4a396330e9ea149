"""Synthetic providers by name: the built-ins and plug-ins of the entry-point group `overhaul.providers`."""

from __future__ import annotations

from importlib.metadata import entry_points

from overhaul.errors import OverhaulError
from overhaul.synthetic.aws import EC2Provider
from overhaul.synthetic.lab_provider import LabProvider
from overhaul.synthetic.providers import Provider

ENTRY_POINT_GROUP = "overhaul.providers"


def provider_class(name: str) -> type[Provider]:
    """The provider class called `name` (a built-in wins over a plug-in of the same name)."""
    found: dict[str, type[Provider]] = {"lab": LabProvider, "aws-ec2": EC2Provider}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry.name, entry.load())
    if name not in found:
        raise OverhaulError(f"unknown synthetic provider {name!r} (providers: {', '.join(sorted(found))})")
    return found[name]
