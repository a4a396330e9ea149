"""The fake connection of the fast tier (overhaul.testing.FakeTransport) behaves as the engine expects of the real one:
the framings the engine sends are answered command by command, unreachable hosts raise what the real transport
raises, connections are held, released and cut as the real ones. No SSH, no root."""

from __future__ import annotations

from collections import Counter

import pytest

from overhaul.command import sh
from overhaul.context import Facts, Probe, StepHost
from overhaul.errors import ConfigError, HostUnreachable
from overhaul.runner import Runner
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
    fake.keep = 0  # a pool that keeps no idle connection: a parked host is closed at once
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


def farm(size: int) -> FakeTransport:
    return FakeTransport(fake_inventory({f"h{n}": ["app"] for n in range(1, size + 1)}), {"true": Answer()},
                         max_workers=1)


def test_parked_hosts_stay_connected_up_to_the_pools_bound_and_the_longest_idle_is_closed_past_it():
    fake = farm(5)
    fake.keep = 2
    fake.connect([f"h{n}" for n in range(1, 6)])
    for name in ("h1", "h2", "h3"):
        fake.park(name, held=False)
    assert fake.connected() == ["h2", "h3", "h4", "h5"]  # h1, idle longest, closed; h4 and h5 in use, never parked
    fake.take("h2")  # in use again: no longer one to close
    fake.park("h4", held=False)
    assert fake.connected() == ["h2", "h3", "h4", "h5"]  # idle: h3, h4 (within 2)
    fake.park("h5", held=False)
    assert fake.connected() == ["h2", "h4", "h5"]  # h3 closed, not h2 (taken)
    fake.hold(["h2"])  # another user (a verify's checks) holds h2: parking it is theirs to decide
    fake.park("h2", held=False)
    assert fake.connected() == ["h2", "h4", "h5"]


def test_a_stage_walks_first_the_hosts_whose_connection_was_kept_the_longest_idle_first():
    fake = farm(5)
    fake.keep = 2
    fake.connect(["h1", "h2", "h3", "h4", "h5"])
    for name in ("h2", "h5", "h1", "h4", "h3"):
        fake.park(name, held=False)  # kept: h4, h3 (h4 the longer idle)
    assert fake.warm_first(["h1", "h2", "h3", "h4", "h5"]) == ["h4", "h3", "h1", "h2", "h5"]
    assert fake.warm_first(["h3", "h1"]) == ["h3", "h1"]  # only the stage's own hosts


def test_by_default_a_pool_keeps_every_host_of_a_farm_within_ten_per_worker():
    assert farm(5).idle_limit == 5
    assert farm(30).idle_limit == 10  # one worker: ten kept


def test_a_changing_run_on_more_hosts_than_workers_connects_each_host_once_when_the_pool_keeps_them_all():
    fake = farm(6)
    connects = count_connects(fake)
    plan = fake_plan(THREE_STAGES, fake.inventory)
    result = Runner(plan, fake, sleep=lambda _: None).run()  # type: ignore[arg-type]
    assert [r.outcome.value for r in result.results] == ["changed"] * 18
    assert connects == {f"h{n}": 1 for n in range(1, 7)}


def test_a_pool_that_keeps_fewer_hosts_reuses_the_kept_ones_first_at_each_stage():
    """One worker, two kept: at each stage after the first, the two hosts kept from the stage before are walked first
    and reused; the four others reconnect (where stages walked in the plan's order would reuse none)."""
    fake = farm(6)
    fake.keep = 2
    connects = count_connects(fake)
    plan = fake_plan(THREE_STAGES, fake.inventory)
    result = Runner(plan, fake, sleep=lambda _: None).run()  # type: ignore[arg-type]
    assert [r.outcome.value for r in result.results] == ["changed"] * 18
    assert sum(connects.values()) == 6 + 4 + 4
    order = [r.host for r in result.results]
    assert order[6:8] == ["h5", "h6"] and order[12:14] == ["h3", "h4"]


THREE_STAGES = "name: three\nstages:\n" + "".join(
    f"  - {{name: s{n}, step: shell, params: {{command: 'true'}}}}\n" for n in (1, 2, 3))


def count_connects(fake: FakeTransport) -> Counter[str]:
    """How many times each host of `fake` is connected to (a closed connection reopened counts again)."""
    connects: Counter[str] = Counter()
    for name in [host.name for host in fake.inventory.hosts]:
        remote = fake.host(name)
        opening = remote.connect

        def connect(remote=remote, opening=opening):
            if not remote.connected and not remote._cut:
                connects[remote.name] += 1
            return opening()

        remote.connect = connect  # type: ignore[method-assign]
    return connects


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


def test_a_login_the_server_did_not_answer_in_time_is_tried_again_a_refused_one_never():
    import paramiko

    from overhaul.transport import AUTH_TIMEOUT, UnknownHostKey, retryable

    assert retryable(paramiko.AuthenticationException(AUTH_TIMEOUT))  # a loaded sshd: another try may get in
    assert not retryable(paramiko.AuthenticationException("Authentication failed."))  # the key was refused
    assert not retryable(paramiko.BadAuthenticationType("Bad authentication type", ["password"]))
    key = paramiko.RSAKey.generate(1024)
    assert not retryable(paramiko.BadHostKeyException("app1", key, key))
    assert not retryable(UnknownHostKey("app1 is not in known_hosts"))
    assert retryable(ConnectionRefusedError()) and retryable(EOFError()) and retryable(paramiko.SSHException("reset"))
    assert not retryable(ValueError("a bug"))
