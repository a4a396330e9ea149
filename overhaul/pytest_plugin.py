"""pytest plugin: run testinfra checks against an environment's hosts through Overhaul's transport.

    pytest checks/ --overhaul-env production          # every test runs once per host of production

`@pytest.mark.roles("db")` keeps a test to hosts having one of those roles; the `overhaul_vars`
fixture gives the host's inventory variables. Inert unless --overhaul-env is given.

And the step author's contract kit (see overhaul.contract and docs/writing-steps.md), fixtures that do nothing
unless a test asks for them: `overhaul_lab` (a lab of real hosts of the test's own; needs root),
`step_contract` (a StepContract bound to it), `overhaul_lab_subnet` and `overhaul_lab_size` (override them in
a conftest.py to place or size the lab).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from overhaul.contract import StepContract
    from overhaul.lab import Lab

# The contract kit's labs: 127.N.P.x, N in this range (Overhaul's own tests use 127.29-62, its benchmarks 127.77),
# P from the process id, so parallel test processes (pytest-xdist) and labs of one process never share an address.
LAB_SUBNETS = itertools.cycle(range(64, 77))


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("overhaul")
    group.addoption("--overhaul-env", default=None, help="run testinfra checks on this environment's hosts")
    group.addoption("--overhaul-hosts-dir", default="hosts", help="folder of inventories (default hosts)")
    group.addoption("--overhaul-only", default=None, help="comma-separated host names (default: every host)")
    group.addoption("--overhaul-vars", default=None, help="a JSON object of variables overhaul_vars adds (expected_version)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "roles(*names): run only on hosts having one of these roles")
    env = config.getoption("overhaul_env")
    if not env:
        return
    from overhaul import checks
    from overhaul.inventory import load_inventory

    hosts_dir = config.getoption("overhaul_hosts_dir")
    for variable, value in ((checks.ENV_VARIABLE, env), (checks.HOSTS_DIR_VARIABLE, hosts_dir)):
        if os.environ.get(variable) != value:  # `overhaul verify` sets them once for all its sessions
            config.add_cleanup(functools.partial(_restore, variable, os.environ.get(variable)))
            os.environ[variable] = value  # how testinfra's backends (made at collection) learn the environment
    only = config.getoption("overhaul_only")
    names = only.split(",") if only else [h.name for h in load_inventory(env, Path(hosts_dir)).hosts]
    if not config.getoption("hosts", default=None):
        config.option.hosts = ",".join(f"overhaul://{name}" for name in names)
        checks.transport_for(env, hosts_dir).connect(names)  # every host's connection at once, reused by all checks


def _restore(variable: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(variable, None)
    else:
        os.environ[variable] = value


def host_name(item: pytest.Item) -> str | None:
    """The inventory name of the host a collected check runs on (None: not a testinfra check)."""
    callspec = getattr(item, "callspec", None)
    target = callspec.params.get("_testinfra_host") if callspec else None
    return getattr(getattr(target, "backend", None), "hostname", None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    env = config.getoption("overhaul_env")
    if not env:
        return
    from overhaul.checks import inventory_for

    inventory = inventory_for(env, config.getoption("overhaul_hosts_dir"))
    for item in items:  # a check not for this host's roles is reported skipped, so reports show it was considered
        marker = item.get_closest_marker("roles")
        name = host_name(item)
        if marker is not None and name is not None and not set(marker.args) & set(inventory.host(name).roles):
            item.add_marker(pytest.mark.skip(reason=f"only for role {', '.join(marker.args)}: {name} is "
                                                    f"{', '.join(inventory.host(name).roles)}"))


@pytest.fixture
def overhaul_vars(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The inventory variables of the host this test runs on (plus `expected_version` when known)."""
    from overhaul.checks import inventory_for

    env = request.config.getoption("overhaul_env")
    if not env:
        pytest.fail("overhaul_vars needs --overhaul-env")
    inventory = inventory_for(env, request.config.getoption("overhaul_hosts_dir"))
    values = inventory.host_vars(inventory.host(host_name(request.node)))
    extra = request.config.getoption("overhaul_vars")
    return {**json.loads(extra), **values} if extra else values


def process_octet() -> int:
    """The P of a test process's lab subnets (127.N.P): from its process id, so that two test runs at once never
    collide; pytest-xdist's workers of one run (gw0, gw1, ...) take consecutive ones from their controller's."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    return (os.getppid() + int(worker[2:]) + 1) % 250 if worker.startswith("gw") else os.getpid() % 250


def next_lab_subnet() -> str:
    """The next subnet of the contract kit's range: 127.N.P, N cycling over 64-76, P from `process_octet`."""
    return f"127.{next(LAB_SUBNETS)}.{process_octet()}"


def start_lab(root: Path, subnet: str, hosts: int) -> Lab:
    """A lab of `hosts` real hosts on `subnet`, its state in `root` (its inventory: root/hosts/lab.yaml)."""
    from overhaul.lab import Lab

    lab = Lab(home=root / "lab", inventory=root / "hosts" / "lab.yaml", subnet=subnet, log=lambda _: None)
    try:
        lab.up(hosts)
    except BaseException:
        lab.down()
        raise
    return lab


@pytest.fixture
def overhaul_lab_subnet() -> str:
    """The three octets the `overhaul_lab` of a test listens on (127.64-76.P, P from the process id)."""
    return next_lab_subnet()


@pytest.fixture
def overhaul_lab_size() -> int:
    """How many hosts `overhaul_lab` starts: db1, worker1, then app1, app2..."""
    return 3


@pytest.fixture
def overhaul_lab(tmp_path_factory: pytest.TempPathFactory, overhaul_lab_subnet: str, overhaul_lab_size: int) -> Iterator[Lab]:
    """A lab of real hosts for this test alone (environment `lab`, inventory `overhaul_lab.inventory`), torn down
    after it. Each host is a Debian in its own namespaces with sshd, supervisord, the scalr-server fixture package
    (1.0.0 installed, 1.1.0 in its apt repository) and MariaDB on db1. Needs root (skipped otherwise)."""
    if os.geteuid() != 0:
        pytest.skip(reason="overhaul_lab starts real hosts (namespaces, mounts): it needs root")
    lab = start_lab(tmp_path_factory.mktemp("overhaul-lab"), overhaul_lab_subnet, overhaul_lab_size)
    yield lab
    lab.down()


@pytest.fixture
def step_contract(overhaul_lab: Lab, tmp_path: Path) -> StepContract:
    """A StepContract on `overhaul_lab`: `step_contract.check("acme.program", {...}, hosts=["app1"])` proves a
    step's whole contract there (preflight honest, idempotent, killed at every journal write then resumed, undo)."""
    from overhaul.contract import StepContract

    workdir = tmp_path / "contract"
    workdir.mkdir(mode=0o700)
    return StepContract(overhaul_lab, workdir)
