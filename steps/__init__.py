"""Overhaul's built-in steps (installed as `overhaul.steps`), one module per concern."""
