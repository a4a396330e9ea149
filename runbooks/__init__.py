"""Overhaul's built-in runbooks (installed as `overhaul.runbooks`): YAML documents."""
