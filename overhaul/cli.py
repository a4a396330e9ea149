"""The command line: invoke tasks, used both by `invoke` (through tasks.py) and the `overhaul` script."""

from __future__ import annotations

from invoke import Collection, Program, task

from overhaul import __version__
from overhaul.lab import Lab

LAB_HELP = {
    "home": "where the lab keeps its state (default .overhaul/lab)",
    "inventory": "the inventory file to write (default hosts/lab.yaml)",
}


def _lab(home: str, inventory: str) -> Lab:
    return Lab(home=home, inventory=inventory)


@task(help={"hosts": "number of hosts: one db, one worker, the rest app (default 4)", **LAB_HELP})
def up(c, hosts=4, home=".overhaul/lab", inventory="hosts/lab.yaml"):
    """Start the lab (or repair a half-started one): real hosts with scalr-server 1.0.0."""
    lab = _lab(home, inventory)
    lab.up(int(hosts))
    _print_status(lab)


@task(help=LAB_HELP)
def down(c, home=".overhaul/lab", inventory="hosts/lab.yaml"):
    """Stop every lab host and remove the lab's hosts and inventory."""
    _lab(home, inventory).down()
    print("lab: down")


@task(help=LAB_HELP)
def status(c, home=".overhaul/lab", inventory="hosts/lab.yaml"):
    """Show each lab host: role, address, whether it runs and whether sshd answers."""
    _print_status(_lab(home, inventory))


def _print_status(lab: Lab) -> None:
    rows = lab.status()
    if not rows:
        print("lab: no hosts (run `overhaul lab.up`)")
        return
    print(f"{'HOST':<10} {'ROLE':<7} {'ADDRESS':<15} {'RUNNING':<8} SSHD")
    for row in rows:
        print(f"{row.name:<10} {row.role:<7} {row.address:<15} {'yes' if row.running else 'no':<8} "
              f"{'answers' if row.sshd else 'down'}")
    first = rows[0]
    print(f"log in: ssh -i {lab.key_file} -o UserKnownHostsFile={lab.known_hosts} root@{first.address}")


lab = Collection("lab", up, down, status)
namespace = Collection(lab)

program = Program(namespace=namespace, name="overhaul", version=__version__)
