"""`acme.program`'s decisions on a fake host (`overhaul.testing`): milliseconds, no SSH, no root."""

from __future__ import annotations

from acme_steps.program import Program

from overhaul.testing import Answer, fake_host

STATUS = "scalr-server-manage status acme-agent"


def agent() -> Program:
    return Program(Program.Params(name="acme-agent", command="/bin/sleep infinity"))


def test_a_program_configured_and_running_is_done() -> None:
    step = agent()
    host = fake_host({"cat --": Answer(stdout=step.wanted()), STATUS: Answer(stdout="acme-agent RUNNING pid 7\n")})
    assert step.check(host).done


def test_a_missing_program_is_configured_then_started_and_what_was_there_is_remembered() -> None:
    step = agent()
    host = fake_host({"cat --": Answer(exited=1), "umask 077": Answer(), "mv --": Answer(),
                      STATUS: Answer(stdout="acme-agent: ERROR (no such process)\n")})
    assert not step.check(host).done
    assert step.apply(host) == "acme-agent configured (/opt/scalr-server/etc/supervisor/conf.d/acme-agent.conf) and started"
    assert step.remembered == {"previous": None}  # an undo removes the file the step created
    assert "mv -- /opt/scalr-server/etc/supervisor/conf.d/acme-agent.conf.new " in host.remote.commands[-2]


def test_a_program_stopped_by_hand_is_work_to_do() -> None:
    step = agent()
    host = fake_host({"cat --": Answer(stdout=step.wanted()), STATUS: Answer(stdout="acme-agent STOPPED\n")})
    assert step.check(host).message == "acme-agent is STOPPED"
