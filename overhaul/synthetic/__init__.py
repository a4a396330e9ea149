"""The nightly synthetic farm-launch test (see docs/synthetic.md)."""
