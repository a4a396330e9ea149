"""`make dist` builds a wheel that carries what an installed Overhaul needs, and the Quickstart works with it:
installed in a fresh virtualenv outside the checkout, from a project folder with no checkout file, on real hosts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import PROCESS_OCTET

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = (ROOT / "docs" / "quickstart.md").read_text()
# The Quickstart's farm's addresses, and those of the lab hosts that stand for it in the test (db1, worker1, app1 on
# the lab's own subnet, 127.27.P).
LAB_SUBNET = f"127.27.{PROCESS_OCTET}"
STAND_IN = {"10.0.1.10": f"{LAB_SUBNET}.1", "10.0.1.20": f"{LAB_SUBNET}.2", "10.0.1.30": f"{LAB_SUBNET}.3"}


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make dist` into a folder named dist/ of the test's own (the checkout's dist/ is left alone)."""
    out = tmp_path_factory.mktemp("build") / "dist"
    venv = Path(sys.prefix)  # the virtualenv the tests run in
    made = subprocess.run(["make", "-C", str(ROOT), f"VENV={venv}", f"DIST={out}", "dist"], capture_output=True,
                          text=True, timeout=600)
    assert made.returncode == 0, made.stdout + made.stderr
    return out


def test_make_dist_builds_a_wheel_and_an_sdist_that_carry_steps_runbooks_and_the_lab(dist, tmp_path):
    [wheel] = dist.glob("overhaul-*-py3-none-any.whl")
    [sdist] = dist.glob("overhaul-*.tar.gz")
    assert wheel.name.removesuffix("-py3-none-any.whl") == sdist.name.removesuffix(".tar.gz")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("overhaul/steps/mysql.py", "overhaul/steps/shell.py", "overhaul/runbooks/upgrade.yaml",
                     "overhaul/runbooks/verify.yaml", "overhaul/lab/fixture/bin/scalr-server-ctl",
                     "overhaul/lab/fixture/init.d/scalr", "overhaul/lab/fixture/migrations/1.1.0.sql",
                     "overhaul/synthetic/run.py", "overhaul/state/sqlite.py", "overhaul/sources/ec2.py"):
        assert expected in names, expected
    [entry_points] = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "overhaul = overhaul.cli:program.run" in text
    assert "mysql.backup = overhaul.steps.mysql:MysqlBackup" in text
    assert "aws-ec2 = overhaul.sources.ec2:Ec2Source" in text  # dynamic inventories are found through it
    assert "overhaul = overhaul.pytest_plugin" in text
    # Installed on its own (no source tree on the path), the package finds its built-in steps and runbooks.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    probe = ("import overhaul, overhaul.step as s, overhaul.runbook as r; "
             f"assert overhaul.__file__.startswith({str(target)!r}), overhaul.__file__; "
             "print(sorted(s.Registry().names())); print(r.load_runbook('upgrade').path)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "'mysql.backup'" in out.stdout and "'shell'" in out.stdout
    assert out.stdout.strip().endswith("overhaul/runbooks/upgrade.yaml") and str(target) in out.stdout


def block(language: str, first_line: str) -> str:
    """The Quickstart's code block in `language` whose first line starts with `first_line`."""
    [found] = [text.split("```", 1)[0] for text in QUICKSTART.split(f"```{language}\n")[1:]
               if text.startswith(first_line)]
    return found


def words(text: str) -> str:
    """`text` with every run of blanks made one space (the doc's columns need not be the terminal's)."""
    return " ".join(text.split())


def shown(*commands: str) -> list[str]:
    """The Quickstart's `text` block right after the sh block of `commands`, less its `...` lines."""
    after = QUICKSTART.split("```sh\n" + "\n".join(commands) + "\n```\n", 1)[1]
    output = after.split("```text\n", 1)[1].split("```", 1)[0]
    return [line for line in output.splitlines() if line.strip() not in ("", "...")]


def test_the_quickstart_from_a_built_wheel_to_a_first_plan_of_real_hosts(dist, tmp_path):
    """Each command of the Quickstart, as written there, from `pip install` of the wheel `make dist` built to a
    first plan, run in a home and a project folder of the test's own (no checkout file in them) against lab hosts
    standing for the farm; each output line the Quickstart shows is printed (the lab's addresses read as the
    farm's). Only the key is not made: the lab's hosts take the lab's key, copied to where the Quickstart puts its
    own, and the backup password is the lab's."""
    home = tmp_path / "home"
    home.mkdir()
    checkout_like = dist.parent  # holds dist/: the folder the Quickstart's `pip install dist/...` runs in
    # The farm's commands see no test setting: their journal goes where a user's would (~/farm/.overhaul/).
    user = {k: v for k, v in os.environ.items() if not k.startswith("OVERHAUL_")} | {"HOME": str(home)}

    def sh(command: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
        for farm_address, lab_address in STAND_IN.items():
            command = command.replace(farm_address, lab_address)
        environ = user | {"PATH": f"{home}/overhaul/bin:{os.environ['PATH']}"}
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=cwd, env=environ, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"
        for farm_address, lab_address in STAND_IN.items():
            done.stdout = done.stdout.replace(lab_address, farm_address)
        done.stdout = done.stdout.replace(str(home), "/root")
        return done

    install = "python3 -m venv ~/overhaul && ~/overhaul/bin/pip install dist/overhaul-*.whl"
    assert install in QUICKSTART
    sh(install, checkout_like, timeout=600)
    assert sh("overhaul --version", tmp_path).stdout.startswith("overhaul ")

    lab_project = tmp_path / "lab"  # the farm: a lab started by the installed package, in a project of its own
    lab_project.mkdir()
    up = subprocess.run([str(home / "overhaul/bin/overhaul"), "lab.up", "--hosts", "3", "--subnet", LAB_SUBNET],
                        cwd=lab_project, env={k: v for k, v in os.environ.items() if not k.startswith("OVERHAUL_")},
                        capture_output=True, text=True, timeout=600)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert sh("mkdir -p ~/farm/hosts && cd ~/farm", tmp_path).returncode == 0
        farm = home / "farm"
        access = block("sh", "install -d -m 700 ~/.ssh").splitlines()
        assert access[1].startswith("ssh-keygen -t ed25519 -N '' -f ~/.ssh/overhaul ")
        sh(access[0], farm)
        shutil.copy(lab_project / ".overhaul/lab/id_ed25519", home / ".ssh/overhaul")  # in place of access[1]
        for line in access[2:]:
            sh(re.sub(r"\s+# .*", "", line), farm)
        (home / ".config/overhaul/mysql-backup.password").write_text(
            (lab_project / ".overhaul/lab/secrets/mysql-backup.password").read_text())
        assert len((home / ".ssh/known_hosts_overhaul").read_text().splitlines()) >= 3  # ssh-keyscan found them

        inventory = block("yaml", "# hosts/production.yaml")
        for farm_address, lab_address in STAND_IN.items():
            inventory = inventory.replace(farm_address, lab_address)
        (farm / "hosts/production.yaml").write_text(inventory)

        for commands in (["overhaul inventory --env production"], ["overhaul verify --env production"],
                         ["overhaul plan upgrade --env production -p version=1.1.0"]):
            printed = words(sh("\n".join(commands), farm).stdout)
            expected = shown(*commands)
            assert expected, commands
            for line in expected:
                assert words(line) in printed, f"{commands}: {line!r} not in:\n{printed}"
        assert (farm / ".overhaul").is_dir() and not (farm / "hosts/lab.yaml").exists()  # the farm's own journal
    finally:
        down = subprocess.run([str(home / "overhaul/bin/overhaul"), "lab.down"], cwd=lab_project, capture_output=True,
                              text=True, timeout=300)
        assert down.returncode == 0, down.stdout + down.stderr
