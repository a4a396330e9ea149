"""`acme.program` keeps the whole step contract on a lab of real hosts (needs root: the lab's hosts are namespaces).

The `step_contract` fixture comes with Overhaul (its pytest plugin): a lab of three hosts of this test's own, and
a checker that runs the step through `overhaul plan`, `run`, a SIGKILL after every journal write then `resume`, and
`undo`, failing with a message that names the step, the part of the contract and the kill point.
"""

from __future__ import annotations

from overhaul.contract import StepContract

AGENT = {"name": "acme-agent", "command": "/bin/sleep infinity"}


def test_acme_program_keeps_the_whole_step_contract(step_contract: StepContract) -> None:
    report = step_contract.check("acme.program", AGENT, hosts=["app1"])
    assert report.writes == 1 + 1 + 2 + 1  # the run's start, the gate's table, its pair's start and end, the run's end
    assert report.kill_points == list(range(1, report.writes))  # killed after every write but the last, resumed
    assert report.undo == "taken back"
