"""The example inventories in hosts/ load: an operator who copies one starts from a file Overhaul accepts."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from overhaul.cli import file_schemas
from overhaul.config import load_document
from overhaul.inventory import Inventory, load_inventory_file
from overhaul.sources import source_class
from overhaul.step import Registry
from overhaul.stepdocs import reference
from overhaul.synthetic.registry import provider_class

HOSTS = Path(__file__).resolve().parent.parent / "hosts"


def test_the_production_example_loads_with_its_files_in_place(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    ssh = tmp_path / ".ssh"
    ssh.mkdir(mode=0o700)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / "overhaul_production")], check=True)
    (ssh / "known_hosts_production").write_text("")
    password = tmp_path / ".config/overhaul/production-sudo.password"
    password.parent.mkdir(parents=True)
    password.write_text("not-a-real-password\n")
    password.chmod(0o600)
    inventory = load_inventory_file(HOSTS / "production.example.yaml")
    assert inventory.environment == "production"
    assert [(h.name, h.roles) for h in inventory.hosts] == [("db1", ["db"]), ("worker1", ["worker"]), ("app1", ["app"]),
                                                           ("app2", ["app"])]
    assert inventory.policy.protected and inventory.policy.promotion_from == "staging"
    assert inventory.ssh.sudo and inventory.ssh.bastion is not None
    assert inventory.ssh.key_file == ssh / "overhaul_production"


def test_the_staging_example_is_valid_for_its_source_and_its_synthetic_farm():
    document = load_document(HOSTS / "staging.example.yaml")
    inventory = document.validate(Inventory)
    assert inventory.source is not None and inventory.synthetic is not None
    source = source_class(inventory.source.provider).model_validate(inventory.source.model_extra or {})
    assert source.filters == {"env": "staging"}
    assert provider_class(inventory.synthetic.provider).__name__ == "EC2Provider"
    assert set(inventory.synthetic.roles) == {"db", "app"} and inventory.synthetic.image


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_the_systemd_units_in_the_docs_are_valid(tmp_path):
    """`systemd-analyze verify` finds nothing to say (no error, no warning) on the units as documented."""
    units = Path(__file__).resolve().parent.parent / "docs" / "systemd"
    for unit in units.iterdir():  # instantiated for "production", its program replaced by one that exists here
        text = unit.read_text().replace("/srv/overhaul/.venv/bin/overhaul", "/bin/true").replace("/srv/overhaul", "/")
        (tmp_path / unit.name.replace("@.", "@production.")).write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, sorted(tmp_path.iterdir()))],
                          capture_output=True, text=True)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")
    service = (units / "overhaul-synthetic@.service").read_text().splitlines()
    assert "TimeoutStartSec=3h" in service and not [line for line in service if line.startswith("RuntimeMaxSec=")]
    assert "EnvironmentFile=-/etc/overhaul/synthetic-%i.env" in service


def test_the_runbook_schema_flags_a_misspelt_step_parameter():
    import jsonschema
    import yaml

    schemas = file_schemas(Registry())
    assert schemas["runbook"]["$schema"].endswith("2020-12/schema") and schemas["inventory"]["$id"]
    validator = jsonschema.Draft202012Validator(schemas["runbook"])
    upgrade = yaml.safe_load((HOSTS.parent / "runbooks" / "upgrade.yaml").read_text())
    assert not list(validator.iter_errors(upgrade))  # the built-in runbook, ${references} and all
    upgrade["stages"][0]["params"]["labl"] = upgrade["stages"][0]["params"].pop("label")
    [error] = validator.iter_errors(upgrade)
    assert "'labl' was unexpected" in error.message and list(error.path) == ["stages", 0, "params"]


def test_the_built_in_steps_reference_is_generated_from_the_code():
    page = (HOSTS.parent / "docs" / "steps.md").read_text()
    assert page == reference(Registry()), "docs/steps.md is stale: python -m overhaul.stepdocs > docs/steps.md"
    assert "## `mysql.backup`" in page and "| `label` | `str` | `'backup'` |" in page


def test_the_step_example_in_the_docs_works_on_a_real_host(lab, tmp_path):
    """The `local.touch` example of docs/concepts.md, as printed there, in a steps/ folder, run twice on the lab."""
    from helpers import overhaul_cli, write

    text = (HOSTS.parent / "docs" / "concepts.md").read_text()
    code = "# steps/touch.py" + text.split("```python\n# steps/touch.py", 1)[1].split("```", 1)[0]
    write(tmp_path / "steps" / "touch.py", code)
    path = "/tmp/overhaul docs; example"  # a space and a `;`: quoted, it stays one path
    write(tmp_path / "runbooks" / "touch.yaml", f"""
        name: touch
        stages:
          - {{name: touch, step: local.touch, hosts: [app1], params: {{path: "{path}"}}}}
    """)
    lab.host("app1").exec("rm -f '/tmp/overhaul docs; example' /tmp/overhaul")
    common = ("--env", "lab", "--hosts-dir", str(lab.inventory.parent), "--steps-dir", str(tmp_path / "steps"),
              "--runbooks-dir", str(tmp_path / "runbooks"))
    try:
        first = overhaul_cli(tmp_path, "run", "touch", *common)
        assert first.returncode == 0, first.stdout + first.stderr
        assert lab.host("app1").exec("test -f '/tmp/overhaul docs; example'", check=False).returncode == 0
        assert lab.host("app1").exec("test -e /tmp/overhaul", check=False).returncode != 0
        second = overhaul_cli(tmp_path, "run", "touch", *common)
        assert "0 changed" in second.stdout.splitlines()[-1], second.stdout  # idempotent: the check finds it done
    finally:
        lab.host("app1").exec("rm -f '/tmp/overhaul docs; example'")
