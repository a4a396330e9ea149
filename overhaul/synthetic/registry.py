"""Synthetic providers by name: the built-ins and plug-ins of the entry-point group `overhaul.providers`."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from overhaul.errors import OverhaulError

if TYPE_CHECKING:
    from overhaul.synthetic.providers import Provider

ENTRY_POINT_GROUP = "overhaul.providers"
# Imported only when named: every inventory with a `synthetic:` section asks for its provider when it
# loads, and the AWS one brings boto3 (a quarter of a second) into commands that never touch AWS.
BUILT_IN = {"lab": "overhaul.synthetic.lab_provider:LabProvider", "aws-ec2": "overhaul.synthetic.aws:EC2Provider"}


def provider_class(name: str) -> type[Provider]:
    """The provider class called `name` (a built-in wins over a plug-in of the same name)."""
    if name in BUILT_IN:
        module, _, attribute = BUILT_IN[name].partition(":")
        return getattr(importlib.import_module(module), attribute)
    plugins = {entry.name: entry for entry in entry_points(group=ENTRY_POINT_GROUP)}
    if name not in plugins:
        raise OverhaulError(f"unknown synthetic provider {name!r} (providers: {', '.join(sorted({*BUILT_IN, *plugins}))})")
    return plugins[name].load()
