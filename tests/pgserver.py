"""A real PostgreSQL server for the tests: Debian's package, a throw-away cluster on a loopback port.

The cluster lives in a temporary folder owned by the unprivileged `postgres` user (the server refuses
to run as root), password authentication only; the tests reach it with a password file (PGPASSFILE).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg

SUPERUSER = "postgres"
ROLE = "overhaul"


def _binaries() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        raise RuntimeError("PostgreSQL's server is not installed: `make test` installs Debian's postgresql package")
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PgServer:
    """One cluster: start, stop, restart, and a fresh database per test."""

    def __init__(self) -> None:
        self.bin = _binaries()
        self.root = Path(tempfile.mkdtemp(prefix="overhaul-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.password = uuid.uuid4().hex
        self.passfile = self.root / "pgpass"
        self.passfile.write_text(f"127.0.0.1:{self.port}:*:{ROLE}:{self.password}\n"
                                 f"127.0.0.1:{self.port}:*:{SUPERUSER}:{self.password}\n")
        self.passfile.chmod(0o600)
        secret = self.root / "initdb-password"
        secret.write_text(self.password + "\n")
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(self.root, account.pw_uid, account.pw_gid)
            os.chown(secret, account.pw_uid, account.pw_gid)
        self._as_server("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=scram-sha-256",
                        f"--pwfile={secret}", "-E", "UTF8", "--no-sync")
        secret.unlink()
        self.start()
        with self.connect() as conn:
            conn.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{self.password}'")

    def _as_server(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, cwd="/")

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root}"
        self._as_server("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options, "-w",
                        "start")

    def stop(self) -> None:
        self._as_server("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def connect(self, database: str = "postgres", user: str = SUPERUSER) -> psycopg.Connection:
        return psycopg.connect(host="127.0.0.1", port=self.port, user=user, password=self.password, dbname=database,
                               autocommit=True)

    def database(self) -> str:
        """A new empty database owned by the overhaul role; its URL (no password: that is in PGPASSFILE)."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with self.connect() as conn:
            conn.execute(f"CREATE DATABASE {name} OWNER {ROLE}")
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
