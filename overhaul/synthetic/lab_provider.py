"""The `lab` synthetic provider: fresh lab hosts as the farm (real sshd, supervisord, MariaDB, on loopback)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from overhaul.errors import OverhaulError
from overhaul.files import private_dir, write_private
from overhaul.synthetic.providers import Farm, Problem, Provider, Server

if TYPE_CHECKING:
    from overhaul.lab import Lab
    from overhaul.synthetic.config import SyntheticConfig

LAB_ROLES = ("db", "worker", "app")  # the lab starts hosts in this order: one db, at most one worker, then app


class LabProvider(Provider):
    """Launches a lab of its own per run under the synthetic work folder, and tears it down."""

    name = "lab"

    @classmethod
    def config_problems(cls, config: SyntheticConfig) -> list[Problem]:
        unknown = [role for role in config.roles if role not in LAB_ROLES]
        if unknown:
            return [(("roles", unknown[0]), f"the lab provider has roles db, worker and app, not {unknown[0]!r}")]
        count = {role: spec.count for role, spec in config.roles.items()}
        db, worker, app = (count.get(role, 0) for role in LAB_ROLES)
        if db != 1 or worker > 1 or (worker == 0 and app):
            return [(("roles",), f"the lab provider's farm is one db, then at most one worker, then app hosts "
                                 f"(got db {db}, worker {worker}, app {app})")]
        return []

    def _lab(self, run_id: str) -> Lab:
        from overhaul.lab import Lab  # the lab code is only needed when this provider runs

        home = self.workdir / run_id
        return Lab(home=home / "lab", inventory=home / "hosts" / "synthetic.yaml", subnet=self.config.lab_subnet,
                   environment="synthetic", log=lambda _: None, synthetic=False)

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
        lab = self._lab(farm.run_id)
        # The farms' keys and secrets: .overhaul/synthetic is Overhaul's own (a folder OVERHAUL_SYNTHETIC_DIR names
        # is the operator's, and left as it is); each farm's folder is made 0700.
        private_dir(self.workdir, tighten_existing=self.workdir.parent.name == ".overhaul")
        write_private(private_dir(self.workdir / farm.run_id) / "farm.json", json.dumps({"started": time.time()}))
        try:
            lab.up(sum(spec.count for spec in self.config.roles.values()))  # idempotent: a second call starts nothing
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
        self._lab(farm.run_id).down()  # the run's own lab: every host it started, known to the farm or not

    def ssh_identity(self, farm: Farm) -> Path | None:
        return self._lab(farm.run_id).key_file

    def wait_terminated(self, farm: Farm, timeout: float) -> None:
        lab = self._lab(farm.run_id)
        if lab.status():
            raise OverhaulError("lab hosts still recorded after lab down")
        shutil.rmtree(self.workdir / farm.run_id, ignore_errors=True)
