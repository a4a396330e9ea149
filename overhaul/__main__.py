"""`python -m overhaul` is the `overhaul` command."""

from overhaul.cli import program

program.run()
