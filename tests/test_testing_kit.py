"""The step authors' test kit (overhaul.testing) on the built-in steps: their parsing and decisions, with no SSH,
no lab and no root, in milliseconds."""

from __future__ import annotations

import re

import pytest
from overhaul.steps.disk import DiskUsage
from overhaul.steps.package import PackageUpgrade, PackageVersion
from overhaul.steps.services import ServicesStop, ServicesVerify

from overhaul.errors import StepFailed
from overhaul.testing import Answer, fake_host

DF = """Filesystem     1024-blocks    Used Available Capacity Mounted on
/dev/loop1          1000000  850000    150000      85% /opt/scalr-server
"""
STATUS = """plotter                          RUNNING   pid 101, uptime 0:01:00
scalr-nginx                      FATAL     Exited too quickly (process log may have details)
"""


def test_the_disk_check_reads_df_and_names_the_full_mount():
    host = fake_host({"df -P": Answer(stdout=DF)})
    step = DiskUsage(DiskUsage.Params(threshold=80))
    found = step.check(host)
    assert not found.done and found.message == "/opt/scalr-server at 85% (threshold 80%)"
    assert found.facts == {"usage": {"/opt/scalr-server": 85}}
    assert host.remote.commands == ["df -P -- /opt/scalr-server"]
    assert DiskUsage(DiskUsage.Params(threshold=90)).check(fake_host({"df -P": Answer(stdout=DF)})).done


def test_services_verify_names_each_program_not_running():
    host = fake_host({"scalr-server-manage status": Answer(stdout=STATUS, exited=3)})
    found = ServicesVerify(ServicesVerify.Params()).check(host)
    assert not found.done and "scalr-nginx FATAL" in found.message and "plotter" not in found.message


def test_a_supervisor_that_does_not_answer_is_a_failure_not_an_empty_farm():
    host = fake_host({"scalr-server-manage status": Answer(stderr="unix:///run/supervisor.sock no such file", exited=7)})
    with pytest.raises(StepFailed, match=r"`scalr-server-manage status` exited 7: unix:///run/supervisor.sock"):
        ServicesVerify(ServicesVerify.Params()).check(host)


def test_services_stop_refuses_a_farm_already_broken_before_the_run():
    answers = {"command -v": Answer(), "scalr-server-manage status": Answer(stdout=STATUS),
               re.compile("dpkg-query|rpm -q"): Answer(stdout="install ok installed|1.0.0")}
    found = ServicesStop(ServicesStop.Params(package="scalr-server", version="1.1.0")).preflight(fake_host(answers))
    assert not found.done and "scalr-nginx FATAL" in found.message and "allow_not_running" in found.message
    allowed = ServicesStop.Params(package="scalr-server", version="1.1.0", allow_not_running=True)
    assert ServicesStop(allowed).preflight(fake_host(answers)).done


def test_the_version_check_compares_the_installed_version_with_the_expected_one():
    installed = {re.compile("dpkg-query|rpm -q"): Answer(stdout="install ok installed|1.0.0")}
    expected = PackageVersion(PackageVersion.Params(version="1.1.0")).check(fake_host(installed))
    assert not expected.done and expected.message == "scalr-server 1.0.0, expected 1.1.0"
    assert PackageVersion(PackageVersion.Params(version="1.0.0")).check(fake_host(installed)).done
    unknown = PackageVersion(PackageVersion.Params()).check(fake_host(installed))
    assert unknown.done and unknown.message == "scalr-server 1.0.0 (no expected version known)"


def test_a_package_undo_that_never_read_the_host_takes_nothing_back_and_says_so():
    step = PackageUpgrade(PackageUpgrade.Params(version="1.1.0"))
    host = fake_host({})  # it asks the host nothing
    assert step.undone(host, {}).message == "scalr-server: the run never got to install it here: nothing to take back"
    assert step.undone(host, {"previous": None}).message == "scalr-server was not installed before the run: kept"
    assert host.remote.commands == []


def test_a_command_the_table_does_not_answer_fails_naming_it():
    with pytest.raises(AssertionError, match=r"the fake host host1 has no answer for: df -P -- /opt/scalr-server"):
        DiskUsage(DiskUsage.Params()).check(fake_host({"other": Answer()}))


def test_a_secret_read_on_the_fake_host_is_redacted_from_what_it_answers():
    host = fake_host({"cat": Answer(stdout="password=s3cret-value\n")}, secrets={"db": "s3cret-value"})
    assert host.secret("db") == "s3cret-value"
    assert "s3cret-value" not in host.run("cat /etc/x").stdout
