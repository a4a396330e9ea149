"""The project is found from any folder inside it (as git finds its own), and a default environment spares `--env`.

Run as an operator runs the tool: a real lab, the `overhaul` and `invoke` commands, from subfolders and from
outside any project.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write

from overhaul.settings import NoProject, find_project_root, project_root, set_default_environment

ROOT = Path(__file__).resolve().parent.parent


def command(cwd: Path, *args: str, env: dict[str, str] | None = None, invoke: bool = False,
            journal: bool = False) -> subprocess.CompletedProcess:
    """`overhaul ARGS` (or `invoke ARGS` with this repository's tasks.py) in `cwd`; the journal is the project's own
    unless `journal` (the test's file then): OVERHAUL_JOURNAL and OVERHAUL_ENV are not inherited."""
    environ = {name: value for name, value in os.environ.items() if name not in ("OVERHAUL_JOURNAL", "OVERHAUL_ENV")}
    if journal:
        environ["OVERHAUL_JOURNAL"] = str(cwd / "journal.sqlite")
    program = ["-m", "invoke", "--search-root", str(ROOT)] if invoke else ["-m", "overhaul"]
    return subprocess.run([sys.executable, *program, *args], cwd=cwd, env={**environ, **(env or {})},
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)


@pytest.fixture
def project(lab, tmp_path) -> Path:
    """A project whose hosts/ is the lab's inventory folder, with a deep subfolder to run from."""
    root = tmp_path / "project"
    (root / "docs" / "notes").mkdir(parents=True)
    (root / "hosts").symlink_to(lab.inventory.parent, target_is_directory=True)
    return root


def test_the_root_is_the_nearest_folder_with_hosts_or_overhaul_yaml(tmp_path):
    (tmp_path / "a" / "hosts").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    assert find_project_root(tmp_path / "a" / "b" / "c") == (tmp_path / "a").resolve()
    write(tmp_path / "a" / "b" / "overhaul.yaml", "default_env: staging\n")
    assert find_project_root(tmp_path / "a" / "b" / "c") == (tmp_path / "a" / "b").resolve()
    assert find_project_root(tmp_path) is None  # a folder with neither marker above it
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert find_project_root(outside) is None, "the test's temporary folder must be outside any project"
    with pytest.raises(NoProject, match=f"no hosts/ folder nor overhaul.yaml in {outside}, {tmp_path}"):
        project_root(outside)


def test_setting_the_default_environment_keeps_the_files_text_and_never_replaces_one(tmp_path):
    assert set_default_environment(tmp_path, "lab")
    assert "default_env: lab\n" in (tmp_path / "overhaul.yaml").read_text()
    write(tmp_path / "overhaul.yaml", "# ours\nstate: sqlite")
    assert set_default_environment(tmp_path, "lab")
    assert (tmp_path / "overhaul.yaml").read_text() == "# ours\nstate: sqlite\ndefault_env: lab\n"
    assert not set_default_environment(tmp_path, "production")  # one is set: it stays
    assert (tmp_path / "overhaul.yaml").read_text().count("default_env") == 1


def test_from_a_subfolder_commands_find_the_projects_hosts_and_journal(lab, project):
    deep = project / "docs" / "notes"
    verified = command(deep, "verify", "--env", "lab", "--no-checks")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    journal = project / ".overhaul" / "journal.sqlite"
    assert journal.is_file() and not (deep / ".overhaul").exists()
    shown = command(deep, "history", "--all")
    assert shown.returncode == 0 and " verify " in shown.stdout and "lab" in shown.stdout, shown.stdout + shown.stderr


def test_outside_any_project_a_command_says_where_it_looked_and_creates_nothing(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert find_project_root(outside) is None, "the test's temporary folder must be outside any project"
    for args in (("history",), ("verify", "--env", "lab"), ("show", "last"), ("inventory", "--env", "lab")):
        proc = command(outside, *args)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert f"no Overhaul project here: no hosts/ folder nor overhaul.yaml in {outside}, {tmp_path}" in proc.stderr
        assert list(outside.iterdir()) == [], args


def test_without_env_the_default_environment_is_taken_and_said(lab, project):
    deep = project / "docs" / "notes"
    none = command(deep, "verify", "--no-checks")
    assert none.returncode == 2
    assert "--env is required: no default environment is set (set one with `default_env: NAME` in overhaul.yaml, " \
           "or OVERHAUL_ENV=NAME)" in none.stderr
    from_env = command(deep, "verify", "--no-checks", env={"OVERHAUL_ENV": "lab"})
    assert from_env.returncode == 0, from_env.stdout + from_env.stderr
    assert "environment: lab (from OVERHAUL_ENV; --env chooses another)" in from_env.stderr
    write(project / "overhaul.yaml", "default_env: lab\n")
    for proc in (command(deep, "verify", "--no-checks"), command(deep, "verify", "--no-checks", invoke=True)):
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"environment: lab (from default_env in {project.resolve() / 'overhaul.yaml'}" in proc.stderr
    planned = command(deep, "plan", "upgrade", "--version", "1.1.0")
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert "1.0.0 -> 1.1.0" in planned.stdout


def test_plan_takes_version_and_upgrade_takes_p_as_everywhere(lab, tmp_path):
    hosts = ("--hosts-dir", str(lab.inventory.parent))
    both = command(tmp_path, "plan", "upgrade", "--env", "lab", "--version", "1.1.0", "-p", "version=1.2.0", *hosts,
                   journal=True)
    assert both.returncode == 2 and "--version 1.1.0 and -p version=1.2.0: give one" in both.stderr
    via_p = command(tmp_path, "upgrade", "--env", "lab", "-p", "version=1.1.0", "--check", *hosts, journal=True)
    assert via_p.returncode == 0, via_p.stdout + via_p.stderr
    assert "1.0.0 -> 1.1.0" in via_p.stdout and "nothing was changed" in via_p.stdout
    unknown = command(tmp_path, "verify", "--env", "lab", "--dry-run", *hosts, journal=True)
    assert unknown.returncode == 2
    assert "`overhaul plan RUNBOOK` shows what a run would change, changing nothing; see `overhaul verify --help`" \
        in unknown.stderr


def test_a_limit_that_matches_nothing_lists_the_roles_that_exist(lab, tmp_path):
    proc = command(tmp_path, "plan", "verify", "--env", "lab", "--limit", "role:nosuch", "--hosts-dir",
                   str(lab.inventory.parent), journal=True)
    assert proc.returncode == 2
    assert "(hosts: db1, worker1, app1, app2; roles: role:app, role:db, role:worker)" in proc.stderr, proc.stderr
