"""Environment policy: a protected environment needs confirmation; a promoted one takes only versions
that passed on its source environment first."""

from __future__ import annotations

import re

from helpers import overhaul_cli as overhaul
from helpers import write


def test_production_takes_only_versions_that_passed_on_its_source(fresh_lab, tmp_path):
    lab = fresh_lab(3)
    hosts = lab.inventory.parent
    # "production": the same hosts under another name, protected, promoted from the lab environment.
    text = lab.inventory.read_text().replace("environment: lab", "environment: production")
    write(hosts / "production.yaml", text + "policy: {protected: true, promotion_from: lab}\n")
    common = ("--hosts-dir", str(hosts))

    early = overhaul(tmp_path, "upgrade", "--env", "production", "--version", "1.1.0", "--yes", *common)
    assert early.returncode == 3  # refused by policy, before anything connects
    assert "refused: version 1.1.0 has not passed on 'lab' yet" in early.stderr
    assert lab.host("db1").exec("dpkg-query -W -f '${Version}' scalr-server").stdout == "1.0.0"  # untouched

    assert overhaul(tmp_path, "upgrade", "--env", "lab", "--version", "1.1.0", "--yes", *common).returncode == 0

    unconfirmed = overhaul(tmp_path, "upgrade", "--env", "production", "--version", "1.1.0", *common)
    assert unconfirmed.returncode == 3 and "is protected: review the above, then run with --yes" in unconfirmed.stderr
    other = overhaul(tmp_path, "upgrade", "--env", "production", "--version", "1.2.0", "--yes", *common)
    assert other.returncode == 3 and "version 1.2.0 has not passed on 'lab' yet" in other.stderr
    promoted = overhaul(tmp_path, "upgrade", "--env", "production", "--version", "1.1.0", "--yes", *common)
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    assert re.search(r"^run \S+ succeeded in ", promoted.stdout, re.M)
