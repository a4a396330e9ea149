"""The raw-paramiko side of bench/peers.py: run stages of commands over strict SSH, nothing else.

Usage: python raw.py SPEC.json  (written by bench/peers.py; it may hold a secret for stdin, so it is a 0600 file)

The spec names the hosts (address, port, user, key, known_hosts), the pool width and the stages: for each
stage, each host's commands, each with optional stdin and an optional check of its output. Connections
open in parallel first (strict: the known_hosts file is loaded and unknown keys are rejected; TCP_NODELAY
set, as Overhaul does); then each stage runs on its hosts in parallel, each host's commands in order, and
the next stage starts when the stage has ended everywhere. Exit 1 (and the failures on stderr) when a
command fails its check, like a verify that finds a problem.
"""

from __future__ import annotations

import json
import re
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paramiko

PERCENT = re.compile(r"(\d+)%")
PROBE_MARK = "::overhaul-probe::"  # overhaul.context.MARK: probes sent as one command answer between these


def connect(host: dict) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.load_host_keys(host["known_hosts"])
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    sock = socket.create_connection((host["address"], host["port"]), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.connect(host["address"], port=host["port"], username=host["user"], key_filename=host["key_file"], sock=sock,
                   timeout=10, look_for_keys=False, allow_agent=False)
    return client


def run(client: paramiko.SSHClient, line: str, stdin: str) -> tuple[int, str, str]:
    channel = client.get_transport().open_session()
    channel.exec_command(line)
    if stdin:
        channel.sendall(stdin.encode())
    channel.shutdown_write()
    out = channel.makefile("rb").read().decode(errors="replace")
    err = channel.makefile_stderr("rb").read().decode(errors="replace")
    status = channel.recv_exit_status()
    channel.close()
    return status, out, err


def problem(command: dict, status: int, out: str, err: str) -> str | None:
    """What is wrong with a command's result (its exit code, then the check the spec asks for), or None."""
    if status != 0:
        return f"exit {status}: {(err or out).strip()[-300:]}"
    if "sections" in command:  # probes sent as one command: each answer between marks, with its exit code
        answers = out.split(PROBE_MARK + "\n")[1:]
        if len(answers) != len(command["sections"]):
            return f"{len(answers)} answers, expected {len(command['sections'])}: {out.strip()[-300:]}"
        for check, answer in zip(command["sections"], answers, strict=True):
            body, closed, code = answer.rpartition("\n" + PROBE_MARK)
            if not closed or not code.strip().lstrip("-").isdigit():
                return f"an answer cut short: {answer.strip()[-300:]}"
            wrong = problem(check, int(code), body.strip("\n"), "")
            if wrong:
                return wrong
        return None
    if command.get("expect") == "running":
        stopped = [line for line in out.splitlines() if line.split()[1:2] != ["RUNNING"]]
        return f"not RUNNING: {stopped}" if stopped else None
    if command.get("expect") == "disk":
        full = [int(p) for p in PERCENT.findall(out) if int(p) >= command["threshold"]]
        return f"disk at {full}%" if full else None
    return None


def run_all(client: paramiko.SSHClient, where: str, commands: list[dict]) -> list[str]:
    """One host's commands of one stage, in order; what went wrong with each."""
    found = []
    for command in commands:
        wrong = problem(command, *run(client, command["line"], command.get("stdin", "")))
        if wrong:
            found.append(f"{where}: {wrong}")
    return found


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    hosts = spec["hosts"]
    with ThreadPoolExecutor(max_workers=spec["width"]) as pool:
        clients = dict(zip(hosts, pool.map(connect, hosts.values()), strict=True))
        failures = []
        for stage in spec["stages"]:
            names = list(stage["commands"])
            for found in pool.map(run_all, [clients[n] for n in names], [f"{stage['name']}: {n}" for n in names],
                                  stage["commands"].values()):
                failures += found
        for client in clients.values():
            client.close()
    for failure in failures:
        print(failure, file=sys.stderr)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
