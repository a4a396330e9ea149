"""What a cloud provider for the synthetic test is: the base class plug-ins implement, and the farm it launches.

A provider launches servers, says when they run, gives their SSH host keys when it can, terminates
them (also by this run's tag, so a server whose launch reply was lost is not left behind), and sweeps
servers an earlier run left behind. The built-ins are `lab` (lab_provider.py) and `aws-ec2` (aws.py);
registry.py finds them and plug-ins by name. This module imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from overhaul.synthetic.config import SyntheticConfig

TAG = "overhaul:synthetic"

Problem = tuple[tuple[str | int, ...], str]  # a location inside `synthetic:` and what is wrong there


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

    @classmethod
    def config_problems(cls, config: SyntheticConfig) -> list[Problem]:
        """What in `config` this provider cannot do (checked when the inventory loads, before any claim)."""
        return []

    def check_credentials(self) -> str:
        raise NotImplementedError

    def sweep(self, older_than: float) -> list[str]:
        """Terminate servers of earlier synthetic runs launched before `older_than` (epoch s); their ids."""
        raise NotImplementedError

    def launch(self, farm: Farm) -> None:
        """Start the servers, adding each to `farm.servers` as soon as it exists (so teardown sees it).

        Must be safe to call again for the same farm (a retried request must not start a second set).
        """
        raise NotImplementedError

    def wait_running(self, farm: Farm, timeout: float) -> None:
        raise NotImplementedError

    def terminate(self, farm: Farm) -> None:
        """Terminate every server of this run: those in `farm.servers` and any other the provider finds for
        `farm.run_id` (added to `farm.servers`). Called again, with backoff, until it succeeds or times out."""
        raise NotImplementedError

    def ssh_identity(self, farm: Farm) -> Path | None:
        """The private key that logs in to the farm's servers (None: the configured one)."""
        return None

    def wait_terminated(self, farm: Farm, timeout: float) -> None:
        raise NotImplementedError
