"""Shared fixtures: a lab of real hosts for the whole test session, and fresh labs for tests that break things."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import paramiko
import pytest
from helpers import PROCESS_OCTET
from pgserver import PgServer

from overhaul.lab import Lab
from overhaul.state import SQLiteState, State
from overhaul.state.postgresql import PostgresState

# Labs are torn down after each test; a lab on 127.A.B has its synthetic farm on 127.A.(255-B).
_subnets = itertools.cycle(range(31, 60))


def _start(root: Path, subnet: str, hosts: int) -> Lab:
    lab = Lab(home=root / "lab", inventory=root / "hosts/lab.yaml", subnet=subnet, log=lambda _: None)
    lab.up(hosts)
    return lab


@pytest.fixture(scope="session", autouse=True)
def journal_outside_the_checkout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """No test writes into the checkout's own .overhaul/ (the operator's journal and runs' logs): unless a test
    names its own, the journal, and the logs beside it, are the session's."""
    path = tmp_path_factory.mktemp("journal") / "journal.sqlite"
    before = os.environ.get("OVERHAUL_JOURNAL")
    os.environ["OVERHAUL_JOURNAL"] = str(path)
    yield path
    if before is None:
        os.environ.pop("OVERHAUL_JOURNAL", None)
    else:
        os.environ["OVERHAUL_JOURNAL"] = before


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The shared lab (db1, worker1, app1, app2 at 127.30.P.1-4): tests must leave it as they found it."""
    lab = _start(tmp_path_factory.mktemp("lab"), f"127.30.{PROCESS_OCTET}", 4)
    yield lab
    lab.down()


@pytest.fixture
def fresh_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[int], Lab]]:
    """Start a lab of its own for a test that changes or breaks hosts; torn down after the test."""
    started: list[Lab] = []

    def start(hosts: int = 3) -> Lab:
        started.append(_start(tmp_path_factory.mktemp("fresh-lab"), f"127.{next(_subnets)}.{PROCESS_OCTET}", hosts))
        return started[-1]

    yield start
    for lab in started:
        lab.down()


class Shell:
    """A strict (known_hosts + RejectPolicy) paramiko session to one lab host, for lab tests."""

    def __init__(self, lab: Lab, address: str, user: str = "root", timeout: float = 5):
        self.client = paramiko.SSHClient()
        self.client.load_host_keys(str(lab.known_hosts))
        self.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        self.client.connect(
            address, username=user, key_filename=str(lab.key_file), timeout=timeout,
            banner_timeout=timeout, auth_timeout=timeout, look_for_keys=False, allow_agent=False,
        )

    def run(self, command: str, stdin: str | None = None) -> tuple[int, str, str]:
        channel_in, out, err = self.client.exec_command(command, timeout=60)
        if stdin is not None:
            channel_in.write(stdin)
            channel_in.channel.shutdown_write()
        text, errors = out.read().decode(), err.read().decode()
        return out.channel.recv_exit_status(), text, errors

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def shell() -> Iterator[Callable[..., Shell]]:
    opened: list[Shell] = []

    def connect(lab: Lab, host_name: str, user: str = "root") -> Shell:
        opened.append(Shell(lab, lab.host(host_name).spec.address, user))
        return opened[-1]

    yield connect
    for session in opened:
        session.close()


@pytest.fixture(scope="session")
def moto_url(tmp_path_factory):
    """moto's server on 127.0.0.1 (AMI ids validated, so a bad image fails like on AWS)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, MOTO_ENABLE_AMI_VALIDATION="true")
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).read()
            break
        except OSError:
            assert time.monotonic() < deadline, "moto's server did not start"
            time.sleep(0.2)
    yield url
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:  # a teardown under load must not fail the session
        server.kill()
        server.wait()


AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}


@pytest.fixture
def aws(moto_url, monkeypatch):
    """A clean emulated AWS account; returns (url, ec2 client, a valid AMI id)."""
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    urllib.request.urlopen(urllib.request.Request(moto_url + "/moto-api/reset", method="POST")).read()
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=moto_url)
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    return moto_url, ec2, image


@pytest.fixture
def tag() -> str:
    """A unique name, so tests on the shared lab never see each other's files."""
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def postgres() -> Iterator[PgServer]:
    """A real PostgreSQL server (a throw-away cluster on 127.0.0.1) for the whole session."""
    server = PgServer()
    yield server
    server.close()


class Backend:
    """One state backend for a test: how the CLI is told to use it, and the same state opened here."""

    def __init__(self, name: str, tmp_path: Path, postgres: PgServer | None):
        self.name = name
        self.postgres = postgres
        self.opened: list[PostgresState] = []  # closed at the test's end (a pool collected in a thread warns)
        self.env = {"OVERHAUL_JOURNAL": str(tmp_path / "journal.sqlite")}
        if postgres is not None:
            self.url = postgres.database()
            self.env |= {"OVERHAUL_STATE": self.url, "PGPASSFILE": str(postgres.passfile)}

    def open(self) -> State:
        if self.postgres is None:
            return SQLiteState(self.env["OVERHAUL_JOURNAL"])
        self.opened.append(PostgresState(self.url, self.postgres.password))
        return self.opened[-1]


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each state backend in turn: the embedded SQLite file, then a fresh database on the test PostgreSQL."""
    server = request.getfixturevalue("postgres") if request.param == "postgresql" else None
    chosen = Backend(request.param, tmp_path, server)
    yield chosen
    for state in chosen.opened:
        state.close()
