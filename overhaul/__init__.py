"""Overhaul: upgrade and maintenance runbooks a team can trust with production."""

__version__ = "0.1.0"
