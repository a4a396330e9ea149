"""Start-up of the commands that touch no host: `overhaul --help`, `overhaul --complete` (what shell completion
runs at each Tab: here, completing the flags of `upgrade`) and `overhaul inventory`, against the floor they
stand on and against peers.

Usage (from the repository): .venv/bin/python bench/startup.py [--rounds 15] [--hosts 20]

Each round runs every command once, in turn (interleaved, after one warm-up round not counted), each a fresh
process; the medians and their ratios are printed. The floors: this Python doing nothing, and importing invoke
(the command line's parser, which any `overhaul` command needs). The peers, from bench/.peers-venv (made by
bench/peers.py; skipped with a message when missing): `ansible-playbook --help`, `pyinfra --help`, and
`ansible-inventory --list` on the same hosts. The inventory is written for the bench: HOSTS hosts on
127.77.0.x with a fresh key and an empty known_hosts (`overhaul inventory` checks the key file at load;
nothing connects anywhere).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from peers import PEERS_VENV, BenchError, run_timed  # (bench/ is this script's folder)

PEERS = PEERS_VENV / "bin"


def project(folder: Path, hosts: int) -> None:
    """An inventory of `hosts` hosts (never connected to), for Overhaul and for Ansible."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "id_ed25519")], check=True)
    (folder / "known_hosts").write_text("")
    names = [(f"app{number}", f"127.77.0.{number}") for number in range(1, hosts + 1)]
    (folder / "hosts").mkdir()
    (folder / "hosts" / "bench.yaml").write_text(
        "environment: bench\nssh: {user: root, key_file: ../id_ed25519, known_hosts: ../known_hosts}\nhosts:\n"
        + "".join(f"  - {{name: {name}, address: {address}, roles: [app]}}\n" for name, address in names))
    (folder / "inventory.yml").write_text(json.dumps({"all": {"hosts": {
        name: {"ansible_host": address, "ansible_user": "root", "ansible_ssh_private_key_file": "id_ed25519"}
        for name, address in names}}}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--hosts", type=int, default=20)
    args = parser.parse_args()
    python = sys.executable
    sides = {
        "python: nothing": [python, "-c", "pass"],
        "python: import invoke": [python, "-c", "import invoke"],
        "overhaul --help": [python, "-m", "overhaul", "--help"],
        "overhaul upgrade --help": [python, "-m", "overhaul", "upgrade", "--help"],
        "overhaul --complete (flags)": [python, "-m", "overhaul", "--complete", "--", "overhaul", "upgrade", "--"],
        "overhaul inventory": [python, "-m", "overhaul", "inventory", "--env", "bench"],
    }
    peers = {"ansible-playbook --help": [str(PEERS / "ansible-playbook"), "--help"],
             "pyinfra --help": [str(PEERS / "pyinfra"), "--help"],
             "ansible-inventory --list": [str(PEERS / "ansible-inventory"), "-i", "inventory.yml", "--list"]}
    for label, argv in peers.items():
        if Path(argv[0]).exists():
            sides[label] = argv
        else:
            print(f"{label}: SKIPPED ({argv[0]} missing: `bench/peers.py` installs ansible-core and pyinfra there)")
    with tempfile.TemporaryDirectory(prefix="overhaul-startup-") as work:
        folder = Path(work)
        project(folder, args.hosts)
        times: dict[str, list[float]] = {label: [] for label in sides}
        for number in range(args.rounds + 1):
            for label, argv in sides.items():
                elapsed = run_timed(argv, folder)
                if number:  # the first round warms the page cache
                    times[label].append(elapsed)
    median = {label: statistics.median(values) for label, values in times.items()}
    print(f"{args.rounds} rounds, {args.hosts} hosts in the inventory; median wall time per command:")
    for label, value in median.items():
        print(f"  {label:<26} {value * 1000:7.0f} ms")

    def ratio(top: str, bottom: str) -> None:
        if top in median and bottom in median:
            print(f"  {top} / {bottom}: {median[top] / median[bottom]:.2f}x")

    print("ratios (medians):")
    ratio("overhaul --help", "python: import invoke")
    ratio("overhaul --complete (flags)", "python: import invoke")
    ratio("overhaul --help", "ansible-playbook --help")
    ratio("overhaul --help", "pyinfra --help")
    ratio("overhaul inventory", "ansible-inventory --list")


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        sys.exit(f"bench: {exc}")
