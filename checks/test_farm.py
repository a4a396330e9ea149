"""Example operator checks (pytest-testinfra), run by `overhaul verify` on every host of the environment.

Each test runs once per host; `@pytest.mark.roles(...)` keeps it to some roles.
"""

import pytest


def test_the_application_package_is_installed_at_the_expected_version(host, overhaul_vars):
    package = host.package(overhaul_vars.get("package", "scalr-server"))
    assert package.is_installed
    expected = overhaul_vars.get("expected_version")
    if expected:  # known once an upgrade of this environment has succeeded (or set in the inventory)
        assert package.version == expected


def test_the_data_mount_is_a_filesystem_of_its_own(host):
    data = host.mount_point("/opt/scalr-server/data")
    assert data.exists
    assert data.device != host.mount_point("/").device


@pytest.mark.roles("app")
def test_the_supervisor_runs_the_web_server(host):
    httpd = host.supervisor("scalr-httpd", supervisorctl_path="supervisorctl",
                            supervisorctl_conf="/opt/scalr-server/etc/supervisor/supervisord.conf")
    assert httpd.is_running


@pytest.mark.roles("db")
def test_mariadb_answers_on_the_db_host(host):
    answer = host.run("mysql -N -e 'SELECT version FROM scalr.schema_version'")
    assert answer.rc == 0, answer.stderr
    assert answer.stdout.strip()
