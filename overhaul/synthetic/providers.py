"""Cloud providers for the synthetic test: plug-ins found by name, like steps.

A provider launches servers, says when they run, gives their SSH host keys when it can, terminates
them, and sweeps servers an earlier run left behind. `lab` launches fresh lab hosts (so the whole
path, SSH and verify included, runs for real on one machine); `aws-ec2` uses boto3.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

from overhaul.errors import OverhaulError
from overhaul.synthetic.config import SyntheticConfig

ENTRY_POINT_GROUP = "overhaul.providers"
TAG = "overhaul:synthetic"


@dataclass
class Server:
    id: str
    name: str
    role: str
    address: str = ""
    host_key: str | None = None  # "ssh-ed25519 AAAA..." when the provider could tell


@dataclass
class Farm:
    run_id: str
    servers: list[Server] = field(default_factory=list)


class Provider:
    """Base of providers; `name` is what `synthetic.provider` says."""

    name: str

    def __init__(self, config: SyntheticConfig, environment: str, workdir: Path):
        self.config, self.environment, self.workdir = config, environment, workdir

    def check_credentials(self) -> str:
        raise NotImplementedError

    def sweep(self, older_than: float) -> list[str]:
        """Terminate servers of earlier synthetic runs launched before `older_than` (epoch s); their ids."""
        raise NotImplementedError

    def launch(self, farm: Farm) -> None:
        """Start the servers, adding each to `farm.servers` as soon as it exists (so teardown sees it)."""
        raise NotImplementedError

    def wait_running(self, farm: Farm, timeout: float) -> None:
        raise NotImplementedError

    def terminate(self, farm: Farm) -> None:
        raise NotImplementedError

    def ssh_identity(self, farm: Farm) -> Path | None:
        """The private key that logs in to the farm's servers (None: the configured one)."""
        return None

    def wait_terminated(self, farm: Farm, timeout: float) -> None:
        raise NotImplementedError


def provider_class(name: str) -> type[Provider]:
    found = {"lab": LabProvider}
    from overhaul.synthetic.aws import EC2Provider

    found["aws-ec2"] = EC2Provider
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry.name, entry.load())
    if name not in found:
        raise OverhaulError(f"unknown synthetic provider {name!r} (providers: {', '.join(sorted(found))})")
    return found[name]


class LabProvider(Provider):
    """Fresh lab hosts as the synthetic farm: real sshd, supervisord, MariaDB, on loopback addresses."""

    name = "lab"

    def _lab(self, run_id: str):
        from overhaul.lab import Lab

        home = self.workdir / run_id
        return Lab(home=home / "lab", inventory=home / "hosts" / "synthetic.yaml", subnet=self.config.lab_subnet,
                   environment="synthetic", log=lambda _: None)

    def check_credentials(self) -> str:
        if not shutil.which("unshare") or not shutil.which("debootstrap"):
            raise OverhaulError("the lab provider needs root with unshare and debootstrap")
        return "local lab: root with namespaces"

    def sweep(self, older_than: float) -> list[str]:
        swept = []
        for state in sorted(self.workdir.glob("*/lab/state.json")):
            if state.stat().st_mtime < older_than:
                run_id = state.parent.parent.name
                lab = self._lab(run_id)
                names = [h.name for h in lab.hosts()]
                lab.down()
                shutil.rmtree(state.parent.parent, ignore_errors=True)
                swept += [f"{run_id}/{name}" for name in names]
        return swept

    def launch(self, farm: Farm) -> None:
        layout = {"db": 0, "worker": 0, "app": 0}
        for role, spec in self.config.roles.items():
            if role not in layout:
                raise OverhaulError(f"the lab provider has roles db, worker and app, not {role!r}")
            layout[role] = spec.count
        if layout["db"] != 1 or layout["worker"] > 1 or (layout["worker"] == 0 and layout["app"]):
            raise OverhaulError("the lab provider's farm is one db, then at most one worker, then app hosts")
        lab = self._lab(farm.run_id)
        (self.workdir / farm.run_id).mkdir(parents=True, exist_ok=True)
        (self.workdir / farm.run_id / "farm.json").write_text(json.dumps({"started": time.time()}))
        try:
            lab.up(sum(layout.values()))
        finally:  # whatever started is part of the farm, so teardown finds it
            farm.servers = [Server(h.name, h.name, h.spec.role, h.spec.address) for h in lab.hosts()]

    def wait_running(self, farm: Farm, timeout: float) -> None:
        lab = self._lab(farm.run_id)
        keys = dict(line.split(" ", 1) for line in lab.known_hosts.read_text().splitlines())
        for server in farm.servers:
            if not lab.host(server.name).running():
                raise OverhaulError(f"{server.name} is not running")
            server.host_key = keys.get(server.address)  # read from the host's own disk

    def terminate(self, farm: Farm) -> None:
        self._lab(farm.run_id).down()

    def ssh_identity(self, farm: Farm) -> Path | None:
        return self._lab(farm.run_id).key_file

    def wait_terminated(self, farm: Farm, timeout: float) -> None:
        lab = self._lab(farm.run_id)
        if lab.status():
            raise OverhaulError("lab hosts still recorded after lab down")
        shutil.rmtree(self.workdir / farm.run_id, ignore_errors=True)
