"""The lab: a farm of real hosts on one machine (see docs/lab.md).

`Lab.up` is idempotent and repairs a half-started lab; `Lab.down` stops every host by the PID it
recorded and removes the hosts' disks; `Lab.status` tells what runs. The lab writes an inventory,
an SSH key pair, a known_hosts file and the database secrets that match the hosts it started.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from overhaul.errors import OverhaulError
from overhaul.lab.host import HostSpec, LabHost
from overhaul.lab.package import PACKAGE, ensure_repository
from overhaul.lab.rootfs import ensure_rootfs

FIRST_VERSION = "1.0.0"
SEED_SQL = """\
INSERT IGNORE INTO scalr.farms (id, name, status) VALUES (1, 'web-prod', 'running'), (2, 'batch', 'running');
INSERT IGNORE INTO scalr.servers (id, farm_id, hostname, status) VALUES
  (1, 1, 'web-1', 'running'), (2, 1, 'web-2', 'running'), (3, 2, 'batch-1', 'running');
"""


class LabInputError(OverhaulError, ValueError):
    """A lab setting that cannot work (subnet, number of hosts, another lab in the way): an input error."""


@dataclass(frozen=True)
class HostStatus:
    name: str
    role: str
    address: str
    running: bool
    sshd: bool


def synthetic_subnet(subnet: str) -> str:
    """Where the synthetic farm of the lab on `subnet` listens: 127.A.B gives 127.A.(255-B).

    Two labs on different subnets get different farms (the mapping is one to one), and a lab on the usual
    127.A.0 gets 127.A.255, never a 127.X.0 that another lab would be started on. 127.A.255 itself is
    refused as a lab's subnet: it is the farm of the lab on 127.A.0.
    """
    prefix, _, last = subnet.rpartition(".")
    if last == "255":
        raise LabInputError(f"lab: subnet {subnet} is kept for the synthetic farm of the lab on {prefix}.0; "
                            f"choose another (e.g. {prefix}.0)")
    return f"{prefix}.{255 - int(last)}"


def farm_layout(count: int, subnet: str) -> list[HostSpec]:
    """One db host, one worker, the rest app hosts, on subnet.1, subnet.2, ..."""
    if not 1 <= count <= 200:
        raise LabInputError(f"lab: --hosts must be between 1 and 200, got {count}")
    roles = ["db", "worker"] + ["app"] * (count - 2)
    specs, seen = [], {"db": 0, "worker": 0, "app": 0}
    for index, role in enumerate(roles[:count]):
        seen[role] += 1
        specs.append(HostSpec(name=f"{role}{seen[role]}", role=role, address=f"{subnet}.{index + 1}"))
    return specs


class Lab:
    """A lab instance: its state lives in `home`; its inventory is written to `inventory`."""

    def __init__(
        self,
        home: Path | str = ".overhaul/lab",
        inventory: Path | str = "hosts/lab.yaml",
        subnet: str = "127.10.0",
        data_mb: int = 64,
        environment: str = "lab",
        log: Callable[[str], None] = print,
        synthetic: bool = True,
    ):
        """`synthetic`: the inventory gets a `synthetic:` section, its farm on `synthetic_subnet(subnet)`; a
        synthetic run's own farm (a lab too) has none, and may sit on a 127.A.255 subnet."""
        if not _loopback_subnet(subnet):
            raise LabInputError(f"lab: subnet must be three octets inside 127.0.0.0/8 (e.g. 127.10.0), got {subnet!r}")
        self.synthetic_subnet = synthetic_subnet(subnet) if synthetic else None  # (refuses 127.A.255 before anything)
        self.home = Path(home).absolute()
        self.inventory = Path(inventory).absolute()
        self.subnet = subnet
        self.data_mb = data_mb
        self.environment = environment
        self.started_fresh = False  # set by up(): whether it built a new farm (at FIRST_VERSION)
        self.log = log

    # -- paths -----------------------------------------------------------------------------
    @property
    def key_file(self) -> Path:
        return self.home / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.home / "known_hosts"

    @property
    def repo(self) -> Path:
        return self.home / "repo"

    def secret_file(self, name: str) -> Path:
        return self.home / "secrets" / f"{name}.password"

    # -- state -----------------------------------------------------------------------------
    def hosts(self) -> list[LabHost]:
        """The hosts recorded in the lab's state file (running or not)."""
        path = self.home / "state.json"
        if not path.exists():
            return []
        state = json.loads(path.read_text())
        return [
            LabHost(HostSpec(**h["spec"]), self.home / "hosts" / h["spec"]["name"], h["pid"], h["started"])
            for h in state["hosts"]
        ]

    def host(self, name: str) -> LabHost:
        for host in self.hosts():
            if host.name == name:
                return host
        raise KeyError(f"lab: no host named {name!r} (hosts: {', '.join(h.name for h in self.hosts())})")

    def _save(self, hosts: list[LabHost]) -> None:
        state = {"hosts": [{"spec": asdict(h.spec), "pid": h.pid, "started": h.started} for h in hosts]}
        tmp = self.home / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        tmp.rename(self.home / "state.json")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.home.chmod(0o700)  # it holds the lab's private key and secrets (and a home made before this rule)
        with open(self.home / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    # -- lifecycle -------------------------------------------------------------------------
    def up(self, count: int = 4) -> list[LabHost]:
        """Start (or repair) a farm of `count` hosts with scalr-server 1.0.0 running on each."""
        specs = farm_layout(count, self.subnet)
        with self._locked():
            recorded = {h.name: h for h in self.hosts()}
            if recorded and {(h.name, h.spec.address) for h in recorded.values()} != {(s.name, s.address) for s in specs}:
                first = next(iter(recorded.values())).spec.address
                raise LabInputError(f"lab: a lab of {len(recorded)} hosts ({first}, ...) is already here ({self.home}); "
                                    "run lab.down first")
            rootfs = ensure_rootfs(self.log)
            ensure_repository(self.repo)
            self._ensure_credentials()
            self.started_fresh = not recorded  # a new farm: every host at FIRST_VERSION
            hosts = [recorded.get(s.name) or LabHost(s, self.home / "hosts" / s.name) for s in specs]
            for host in hosts:
                if not host.running():
                    self._prepare(host, specs, rootfs)
                    host.start(rootfs, self.repo, self.data_mb)
                    self._save(hosts)
            for host in hosts:
                host.wait_for_sshd()
            self._provision(hosts)
            self._write_known_hosts(hosts)
            self._write_inventory(hosts)
            self.log(f"lab: {len(hosts)} hosts up; inventory {self.inventory}")
            return hosts

    def down(self) -> None:
        """Stop every host by its recorded PID and remove the lab's hosts and inventory."""
        with self._locked():
            for host in self.hosts():
                host.stop()
            shutil.rmtree(self.home / "hosts", ignore_errors=True)
            for leftover in ("state.json", "known_hosts"):
                (self.home / leftover).unlink(missing_ok=True)
            if self.inventory.exists() and "Written by the Overhaul lab" in self.inventory.read_text():
                self.inventory.unlink()

    def status(self) -> list[HostStatus]:
        return [
            HostStatus(h.name, h.spec.role, h.spec.address, h.running(), h.running() and h.sshd_answers())
            for h in self.hosts()
        ]

    # -- setup -----------------------------------------------------------------------------
    def _ensure_credentials(self) -> None:
        if not self.key_file.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "overhaul-lab", "-f", str(self.key_file)],
                check=True,
            )
        for name in ("mysql-app", "mysql-backup"):
            path = self.secret_file(name)
            if not path.exists():
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                path.touch(mode=0o600)
                path.write_text(secrets.token_urlsafe(18) + "\n")

    def _prepare(self, host: LabHost, farm: list[HostSpec], rootfs: Path) -> None:
        """Put the files a fresh host needs on its disk: keys, names of its peers, its role's config."""
        upper = host.upper
        (upper / "etc").mkdir(parents=True, exist_ok=True)
        peers = "".join(f"{spec.address} {spec.name}\n" for spec in farm)
        (upper / "etc/hosts").write_text(f"127.0.0.1 localhost\n{peers}")
        db_address = next(spec.address for spec in farm if spec.role == "db")
        public_key = self.key_file.with_suffix(".pub").read_text()
        for home, owner in (("root", None), ("home/deploy", "deploy")):
            ssh_dir = upper / home / ".ssh"
            ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            (ssh_dir / "authorized_keys").write_text(public_key)
            if owner:
                uid, gid = _passwd_ids(rootfs, owner)
                for path in (upper / home, ssh_dir, ssh_dir / "authorized_keys"):
                    os.chown(path, uid, gid)
        etc = upper / "etc/scalr-server"
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "scalr-server.conf").write_text(
            f"ROLE={host.spec.role}\nDB_HOST={db_address}\nBIND_ADDRESS={host.spec.address}\n"
        )
        app_password = self.secret_file("mysql-app").read_text().strip()
        _write_private(etc / "app.cnf", f"[client]\nuser=scalr\npassword={app_password}\n")
        if host.spec.role == "db":
            _write_private(etc / "app.password", app_password + "\n")
            _write_private(etc / "backup.password", self.secret_file("mysql-backup").read_text())

    def _provision(self, hosts: list[LabHost]) -> None:
        """Install scalr-server 1.0.0 where it is missing; reconfigure the db host first, then the rest."""
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(_install_first_version, hosts))
            db = [h for h in hosts if h.spec.role == "db"]
            for host in db:
                if _reconfigure_once(host):
                    host.exec("mysql scalr", input=SEED_SQL)
            list(pool.map(_reconfigure_once, [h for h in hosts if h.spec.role != "db"]))
            list(pool.map(_wait_until_running, hosts))

    def _write_known_hosts(self, hosts: list[LabHost]) -> None:
        self.known_hosts.write_text("".join(f"{h.spec.address} {h.host_key()}\n" for h in hosts))

    def _write_inventory(self, hosts: list[LabHost]) -> None:
        base = self.inventory.parent
        base.mkdir(parents=True, exist_ok=True)

        def rel(path: Path) -> str:
            return os.path.relpath(path, base)

        lines = [
            "# Written by the Overhaul lab (`overhaul lab.up`); rewritten on every lab.up.",
            f"environment: {self.environment}",
            "ssh:",
            "  user: root",
            f"  key_file: {rel(self.key_file)}",
            f"  known_hosts: {rel(self.known_hosts)}",
            "  connect_timeout: 5",
            "vars:",
            f"  package: {PACKAGE}",
            "  disk_mounts: [/opt/scalr-server, /opt/scalr-server/data]",
            "secrets:",
            f"  mysql_backup_password: {{file: {rel(self.secret_file('mysql-backup'))}}}",
            "hosts:",
        ]
        for host in hosts:
            lines += [f"  - name: {host.name}", f"    address: {host.spec.address}", f"    roles: [{host.spec.role}]"]
        if self.synthetic_subnet:
            lines += [
                f"synthetic:  # `overhaul synthetic --env {self.environment}`: a farm of its own, launched, proven and "
                "torn down",
                "  provider: lab",
                "  roles: {db: {count: 1}, worker: {count: 1}, app: {count: 1}}",
                f"  lab_subnet: {self.synthetic_subnet}  # this lab's own (127.A.B -> 127.A.(255-B), docs/lab.md)",
                '  endpoints: ["{db1}:3306"]',
            ]
        self.inventory.write_text("\n".join(lines) + "\n")


def _loopback_subnet(subnet: str) -> bool:
    """True for "127.A.B": the first three octets of a /24 inside 127.0.0.0/8."""
    try:
        network = ipaddress.ip_network(f"{subnet}.0/24")
    except ValueError:
        return False
    return subnet.count(".") == 2 and network.subnet_of(ipaddress.ip_network("127.0.0.0/8"))


def _install_first_version(host: LabHost) -> None:
    installed = host.exec(f"dpkg-query -W -f '${{Status}}' {PACKAGE} 2>/dev/null", check=False).stdout
    if installed != "install ok installed":
        host.exec(f"apt-get update -q && apt-get install -y -q {PACKAGE}={FIRST_VERSION}")


def _reconfigure_once(host: LabHost) -> bool:
    """Run the first reconfigure of a freshly installed host; False when it had been done."""
    if host.path("/opt/scalr-server/var/log/reconfigure.log").exists():
        return False
    host.exec("scalr-server-ctl reconfigure")
    return True


def _wait_until_running(host: LabHost, timeout: float = 30.0) -> None:
    """A restarted host's supervisor starts its programs itself: wait until they are all RUNNING."""
    deadline = time.monotonic() + timeout
    while True:
        lines = host.exec("scalr-server-manage status", check=False).stdout.splitlines()
        if lines and all(line.split()[1:2] == ["RUNNING"] for line in lines):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"lab: services on {host.name} are not all RUNNING:\n" + "\n".join(lines))
        time.sleep(0.2)


def _write_private(path: Path, text: str) -> None:
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(text)


def _passwd_ids(rootfs: Path, user: str) -> tuple[int, int]:
    for line in (rootfs / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2]), int(fields[3])
    raise KeyError(f"lab: user {user} missing from the root filesystem")
