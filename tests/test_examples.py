"""The example inventories in hosts/ load: an operator who copies one starts from a file Overhaul accepts."""

from __future__ import annotations

import shutil
import subprocess
import sys
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


def fenced(page: str, language: str) -> list[str]:
    """The code blocks of a docs page written in `language`, in order."""
    text = (HOSTS.parent / "docs" / page).read_text()
    return [block.split("```", 1)[0] for block in text.split(f"```{language}\n")[1:]]


def test_the_step_example_in_the_docs_works_on_a_real_host(lab, tmp_path):
    """The `local.touch` step and runbook of docs/writing-steps.md, as printed there, run on the lab: a path that
    needs quoting stays one path, a second run changes nothing, a folder that is not there is refused at preflight."""
    from helpers import overhaul_cli, write

    [code] = [block for block in fenced("writing-steps.md", "python") if block.startswith("# steps/touch.py")]
    [runbook] = [block for block in fenced("writing-steps.md", "yaml") if block.startswith("# runbooks/touch.yaml")]
    write(tmp_path / "steps" / "touch.py", code)
    write(tmp_path / "runbooks" / "touch.yaml", runbook)
    path = "/tmp/overhaul docs; example"  # a space and a `;`: quoted, it stays one path
    lab.host("app1").exec("rm -f '/tmp/overhaul docs; example' /tmp/overhaul")
    common = ("--env", "lab", "--limit", "app1", "--hosts-dir", str(lab.inventory.parent),
              "--steps-dir", str(tmp_path / "steps"), "--runbooks-dir", str(tmp_path / "runbooks"))
    try:
        first = overhaul_cli(tmp_path, "run", "touch", "--param", f"path={path}", *common)
        assert first.returncode == 0, first.stdout + first.stderr
        assert lab.host("app1").exec("test -f '/tmp/overhaul docs; example'", check=False).returncode == 0
        assert lab.host("app1").exec("test -e /tmp/overhaul", check=False).returncode != 0
        second = overhaul_cli(tmp_path, "run", "touch", "--param", f"path={path}", *common)
        assert "0 changed" in second.stdout.splitlines()[-1], second.stdout  # idempotent: the check finds it done
        refused = overhaul_cli(tmp_path, "run", "touch", "--param", "path=/no/such/folder/marker", *common)
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert "refused: app1: stage 1 touch marker: /no/such/folder is not a writable folder" in refused.stdout + \
            refused.stderr
        relative = overhaul_cli(tmp_path, "run", "touch", "--param", "path=marker", *common)
        assert relative.returncode == 2 and "path" in relative.stderr, relative.stdout + relative.stderr
    finally:
        lab.host("app1").exec("rm -f '/tmp/overhaul docs; example'")


def test_the_step_example_registers_through_the_entry_point_group_overhaul_reads():
    """The pyproject.toml snippet of docs/writing-steps.md names the group the registry reads, and the step's class."""
    import tomllib

    from overhaul.step import ENTRY_POINT_GROUP

    [toml] = fenced("writing-steps.md", "toml")
    entries = tomllib.loads(toml)["project"]["entry-points"]
    assert entries == {ENTRY_POINT_GROUP: {"local.touch": "mysteps.touch:Touch"}}
    [code] = [block for block in fenced("writing-steps.md", "python") if block.startswith("# steps/touch.py")]
    assert "class Touch(Step[TouchParams]):" in code and 'name = "local.touch"' in code


def test_every_inventory_example_in_the_docs_is_valid(tmp_path):
    """Each YAML block of docs/inventories.md is a whole inventory that Overhaul's own validation accepts: every
    field the page shows is real, and each `source:` is valid for its plug-in (its hosts are not looked up)."""
    from helpers import write

    blocks = fenced("inventories.md", "yaml")
    assert len(blocks) == 11
    for index, block in enumerate(blocks):
        document = load_document(write(tmp_path / f"example{index}.yaml", block))
        inventory = document.validate(Inventory)
        problems = inventory.conflicts()
        if inventory.source is not None:
            source_class(inventory.source.provider).model_validate(inventory.source.model_extra or {})
            problems.remove((("hosts",), "no hosts: list at least one, or find them with `source:`"))
        assert problems == [], f"block {index}:\n{block}"
    assert blocks[-1].startswith("# yaml-language-server: $schema=../schemas/inventory.schema.json\n")


def test_the_inventory_and_runbook_references_in_the_concepts_page_are_valid(tmp_path):
    """docs/concepts.md shows every inventory and runbook field in one example each: both load as printed."""
    from helpers import write

    from overhaul.runbook import Runbook

    inventory, runbook = fenced("concepts.md", "yaml")[:2]
    assert not load_document(write(tmp_path / "production.yaml", inventory)).validate(Inventory).conflicts()
    assert not load_document(write(tmp_path / "upgrade.yaml", runbook)).validate(Runbook).conflicts()


def test_the_step_test_in_the_docs_passes_on_the_fake_host(tmp_path, monkeypatch):
    """The `overhaul.testing` example of docs/writing-steps.md, as printed there, runs and passes against the page's
    own `local.touch` step."""
    [code] = [block for block in fenced("writing-steps.md", "python") if block.startswith("# steps/touch.py")]
    [test] = [block for block in fenced("writing-steps.md", "python") if block.startswith("# tests/test_touch.py")]
    (tmp_path / "steps").mkdir()
    (tmp_path / "steps/__init__.py").write_text("")  # (a package: the checkout's own steps/ must not shadow it)
    (tmp_path / "steps/touch.py").write_text(code)
    (tmp_path / "test_touch.py").write_text(test)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [name for name in sys.modules if name == "steps" or name.startswith("steps.")]:
        monkeypatch.delitem(sys.modules, name)
    code = pytest.main([str(tmp_path / "test_touch.py"), "-q", "-p", "no:cacheprovider", "-o", "addopts="])
    assert code == 0


# -- the examples validate offline: no AWS call, no file looked at ------------------------------------------------

# An AWS that cannot be reached (nothing listens on port 9), with credentials so that a call is really tried.
NO_AWS = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
          "AWS_EC2_METADATA_DISABLED": "true", "AWS_MAX_ATTEMPTS": "1"}


@pytest.mark.parametrize("example, refusal", [
    ("production.example", "overhaul_production does not exist"),  # the key file ~/.ssh/overhaul_production
    ("staging.example", "EC2 inventory source: "),  # the hosts are asked of AWS, which does not answer
])
def test_an_example_inventory_validates_offline_with_no_aws_call_and_no_file(tmp_path, example, refusal):
    """`inventory --offline` accepts each example on a machine with none of its files and no AWS; without
    --offline the same command on the same machine is refused, so what --offline leaves out is really left out."""
    from helpers import overhaul_cli

    environ = {"HOME": str(tmp_path / "home"), **NO_AWS}  # an empty home: no key, no known_hosts, no secret file
    offline = overhaul_cli(tmp_path, "inventory", "--env", example, "--offline", "--hosts-dir", str(HOSTS), env=environ)
    assert offline.returncode == 0, offline.stdout + offline.stderr
    assert offline.stdout.startswith(f"environment {example.removesuffix('.example')} (")
    online = overhaul_cli(tmp_path, "inventory", "--env", example, "--hosts-dir", str(HOSTS), env=environ)
    assert online.returncode == 2 and refusal in online.stderr, online.stdout + online.stderr


def test_inventory_shows_every_section_of_the_file(tmp_path):
    """Each top-level section (and each ssh setting) has its line, so a bastion or a webhook is never hidden."""
    from helpers import overhaul_cli

    from overhaul.inventory import SSHSettings

    proc = overhaul_cli(tmp_path, "inventory", "--env", "production.example", "--offline", "--hosts-dir", str(HOSTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    labels = [line.split(":")[0].strip() for line in lines if line.startswith("  ") and not line.startswith("   ")]
    for section in set(Inventory.model_fields) - {"environment"}:
        assert section in labels, section
    [ssh] = [line for line in lines if line.startswith("  ssh: ")]
    for setting in set(SSHSettings.model_fields) - {"known_hosts", "bastion"}:  # those two have their own lines
        assert f" {setting}=" in ssh, setting
    assert "  bastion: deploy@bastion.example.com:22 key_file=" in proc.stdout
    assert "  secrets: mysql_backup_password (env:OVERHAUL_MYSQL_BACKUP_PASSWORD)" in lines
    assert ("  notify: webhook env:OVERHAUL_PRODUCTION_WEBHOOK on start, success, failure, refusal, rollback, "
            "interrupted; metrics /var/lib/prometheus/node-exporter/overhaul.prom") in lines
    assert "  policy: protected (shows the plan and asks, or --yes); takes only versions that passed on staging" in \
        proc.stdout
    assert "  db1            db           deploy@10.0.1.10:22  vars=" in proc.stdout
    staging = overhaul_cli(tmp_path, "inventory", "--env", "staging.example", "--offline", "--hosts-dir", str(HOSTS))
    assert '  source: aws-ec2 {"filters": {"env": "staging"}, "region": "eu-west-1", "role_tag": "overhaul:role"} ' \
           "(not asked: --offline)" in staging.stdout
    [synthetic] = [line for line in staging.stdout.splitlines() if line.startswith("  synthetic: ")]
    assert '"image": "ami-0123456789abcdef0"' in synthetic and '"roles": {"app": {"count": 1}' in synthetic


def test_an_unknown_environment_lists_the_examples_apart(tmp_path):
    """An example is not an environment: `--env production` with only examples there says what to copy."""
    from helpers import overhaul_cli

    proc = overhaul_cli(tmp_path, "inventory", "--env", "production", "--hosts-dir", str(HOSTS))
    assert proc.returncode == 2
    assert (f"unknown environment 'production': there is no {HOSTS}/production.yaml (environments: none: {HOSTS}/ has "
            f"no inventory; examples to copy to {HOSTS}/NAME.yaml: production.example, staging.example)") in proc.stderr


def test_the_docs_site_opens_on_a_home_page():
    """The site's logo links to its root: docs/index.md is there, first in the navigation, and leads on."""
    import yaml

    config = yaml.safe_load((HOSTS.parent / "mkdocs.yml").read_text())
    assert list(config["nav"][0].values()) == ["index.md"]
    home = (HOSTS.parent / "docs" / "index.md").read_text()
    assert "(quickstart.md)" in home and "(troubleshooting.md)" in home
