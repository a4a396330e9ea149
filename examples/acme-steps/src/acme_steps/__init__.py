"""Example Overhaul steps of a third party (ACME): found by Overhaul through the `overhaul.steps` entry points."""
