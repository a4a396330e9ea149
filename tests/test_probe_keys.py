"""The run's facts are keyed by what is asked (the command and its parser), not by a probe's free-text question."""

from __future__ import annotations

from overhaul.command import sh
from overhaul.context import Probe
from overhaul.testing import Answer, fake_host


def first_line(result):
    return result.stdout.splitlines()[0]


def test_two_probes_asking_different_things_under_the_same_words_never_share_an_answer():
    host = fake_host({"cat /etc/a": Answer("from a\n"), "cat /etc/b": Answer("from b\n")})
    one = Probe("the config", sh("cat /etc/a"), first_line)
    other = Probe("the config", sh("cat /etc/b"), first_line)  # another plug-in, the same words
    assert (host.read(one), host.read(other)) == ("from a", "from b")


def test_the_same_command_read_two_ways_is_parsed_by_each_parser():
    host = fake_host({"uname": Answer("Linux 6.1\n")})
    words = Probe("kernel", sh("uname"), lambda result: result.stdout.split())
    assert host.read(Probe("kernel", sh("uname"), first_line)) == "Linux 6.1"
    assert host.read(words) == ["Linux", "6.1"]


def test_probes_made_afresh_by_each_step_share_one_read():
    def installed(package: str) -> Probe[bool]:  # a new Probe (and parser closure) at every call, as steps make them
        return Probe(f"installed {package}", sh("dpkg -s {p}", p=package), lambda result: result.ok)

    host = fake_host({"dpkg -s": Answer("ok")})
    assert host.read(installed("nginx")) and host.read(installed("nginx"))
    assert host.remote.commands == ["dpkg -s nginx"]
