"""Facts read once: shared by the steps that ask the same question, never trusted across an apply or a stage."""

from __future__ import annotations

from helpers import lab_inventory, outcomes, plan_for

from overhaul.context import MARK, Facts, sections
from overhaul.execution import Execution, Gate
from overhaul.plan import build_plan
from overhaul.runbook import load_runbook
from overhaul.runner import Runner
from overhaul.state import SQLiteState
from overhaul.step import Registry
from overhaul.transport import RemoteHost, Transport


def test_a_fact_is_read_once_and_forgotten_on_apply_unless_stable():
    facts, reads = Facts(), []

    def read(answer):
        return lambda: reads.append(answer) or answer

    assert facts.get("app1", "installed", read("1.0.0")) == "1.0.0"
    assert facts.get("app1", "installed", read("other")) == "1.0.0"
    assert facts.get("app1", "manager", read("apt"), stable=True) == "apt"
    facts.forget("app1")
    assert facts.get("app1", "installed", read("1.1.0")) == "1.1.0"
    assert facts.get("app1", "manager", read("yum")) == "apt"  # stable: the run's steps do not change it
    assert reads == ["1.0.0", "apt", "1.1.0"]


def test_probe_answers_are_split_exactly():
    out = f"{MARK}\nline one\nline two\n\n{MARK}0\n{MARK}\nno newline\n{MARK}3\n{MARK}\n\n{MARK}1\n"
    assert sections(out) == [(0, "line one\nline two\n"), (3, "no newline"), (1, "")]


def test_an_answer_cut_short_is_not_taken_for_one():
    """A joined read killed by its timeout: the answer without its closing mark is not parsed (its output is not an
    exit code); the step reads it again by itself."""
    assert sections(f"{MARK}\nfirst\n{MARK}0\n{MARK}\n42\n") == [(0, "first")]


def test_a_stage_reads_ahead_only_what_later_stages_read_under_the_same_timeout(lab, tmp_path):
    from overhaul.runner import reads_ahead

    plan = plan_for("""
    name: look
    stages:
      - {name: first, step: supervisor.up}
      - {name: same, step: services.verify}
      - {name: slower, step: disk.usage, timeout: 900, params: {mounts: [/]}}
""", tmp_path, lab_inventory(lab))
    first, same, slower = plan.stages
    ahead = [probe.question for probe in reads_ahead(first, [same, slower], "app1")]
    assert ahead == [probe.question for probe in same.step(same.params["app1"]).probes()]
    assert [probe.question for probe in reads_ahead(slower, [same], "app1")] == []  # (the other way round, too)


def run_stopping_plotter_at_the_gated_stage(lab, plan):
    """Run `plan`; just before its `confirm: true` stage, someone stops plotter on app1 by hand (started again after)."""

    def stop_by_hand(planned):
        lab.host("app1").exec("scalr-server-manage stop plotter")
        return True

    transport = Transport(plan.inventory)
    try:
        return Runner(plan, transport, confirm=stop_by_hand, sleep=lambda _: None).run()
    finally:
        transport.close()
        lab.host("app1").exec("scalr-server-manage start plotter")


def test_a_change_by_hand_between_two_stages_is_seen_once_the_run_changed_the_host(lab, tmp_path):
    lab.host("app1").exec("rm -f /tmp/overhaul-touched")
    plan = plan_for("""
        name: twice
        stages:
          - {name: change it, step: shell, hosts: [app1], params: {command: "touch /tmp/overhaul-touched"}}
          - {name: first look, step: services.verify, hosts: [app1]}
          - {name: second look, step: services.verify, hosts: [app1], confirm: true}
    """, tmp_path, lab_inventory(lab))
    try:
        result = run_stopping_plotter_at_the_gated_stage(lab, plan)
    finally:
        lab.host("app1").exec("rm -f /tmp/overhaul-touched")
    assert outcomes(result, "change it") == {"app1": "changed"}
    assert outcomes(result, "first look") == {"app1": "ok"}
    assert outcomes(result, "second look") == {"app1": "failed"}
    assert "plotter STOPPED" in next(r for r in result.results if r.stage == "second look").message


def counted(monkeypatch) -> dict[str, int]:
    counts: dict[str, int] = {}
    original = RemoteHost.run

    def run(self, command, **kwargs):
        counts[self.name] = counts.get(self.name, 0) + 1
        return original(self, command, **kwargs)

    monkeypatch.setattr(RemoteHost, "run", run)
    return counts


def test_an_upgrade_sends_at_most_ten_commands_per_app_host_preflight_included(fresh_lab, tmp_path, monkeypatch):
    lab = fresh_lab(3)
    plan = build_plan(load_runbook("upgrade"), lab_inventory(lab), Registry(), {"version": "1.1.0"})
    state = SQLiteState(tmp_path / "journal.sqlite")
    counts = counted(monkeypatch)
    result = Execution(plan, state=state, gate=Gate()).run()
    assert not result.failed and not result.refused
    assert counts["app1"] <= 10 and counts["worker1"] <= 10, counts  # Ansible's playbook: 6; before the facts: 23
    assert lab.host("app1").exec("dpkg-query -W -f '${Version}' scalr-server").stdout == "1.1.0"
    counts.clear()
    again = Execution(plan, state=state, gate=Gate()).run()
    assert {r.outcome.value for r in again.results} == {"ok"}
    # A no-op re-run changes nothing: the gate's read serves the changing stages' checks; the three
    # verification stages read afresh (they are there to see the farm as it is at the end).
    assert counts["app1"] <= 4, counts


def test_a_verification_of_an_untouched_host_reads_it_afresh_after_a_while(lab, tmp_path):
    plan = plan_for("""
        name: later
        stages:
          - {name: first look, step: services.verify, hosts: [app1]}
          - {name: long work elsewhere, step: shell, hosts: [db1], params: {command: "sleep 6"}}
          - {name: final look, step: services.verify, hosts: [app1], confirm: true}
    """, tmp_path, lab_inventory(lab))
    result = run_stopping_plotter_at_the_gated_stage(lab, plan)
    assert outcomes(result, "first look") == {"app1": "ok"}
    assert outcomes(result, "final look") == {"app1": "failed"}  # app1 was never changed, but it was read again


def test_forgetting_a_host_keeps_its_stable_facts_and_every_other_hosts():
    facts = Facts()
    facts.put("app1", "version", "1.0.0")
    facts.put("app1", "package manager", "apt", stable=True)
    facts.put("app2", "version", "1.0.0")
    facts.forget("app1", older_than=3600)  # read just now: kept
    assert facts.known("app1", "version")
    facts.forget("app1")
    assert not facts.known("app1", "version") and facts.known("app1", "package manager")
    assert facts.known("app2", "version")
    assert facts.get("app1", "version", lambda: "1.1.0") == "1.1.0" and facts.get("app1", "version", lambda: "x") == "1.1.0"
