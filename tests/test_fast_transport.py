"""The fake connection of the fast tier (overhaul.testing.FakeTransport) behaves as the engine expects of the real one:
the framings the engine sends are answered command by command, unreachable hosts raise what the real transport
raises, connections are held, released and cut as the real ones. No SSH, no root."""

from __future__ import annotations

import pytest

from overhaul.command import sh
from overhaul.context import Facts, Probe, StepHost
from overhaul.errors import ConfigError, HostUnreachable
from overhaul.testing import Answer, FakeTransport, fake_inventory, fake_plan, in_turn


def transport(**options) -> FakeTransport:
    inventory = fake_inventory({"db1": ["db"], "app1": {"roles": ["app"], "vars": {"tier": "front"}}},
                               vars={"tier": "any"})
    return FakeTransport(inventory, {"cat /a": Answer("A\n"), "cat /b": Answer("B", exited=3, stderr="!")}, **options)


def step_host(fake: FakeTransport, name: str = "db1") -> StepHost:
    return StepHost(fake.host(name), timeout=5, run_id="run-1", facts=Facts())  # type: ignore[arg-type]


A = Probe("a", sh("cat /a"), lambda result: (result.exited, result.stdout))
B = Probe("b", sh("cat /b"), lambda result: (result.exited, result.stdout))


def test_probes_sent_in_one_command_are_answered_each_from_the_table_in_the_engines_framing():
    fake = transport()
    host = step_host(fake)
    host.prefetch([A, B])
    assert len(fake.host("db1").sent) == 1 and fake.host("db1").commands == ["cat /a", "cat /b"]
    assert (host.read(A), host.read(B)) == ((0, "A\n"), (3, "B!"))  # (stderr merged, as 2>&1 does)
    assert fake.host("db1").commands == ["cat /a", "cat /b"]  # read from the cache


def test_a_durable_command_and_the_probes_read_after_it_are_unframed():
    fake = transport(hosts={"db1": {"apt-get install": Answer("installed\n", exited=0, stderr="warning")}})
    host = step_host(fake)
    result = host.run_then_read(sh("apt-get install -y scalr-server"), [A, B], durable="package-scalr-server")
    assert (result.exited, result.stdout, result.stderr) == (0, "installed\n", "warning")
    host.keep_reported()
    assert (host.read(A), host.read(B)) == ((0, "A\n"), (3, "B!"))
    assert fake.host("db1").commands == ["apt-get install -y scalr-server", "cat /a", "cat /b"]
    assert fake.commands == [("db1", "apt-get install -y scalr-server"), ("db1", "cat /a"), ("db1", "cat /b")]


def test_a_hosts_own_table_comes_before_the_common_one_and_hosts_carry_the_inventorys_vars():
    fake = transport(hosts={"app1": {"cat /a": Answer("mine")}})
    assert fake.host("app1").run("cat /a").stdout == "mine" and fake.host("db1").run("cat /a").stdout == "A\n"
    assert (fake.host("app1").roles, fake.host("app1").vars) == (["app"], {"tier": "front"})


def test_a_command_no_table_answers_fails_naming_it_and_is_listed():
    fake = transport()
    with pytest.raises(AssertionError, match="the fake host db1 has no answer for: uptime"):
        fake.host("db1").run("uptime")
    assert fake.unanswered == [("db1", "uptime")]


def test_an_unreachable_host_raises_host_unreachable_for_good_or_for_its_first_attempts():
    fake = transport(unreachable={"app1": 2})
    assert set(fake.connect(["db1", "app1"])) == {"app1"}
    with pytest.raises(HostUnreachable, match="app1: connection refused"):
        fake.host("app1").run("cat /a")  # a command connects first
    assert fake.host("app1").run("cat /a").ok  # the third attempt
    down = transport(unreachable=["app1"])
    assert [set(down.connect(["db1", "app1"])) for _ in range(3)] == [{"app1"}] * 3


def test_in_turn_answers_in_order_then_repeats_the_last_and_raises_exceptions():
    reply = in_turn(Answer(exited=1), HostUnreachable("db1: connection lost"), Answer("ok"))
    assert reply("x").exited == 1
    with pytest.raises(HostUnreachable):
        reply("x")
    assert [reply("x").stdout for _ in range(3)] == ["ok"] * 3


def test_released_and_parked_hosts_close_only_once_no_one_holds_them_and_a_cut_refuses_to_reconnect():
    fake = transport()
    fake.hold(["db1", "app1"])
    fake.hold(["db1"])
    fake.connect(["db1", "app1"])
    fake.release("db1")
    fake.park("app1")  # held by the caller only: parked
    assert fake.connected() == ["db1"]
    fake.release("db1")
    assert fake.connected() == []
    fake.cut()
    with pytest.raises(HostUnreachable, match="cut"):
        fake.host("db1").run("cat /a")


def test_a_plan_is_built_from_python_values_with_the_files_checks():
    inventory = fake_inventory({"db1": ["db"], "app1": ["app"]})
    plan = fake_plan("name: yaml\nstages:\n  - {name: s, step: shell, roles: [app], params: {command: 'true'}}\n",
                     inventory)
    assert [(p.stage.name, p.hosts) for p in plan.stages] == [("s", ["app1"])]
    with pytest.raises(ConfigError, match="'nope' is not in the inventory"):
        fake_plan({"name": "bad", "stages": [{"name": "s", "step": "shell", "roles": ["nope"],
                                              "params": {"command": "true"}}]}, inventory)
    with pytest.raises(KeyError):
        FakeTransport(inventory, hosts={"db2": {}})  # a host the inventory does not have: the test's mistake
