"""Secrets and keys in an inventory: by reference only, private files, real keys; and their redaction in any encoding."""

from __future__ import annotations

import base64
import json
import urllib.parse
from pathlib import Path

import pytest
from helpers import overhaul_cli
from test_config_errors import INVENTORY, make_hosts_dir, write_private_key

from overhaul.errors import ConfigError
from overhaul.inventory import load_inventory
from overhaul.secrets import REDACTED, Redactor

SECRET = "Hunter2-s3cr3t"


@pytest.fixture
def hosts_dir(tmp_path: Path) -> Path:
    return make_hosts_dir(tmp_path)


def load_error(hosts_dir: Path, text: str) -> str:
    (hosts_dir / "staging.yaml").write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_inventory("staging", hosts_dir)
    return str(caught.value)


# -- a secret written inline is refused, and the error does not repeat it ------------------------------------------

INLINE = [
    ("in secrets", INVENTORY + f"secrets:\n  db: {SECRET}\n", "staging.yaml:14: secrets.db: a secret is given by reference"),
    ("as sudo_password", INVENTORY.replace("  user: root\n", f"  user: root\n  sudo_password: {SECRET}\n"),
     "staging.yaml:4: ssh.sudo_password: a secret is given by reference"),
    ("as the whole secrets map", INVENTORY + f"secrets: {SECRET}\n",
     "staging.yaml:13: secrets: expected a mapping of names to secret references"),
    ("as a number", INVENTORY + "secrets:\n  db: 12345678\n", "staging.yaml:14: secrets.db: a secret is given by reference"),
]


@pytest.mark.parametrize("text, expected", [case[1:] for case in INLINE], ids=[case[0] for case in INLINE])
def test_an_inline_secret_is_refused_without_echoing_it(hosts_dir, text, expected):
    message = load_error(hosts_dir, text)
    assert expected in message
    assert "never written inline" in message or "secret references" in message
    assert SECRET not in message and "12345678" not in message


# -- secret files: present at load, private to their owner ---------------------------------------------------------

def test_a_missing_secret_file_is_an_input_error_at_load_naming_secret_and_file(hosts_dir):
    message = load_error(hosts_dir, INVENTORY + "secrets:\n  db_password: {file: db.password}\n")
    assert f"staging.yaml:14: secrets.db_password: the secret file {hosts_dir / 'db.password'} does not exist" in message


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_secret_file_open_to_group_or_others_is_refused_with_the_chmod_to_run(hosts_dir, mode):
    secret = hosts_dir / "db.password"
    secret.write_text(SECRET + "\n")
    secret.chmod(mode)
    message = load_error(hosts_dir, INVENTORY + "secrets:\n  db: {file: db.password}\n")
    assert f"staging.yaml:14: secrets.db: the secret file {secret} is open to group/others (mode {mode:04o})" in message
    assert message.endswith(f"run: chmod 600 {secret}")
    assert SECRET not in message


def test_a_sudo_password_file_open_to_others_is_refused(hosts_dir):
    secret = hosts_dir / "sudo.password"
    secret.write_text(SECRET)
    secret.chmod(0o644)
    message = load_error(hosts_dir, INVENTORY.replace("  user: root\n", "  user: root\n  sudo_password: {file: sudo.password}\n"))
    assert f"staging.yaml:4: ssh.sudo_password: the secret file {secret} is open to group/others" in message
    assert f"chmod 600 {secret}" in message


def test_a_private_secret_file_loads(hosts_dir):
    secret = hosts_dir / "db.password"
    secret.touch(mode=0o600)
    secret.write_text(SECRET + "\n")
    (hosts_dir / "staging.yaml").write_text(INVENTORY + "secrets:\n  db: {file: db.password}\n")
    assert load_inventory("staging", hosts_dir).secrets["db"].resolve() == SECRET


# -- the SSH key file: a private key, private to its owner, checked at load ----------------------------------------

def test_a_key_file_open_to_group_or_others_is_refused_with_the_chmod_to_run(hosts_dir):
    key = hosts_dir / "id_test"
    key.chmod(0o644)
    message = load_error(hosts_dir, INVENTORY)
    assert f"staging.yaml:4: ssh.key_file: {key} is open to group/others (mode 0644); run: chmod 600 {key}" in message


def test_the_chmod_command_is_quoted_for_a_path_with_spaces(hosts_dir):
    key = write_private_key(hosts_dir / "my key")
    key.chmod(0o640)
    message = load_error(hosts_dir, INVENTORY.replace("key_file: id_test", "key_file: my key"))
    assert f"run: chmod 600 '{key}'" in message


NOT_KEYS = [
    ("a directory", lambda folder: (folder / "keys").mkdir(mode=0o700), "keys", "is not a regular file"),
    ("a text file", lambda folder: (folder / "notes").touch(mode=0o600) or (folder / "notes").write_text("hello\n"),
     "notes", "is not a private key"),
    ("a public key", lambda folder: (folder / "id.pub").touch(mode=0o600) or (folder / "id.pub").write_text(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test\n"), "id.pub",
     "is not a private key"),
    ("a key with a passphrase", lambda folder: write_private_key(folder / "id_locked", passphrase=b"pass phrase"),
     "id_locked", "is protected by a passphrase"),
]


@pytest.mark.parametrize("make, name, expected", [case[1:] for case in NOT_KEYS], ids=[case[0] for case in NOT_KEYS])
def test_a_key_file_that_is_no_private_key_is_an_input_error_at_load(hosts_dir, make, name, expected):
    make(hosts_dir)
    message = load_error(hosts_dir, INVENTORY.replace("key_file: id_test", f"key_file: {name}"))
    assert f"staging.yaml:4: ssh.key_file: {hosts_dir / name} {expected}" in message


def test_a_bastion_key_file_is_checked_too(hosts_dir):
    (hosts_dir / "jump_key").touch(mode=0o600)
    message = load_error(hosts_dir, INVENTORY.replace(
        "  user: root\n", "  user: root\n  bastion: {address: jump.example.internal, key_file: jump_key}\n"))
    assert f"staging.yaml:4: ssh.bastion.key_file: {hosts_dir / 'jump_key'} is not a private key" in message


def test_the_command_line_refuses_an_open_key_file_with_exit_2(hosts_dir, tmp_path):
    (hosts_dir / "staging.yaml").write_text(INVENTORY)
    (hosts_dir / "id_test").chmod(0o644)
    proc = overhaul_cli(tmp_path, "inventory", "--env", "staging", "--hosts-dir", str(hosts_dir))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"chmod 600 {hosts_dir / 'id_test'}" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


# -- redaction: the secret, and the forms it commonly takes in output ----------------------------------------------

TRICKY = 'p@ss w/rd+"ü&='  # every encoding below changes it


@pytest.mark.parametrize("encode", [
    lambda s: s,
    lambda s: base64.b64encode(s.encode()).decode(),
    lambda s: base64.b64encode(s.encode()).decode().rstrip("="),
    lambda s: base64.urlsafe_b64encode(s.encode()).decode(),
    lambda s: urllib.parse.quote(s),
    lambda s: urllib.parse.quote(s, safe=""),
    lambda s: urllib.parse.quote_plus(s),
    lambda s: json.dumps(s)[1:-1],
    lambda s: json.dumps(s, ensure_ascii=False)[1:-1],
], ids=["plain", "base64", "base64-unpadded", "base64-urlsafe", "url-quote", "url-quote-all", "url-quote-plus",
        "json", "json-unicode"])
def test_the_redactor_masks_a_secret_in_its_common_encodings(encode):
    redactor = Redactor()
    redactor.add(TRICKY)
    encoded = encode(TRICKY)
    text = f"connecting with {encoded} now"
    assert redactor(text) == f"connecting with {REDACTED} now"


def test_the_redactor_masks_a_json_document_and_a_url_holding_the_secret():
    redactor = Redactor()
    redactor.add(TRICKY)
    document = json.dumps({"password": TRICKY})
    url = "https://user:" + urllib.parse.quote(TRICKY, safe="") + "@db.example.internal/"
    header = "Authorization: Basic " + base64.b64encode(TRICKY.encode()).decode()
    for text in (document, url, header):
        assert TRICKY not in redactor(text) and REDACTED in redactor(text)
    assert redactor(document) == json.dumps({"password": REDACTED})


def test_the_redactor_leaves_short_values_and_other_text_alone():
    redactor = Redactor()
    assert redactor.add("abc") == "abc"
    redactor.add(TRICKY)
    assert redactor("abc is not a secret; neither is p@ss") == "abc is not a secret; neither is p@ss"
