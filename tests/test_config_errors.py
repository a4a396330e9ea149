"""Bad inventories and runbooks: each gives its own error naming file, line and field, and no traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from overhaul.errors import ConfigError
from overhaul.inventory import load_inventory
from overhaul.plan import build_plan
from overhaul.runbook import load_runbook
from overhaul.step import Registry

INVENTORY = """\
environment: staging
ssh:
  user: root
  key_file: id_test
  known_hosts: known_hosts
hosts:
  - name: db1
    address: 127.0.0.1
    roles: [db]
  - name: app1
    address: 127.0.0.2
    roles: [app]
"""


def write_private_key(path: Path, passphrase: bytes | None = None) -> Path:
    """A real ed25519 private key in OpenSSH format, mode 0600 (as ssh-keygen writes it)."""
    encryption = serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    key = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                     encryption)
    path.touch(mode=0o600)
    path.write_bytes(key)
    return path


def make_hosts_dir(tmp_path: Path) -> Path:
    """tmp_path/hosts with the key file and known_hosts that INVENTORY names."""
    folder = tmp_path / "hosts"
    folder.mkdir()
    write_private_key(folder / "id_test")  # loading parses the key: it must be a real one, private to its owner
    (folder / "known_hosts").write_text("")
    return folder


@pytest.fixture
def hosts_dir(tmp_path: Path) -> Path:
    return make_hosts_dir(tmp_path)


def inventory_error(hosts_dir: Path, text: str) -> str:
    (hosts_dir / "staging.yaml").write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError) as caught:
        load_inventory("staging", hosts_dir)
    return str(caught.value)


INVENTORY_CASES = [
    ("not yaml", "environment: staging\nhosts: [\n", "staging.yaml:3: not valid YAML"),
    ("empty file", "", "staging.yaml:1: the file is empty"),
    ("no environment", INVENTORY.replace("environment: staging\n", ""), "staging.yaml:1: environment: Field required"),
    ("no hosts", INVENTORY.split("\nhosts:")[0] + "\n",
     "staging.yaml:1: hosts: no hosts: list at least one, or find them with `source:`"),
    ("empty hosts", INVENTORY.split("\nhosts:")[0] + "\n" + "hosts: []\n", "staging.yaml:6: hosts: no hosts: list at least one"),
    ("host without address", INVENTORY.replace("    address: 127.0.0.2\n", ""),
     "staging.yaml:10: hosts[1].address: Field required"),
    ("port out of range", INVENTORY.replace("    roles: [db]\n", "    roles: [db]\n    port: 70000\n"),
     "staging.yaml:10: hosts[0].port: Input should be less than or equal to 65535"),
    ("misspelt field", INVENTORY.replace("    address: 127.0.0.1", "    adress: 127.0.0.1"),
     "staging.yaml:8: hosts[0].adress: Extra inputs are not permitted"),
    ("host without roles", INVENTORY.replace("    roles: [app]\n", ""), "staging.yaml:10: hosts[1].roles: Field required"),
    ("duplicate host name", INVENTORY.replace("name: app1", "name: db1"),
     "staging.yaml:10: hosts[1].name: duplicate host name 'db1'"),
    ("duplicate address", INVENTORY.replace("127.0.0.2", "127.0.0.1"),
     "staging.yaml:11: hosts[1].address: duplicate address 127.0.0.1:22"),
    ("secret with two sources", INVENTORY + "secrets:\n  db: {env: DBPW, file: pw.txt}\n",
     "staging.yaml:14: secrets.db: a secret needs exactly one of env, file, ssm, aws_secret"),
    ("missing key file", INVENTORY.replace("key_file: id_test", "key_file: id_missing"),
     "staging.yaml:4: ssh.key_file: "),
    ("environment differs from file name", INVENTORY.replace("environment: staging", "environment: production"),
     "staging.yaml:1: environment: the file is staging.yaml but says 'production' (expected 'staging')"),
    ("duplicate yaml key", INVENTORY.replace("  user: root\n", "  user: root\n  user: admin\n"),
     "staging.yaml:4: ssh.user: duplicate key (first on line 3)"),
    ("role_vars for an unknown role", INVENTORY + "role_vars:\n  cache: {size: 1}\n",
     "staging.yaml:14: role_vars.cache: no host has role 'cache'"),
    ("address with a space", INVENTORY.replace("127.0.0.2", "app one"),
     "staging.yaml:11: hosts[1].address: expected an IP address or a host name"),
    ("negative connect timeout", INVENTORY.replace("  user: root\n", "  user: root\n  connect_timeout: -1\n"),
     "staging.yaml:4: ssh.connect_timeout: Input should be greater than 0"),
    ("bastion without address", INVENTORY.replace("  user: root\n", "  user: root\n  bastion: {port: 22}\n"),
     "staging.yaml:4: ssh.bastion.address: Field required"),
    ("hosts is a mapping", INVENTORY.split("\nhosts:")[0] + "\n" + "hosts:\n  db1: 127.0.0.1\n",
     "staging.yaml:6: hosts: Input should be a valid list"),
    # YAML coerces; the inventory does not: `port: true` is no port 1, `port: "22"` no port 22.
    ("port is a boolean", INVENTORY.replace("    roles: [db]\n", "    roles: [db]\n    port: true\n"),
     "staging.yaml:10: hosts[0].port: Input should be a valid integer (got True)"),
    ("port is a string", INVENTORY.replace("  user: root\n", "  user: root\n  port: '22'\n"),
     "staging.yaml:4: ssh.port: Input should be a valid integer (got '22')"),
    ("bastion port is a string", INVENTORY.replace("  user: root\n", "  user: root\n  bastion: {address: jump1, port: '22'}\n"),
     "staging.yaml:4: ssh.bastion.port: Input should be a valid integer (got '22')"),
    ("sudo is a string", INVENTORY.replace("  user: root\n", "  user: root\n  sudo: 'no'\n"),
     "staging.yaml:4: ssh.sudo: Input should be a valid boolean (got 'no')"),
    ("empty user", INVENTORY.replace("  user: root", "  user: ''"),
     "staging.yaml:3: ssh.user: expected a login name: letters, digits, '_', '.', '-' or '@', not empty"),
    ("empty host user", INVENTORY.replace("    roles: [app]\n", "    roles: [app]\n    user: ''\n"),
     "staging.yaml:13: hosts[1].user: expected a login name"),
    ("address with shell characters", INVENTORY.replace("127.0.0.2", "'app1;touch /tmp/owned'"),
     "staging.yaml:11: hosts[1].address: expected an IP address or a host name (RFC 1123"),
    ("address with a command substitution", INVENTORY.replace("127.0.0.2", "'$(reboot)'"),
     "staging.yaml:11: hosts[1].address: expected an IP address or a host name"),
    ("address starting with a dash", INVENTORY.replace("127.0.0.2", "-oProxyCommand=x"),
     "staging.yaml:11: hosts[1].address: expected an IP address or a host name"),
    ("bastion address with shell characters",
     INVENTORY.replace("  user: root\n", "  user: root\n  bastion: {address: 'a`id`'}\n"),
     "staging.yaml:4: ssh.bastion.address: expected an IP address or a host name"),
]


@pytest.mark.parametrize("text, expected", [case[1:] for case in INVENTORY_CASES], ids=[c[0] for c in INVENTORY_CASES])
def test_bad_inventory_names_file_line_and_field(hosts_dir, text, expected):
    assert expected in inventory_error(hosts_dir, text)


def test_unknown_environment_lists_the_known_ones(hosts_dir):
    (hosts_dir / "staging.yaml").write_text(INVENTORY)
    (hosts_dir / "dev.yaml").write_text(INVENTORY.replace("staging", "dev"))
    with pytest.raises(ConfigError, match=r"unknown environment 'prod'.*\(environments: dev, staging\)"):
        load_inventory("prod", hosts_dir)


RUNBOOK = """\
name: test
params:
  version: null
stages:
  - name: one
    step: shell
    roles: [db]
    params:
      command: echo ${version}
"""

RUNBOOK_CASES = [
    ("stage without step", RUNBOOK.replace("    step: shell\n", ""), "runbook.yaml:5: stages[0].step: Field required"),
    ("unknown step", RUNBOOK.replace("step: shell", "step: shel"),
     "runbook.yaml:6: stages[0].step: unknown step 'shel': did you mean 'shell'?"),
    ("unknown role", RUNBOOK.replace("roles: [db]", "roles: [dbb]"),
     "runbook.yaml:7: stages[0].roles: 'dbb' is not in the inventory of 'staging' (known: app, db)"),
    ("rolling without batch", RUNBOOK.replace("    roles: [db]\n", "    roles: [db]\n    strategy: rolling\n"),
     "runbook.yaml:5: stages[0]: strategy 'rolling' needs `batch`"),
    ("batch over 100%", RUNBOOK.replace("    roles: [db]\n", "    roles: [db]\n    strategy: rolling\n    batch: 150%\n"),
     "runbook.yaml:9: stages[0].batch: expected a number or a percentage like '25%', got '150%'"),
    ("step params missing", RUNBOOK.replace("      command: echo ${version}\n", "      creates: /tmp/x\n"),
     "runbook.yaml:8: stages[0].params.command: Field required (step 'shell')"),
    ("misspelt step param", RUNBOOK.replace("      command:", "      comand:"),
     "runbook.yaml:9: stages[0].params.comand: Extra inputs are not permitted (step 'shell')"),
    ("unknown reference", RUNBOOK.replace("${version}", "${versoin}"),
     "runbook.yaml:8: stages[0].params: unknown reference ${versoin} for host db1"),
    ("bad on_failure", RUNBOOK.replace("    roles: [db]\n", "    roles: [db]\n    on_failure: ignore\n"),
     "runbook.yaml:8: stages[0].on_failure: Input should be 'stop' or 'continue'"),
    ("duplicate stage names", RUNBOOK + "  - name: one\n    step: shell\n    params: {command: 'true'}\n",
     "runbook.yaml:10: stages[1].name: another stage is named 'one' (stages[0])"),
    ("negative max_failures", RUNBOOK.replace("    roles: [db]\n", "    roles: [db]\n    max_failures: -1\n"),
     "runbook.yaml:8: stages[0].max_failures: expected 0 or more"),
    ("no stages", RUNBOOK.split("stages:")[0] + "stages: []\n", "runbook.yaml:4: stages: List should have at least 1"),
    ("unknown excluded host", RUNBOOK.replace("    roles: [db]\n", "    roles: [db]\n    exclude: [db9]\n"),
     "runbook.yaml:8: stages[0].exclude: 'db9' is not in the inventory"),
    ("roles and hosts together", RUNBOOK.replace("    roles: [db]\n", "    roles: [db]\n    hosts: [db1]\n"),
     "runbook.yaml:5: stages[0]: select hosts by `roles` or by `hosts`, not both"),
]


@pytest.mark.parametrize("text, expected", [case[1:] for case in RUNBOOK_CASES], ids=[c[0] for c in RUNBOOK_CASES])
def test_bad_runbook_names_file_line_and_field(hosts_dir, tmp_path, text, expected):
    (hosts_dir / "staging.yaml").write_text(INVENTORY)
    inventory = load_inventory("staging", hosts_dir)
    path = tmp_path / "runbook.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        build_plan(load_runbook(str(path)), inventory, Registry(), {"version": "1.1.0"})
    assert expected in str(caught.value)


def test_a_required_run_parameter_must_be_given(hosts_dir, tmp_path):
    (hosts_dir / "staging.yaml").write_text(INVENTORY)
    path = tmp_path / "runbook.yaml"
    path.write_text(RUNBOOK)
    with pytest.raises(ConfigError, match=r"runbook.yaml:3: params.version: required: give it with --param version=VALUE"):
        build_plan(load_runbook(str(path)), load_inventory("staging", hosts_dir), Registry(), {})


def test_the_command_line_prints_the_error_without_a_traceback(hosts_dir, tmp_path):
    (hosts_dir / "staging.yaml").write_text(INVENTORY.replace("    address: 127.0.0.2\n", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "overhaul", "inventory", "--env", "staging", "--hosts-dir", str(hosts_dir)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "staging.yaml:10: hosts[1].address: Field required" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
