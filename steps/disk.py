"""`disk.usage`: every watched mount is below a usage threshold (default 80 %)."""

from __future__ import annotations

from pydantic import Field

from overhaul.command import sh
from overhaul.context import Probe, StepHost
from overhaul.errors import StepFailed
from overhaul.step import AssertionStep, Check, Params


class DiskParams(Params):
    mounts: list[str] = Field(["/opt/scalr-server"], min_length=1)
    """The paths whose file systems are watched (each must exist)."""
    threshold: int = Field(80, ge=1, le=100)
    """Usage in percent at which a mount fails the check."""


class DiskUsage(AssertionStep):
    name = "disk.usage"
    Params = DiskParams

    def probes(self) -> list[Probe]:
        mounts = sh("{mounts}", mounts=self.params.mounts)
        return [Probe(f"missing mounts {mounts}", sh('for m in {mounts}; do [ -e "$m" ] || echo "$m"; done',
                                                     mounts=mounts), lambda result: result.stdout.splitlines()),
                Probe(f"df {mounts}", sh("df -P -- {mounts}", mounts=mounts), lambda result: result)]

    def preflight(self, host: StepHost) -> Check:
        missing = host.read(self.probes()[0])
        return Check(not missing, f"missing: {', '.join(missing)}" if missing else "every mount exists")

    def check(self, host: StepHost) -> Check:
        result = host.read(self.probes()[1])
        if not result.ok:
            raise StepFailed(f"df failed: {result.tail()}")
        usage = {}
        for line, mount in zip(result.stdout.splitlines()[1:], self.params.mounts, strict=False):
            usage[mount] = int(line.split()[4].rstrip("%"))
        full = [f"{mount} at {pct}%" for mount, pct in usage.items() if pct >= self.params.threshold]
        summary = ", ".join(f"{mount} {pct}%" for mount, pct in usage.items())
        if full:
            return Check(False, f"{', '.join(full)} (threshold {self.params.threshold}%)", {"usage": usage})
        return Check(True, summary, {"usage": usage})
