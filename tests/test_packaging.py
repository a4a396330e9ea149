"""The wheel carries what an installed Overhaul needs: steps, runbooks, the lab fixture, entry points."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_installs_steps_runbooks_and_the_lab_inside_the_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    [wheel] = tmp_path.glob("overhaul-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("overhaul/steps/mysql.py", "overhaul/steps/shell.py", "overhaul/runbooks/upgrade.yaml",
                     "overhaul/runbooks/verify.yaml", "overhaul/lab/fixture/bin/scalr-server-ctl",
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
