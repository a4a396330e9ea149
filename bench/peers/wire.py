"""Run the `overhaul` command line with every SSH exec request recorded: what the hosts really receive.

Usage: python wire.py LOG overhaul-arguments...   (used by bench/peers.py)

Each exec request paramiko sends (preflight, probes and steps alike, in the order sent) is appended to
LOG as a JSON line [host address, command line]. Overhaul's own code is not changed: paramiko's
`Channel.exec_command` is wrapped in this process only. The cost is one small file append per command.
"""

from __future__ import annotations

import json
import sys
import threading

import paramiko


def main() -> None:
    log_path, *arguments = sys.argv[1:]
    lock = threading.Lock()
    send = paramiko.Channel.exec_command

    def recorded(channel: paramiko.Channel, command: str | bytes) -> None:
        line = command.decode() if isinstance(command, bytes) else command
        with lock, open(log_path, "a") as log:
            log.write(json.dumps([channel.get_transport().getpeername()[0], line]) + "\n")
        send(channel, command)

    paramiko.Channel.exec_command = recorded
    from overhaul.cli import program  # after the wrap: nothing can have bound the original by then

    program.run(argv=["overhaul", *arguments])


if __name__ == "__main__":
    main()
