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


OS_RELEASE = 'ID=debian\nVERSION_ID="12"\n'


def test_two_lambdas_reading_one_command_are_two_parsers():
    host = fake_host({"cat /etc/os-release": Answer(OS_RELEASE)})
    os_id = Probe("os", sh("cat /etc/os-release"), lambda r: r.stdout.split("\n")[0].split("=")[1])
    version = Probe("os", sh("cat /etc/os-release"), lambda r: r.stdout.split("\n")[1].split("=")[1].strip('"'))
    assert (host.read(os_id), host.read(version)) == ("debian", "12")


def test_one_factorys_parsers_differ_by_what_each_closes_over():
    def field(name: str) -> Probe[str]:
        return Probe(name, sh("cat /etc/os-release"),
                     lambda r: dict(line.split("=") for line in r.stdout.split())[name].strip('"'))

    host = fake_host({"cat /etc/os-release": Answer(OS_RELEASE)})
    assert (host.read(field("ID")), host.read(field("VERSION_ID")), host.read(field("ID"))) == ("debian", "12", "debian")
    assert host.remote.commands == ["cat /etc/os-release"] * 2  # (the third was the first's answer again)


def test_methods_bound_to_different_objects_are_different_parsers():
    class Field:
        def __init__(self, index: int):
            self.index = index

        def parse(self, result) -> str:
            return result.stdout.split()[self.index]

    host = fake_host({"uname -a": Answer("Linux box 6.1\n")})
    first, second = Field(0), Field(1)
    assert host.read(Probe("u", sh("uname -a"), first.parse)) == "Linux"
    assert host.read(Probe("u", sh("uname -a"), second.parse)) == "box"
