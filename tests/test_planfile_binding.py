"""The saved plan is bound as a whole (issue 23, hostile input).

`apply` refuses (exit 3) a plan file edited in any field, or whose stages or exclusions do not match its runbook,
or made in the future, before anything is journaled; `plan --out` to a folder is exit 2 before any host is
contacted; a parameter equal to an inventory secret is saved by reference and never shown; a file that is not a
plan is exit 2 naming the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from helpers import overhaul_cli, write

from overhaul.lab import faults
from overhaul.planfile import SavedPlan, bind
from overhaul.state import SQLiteState


def cli(lab, cwd: Path, *args: str):
    return overhaul_cli(cwd, *args, "--hosts-dir", str(lab.inventory.parent))


def nothing_journaled(cwd: Path) -> None:
    """`overhaul history --env lab --all` in cwd (its journal) shows no run, read-only ones included."""
    history = overhaul_cli(cwd, "history", "--env", "lab", "--all")
    assert history.returncode == 0, history.stderr
    assert history.stdout.strip() == "no runs journaled", history.stdout
    journal = cwd / "journal.sqlite"
    assert not journal.exists() or SQLiteState(journal).runs("lab") == []


def refused_before_any_change(proc, *says: str) -> None:
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "refused before any change" in proc.stderr, proc.stderr
    for said in says:
        assert said in proc.stderr, proc.stderr
    assert "applying" not in proc.stdout  # refused before the run was even announced


@pytest.fixture(scope="module")
def reviewed(lab, tmp_path_factory) -> Path:
    """One reviewed upgrade plan of the shared lab (nothing is changed by making it)."""
    folder = tmp_path_factory.mktemp("reviewed")
    plan_file = folder / "plan.json"
    proc = cli(lab, folder, "plan", "upgrade", "--env", "lab", "-p", "version=1.1.0", "--out", str(plan_file))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return plan_file


def tampered(reviewed: Path, tmp_path: Path, edit, *, rebind: bool = False) -> Path:
    """A copy of the reviewed plan with `edit` made to its JSON; `rebind`: its hash recomputed after the edit,
    as someone who knows the format would (then the checks against the runbook and inventory must catch it)."""
    document = json.loads(reviewed.read_text())
    edit(document)
    if rebind:
        document = json.loads(bind(SavedPlan.model_validate(document)).model_dump_json())
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(document, indent=2))
    return path


def test_the_reviewed_plan_is_bound_by_a_hash_of_every_field(reviewed):
    document = json.loads(reviewed.read_text())
    assert document["format"] == 2 and len(document["sha256"]) == 64
    body = {key: value for key, value in document.items() if key != "sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert hashlib.sha256(canonical).hexdigest() == document["sha256"]
    assert {"environment", "params", "params.version", "excluded", "created", "stages.2",
            "stages.2.hosts.app1"} <= set(document["digests"])


def _drop_last_stage(document):
    document["stages"].pop()


def _future(document):
    document["created"] = time.time() + 3600


def _exclude_app2(document):
    document["excluded"]["app2"] = "unreachable: connection refused after 3 attempts"


EDITS = {
    "a stage removed": (_drop_last_stage, ["stages: edited", "stage 9: removed"]),
    "a stage renamed": (lambda d: d["stages"][1].update(name="stop nothing"), ["stage 2 stop nothing: edited"]),
    "a host's finding": (lambda d: d["stages"][2]["hosts"]["app1"].update(outcome="ok", message="up to date"),
                         ["stage 3 upgrade package, host app1: edited"]),
    "a host removed from a stage": (lambda d: d["stages"][2]["hosts"].pop("app2"),
                                    ["stage 3 upgrade package: edited", "stage 3 upgrade package, host app2: removed"]),
    "the exclusion list": (_exclude_app2, ["excluded: edited", "excluded.app2: added"]),
    "the version": (lambda d: d["params"].update(version="1.0.0"), ["params.version: edited"]),
    "a param shown in no message": (lambda d: d["params"].update(backup_dir="/tmp"), ["params.backup_dir: added"]),
    "the limit": (lambda d: d.update(limit="app1"), ["limit: edited"]),
    "created in the future": (_future, ["created: edited"]),
    "the hash itself": (lambda d: d.update(sha256="0" * 64), ["sha256: does not match"]),
    "a digest": (lambda d: d["digests"].update(environment="0" * 16), ["environment: edited"]),
}


@pytest.mark.parametrize("kind", list(EDITS))
def test_an_edited_plan_file_is_refused_naming_what_changed_and_nothing_is_journaled(lab, reviewed, tmp_path, kind):
    edit, says = EDITS[kind]
    proc = cli(lab, tmp_path, "apply", str(tampered(reviewed, tmp_path, edit)), "--yes")
    refused_before_any_change(proc, "was changed after `overhaul plan` saved it", *says)
    nothing_journaled(tmp_path)


def test_a_switched_environment_with_that_inventorys_sha_is_refused(lab, reviewed, tmp_path):
    # Another environment with the very same hosts: only the binding can tell the plan was reviewed for lab.
    other = lab.inventory.parent / "switched.yaml"
    other.write_text(lab.inventory.read_text().replace("environment: lab", "environment: switched"))
    try:
        def switch(document):
            document.update(environment="switched", inventory_path=str(other.resolve()),
                            inventory_sha256=hashlib.sha256(other.read_bytes()).hexdigest())

        proc = cli(lab, tmp_path, "apply", str(tampered(reviewed, tmp_path, switch)), "--yes")
    finally:
        other.unlink()
    refused_before_any_change(proc, "environment: edited", "inventory_sha256: edited")
    history = overhaul_cli(tmp_path, "history", "--env", "switched", "--all")
    assert history.stdout.strip() == "no runs journaled"
    nothing_journaled(tmp_path)


# -- rebound: the hash recomputed after the edit; the checks against the runbook and inventory still refuse ---------

REBOUND = {
    "a stage removed": (_drop_last_stage, ["stage 9 disk usage: in the runbook, not in the plan file"]),
    "a stage's step": (lambda d: d["stages"][1].update(step="shell"),
                       ["stage 2 stop services: step: the plan file says 'shell', the runbook 'services.stop'"]),
    "a host removed from a stage": (lambda d: d["stages"][2]["hosts"].pop("app2"),
                                    ["stage 3 upgrade package: hosts: the plan file has db1, worker1, app1, "
                                     "the runbook selects db1, worker1, app1, app2"]),
    "the exclusion list": (_exclude_app2, ["stage 6 reconfigure app: hosts: the plan file has app1, app2, "
                                           "the runbook selects app1 (excluded: app2)"]),
    "an unknown host excluded": (lambda d: d["excluded"].update(nosuch="unreachable"),
                                 ["excluded: nosuch is not a host of 'lab'"]),
    "created in the future": (_future, ["created: ", "is in the future"]),
}


@pytest.mark.parametrize("kind", list(REBOUND))
def test_a_rebound_plan_that_does_not_match_its_runbook_is_refused_before_anything_is_journaled(
        lab, reviewed, tmp_path, kind):
    edit, says = REBOUND[kind]
    proc = cli(lab, tmp_path, "apply", str(tampered(reviewed, tmp_path, edit, rebind=True)), "--yes")
    refused_before_any_change(proc, *says)
    assert "was changed after" not in proc.stderr  # the binding held: this is the second line of defence
    nothing_journaled(tmp_path)


def test_a_small_clock_skew_is_allowed(lab, reviewed, tmp_path):
    # A plan made on a machine whose clock is a minute ahead is not "in the future"; it goes on to the
    # gate, which this test makes refuse (a program stopped by hand), so nothing on the lab changes.
    plan_file = tampered(reviewed, tmp_path, lambda d: d.update(created=time.time() + 60), rebind=True)
    lab.host("app1").exec("scalr-server-manage stop plotter")
    try:
        proc = cli(lab, tmp_path, "apply", str(plan_file), "--yes")
    finally:
        lab.host("app1").exec("scalr-server-manage start plotter")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "refused: app1: stage 2 stop services: not RUNNING before the run: plotter STOPPED" in proc.stdout
    # The control of nothing_journaled: a refusal at the gate is journaled (a `refused` run), so it would show.
    history = overhaul_cli(tmp_path, "history", "--env", "lab", "--all")
    assert "refused" in history.stdout and "upgrade" in history.stdout


def test_a_plan_made_with_an_unreachable_host_left_out_saves_it_as_excluded(lab, tmp_path):
    # (saved_plan looked up a finding for every host of the plan as built, the excluded one too, which has none.)
    plan_file = tmp_path / "plan.json"
    faults.stop_sshd(lab.host("app2"))
    try:
        proc = cli(lab, tmp_path, "plan", "upgrade", "--env", "lab", "-p", "version=1.1.0", "--out", str(plan_file),
                   "--skip-unreachable")
    finally:
        faults.start_sshd(lab.host("app2"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    saved = json.loads(plan_file.read_text())
    assert list(saved["excluded"]) == ["app2"]
    assert all("app2" not in stage["hosts"] for stage in saved["stages"])
    assert list(saved["stages"][2]["hosts"]) == ["db1", "worker1", "app1"]
    # app2 answers again: applying would upgrade a host nobody reviewed. The gate refuses it (a refused run).
    applied = cli(lab, tmp_path, "apply", str(plan_file), "--yes")
    assert applied.returncode == 3, applied.stdout + applied.stderr
    assert "drift: stage 3 upgrade package: hosts were db1, worker1, app1, now db1, worker1, app1, app2" in applied.stdout


# -- plan --out: a folder, or an unwritable path, before anything runs ------------------------------------------------

class Listener:
    """A TCP port that counts the connections made to it: the one "host" of an inventory."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.socket.settimeout(0.2)
        self.port = self.socket.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self.socket.accept()
            except TimeoutError:
                continue
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.socket.close()


@pytest.fixture
def listening_inventory(lab, tmp_path):
    listener = Listener()
    hosts = tmp_path / "hosts"
    key = hosts / "key"
    hosts.mkdir()
    shutil.copy(lab.key_file, key)
    key.chmod(0o600)
    write(hosts / "watch.yaml", f"""
        environment: watch
        ssh: {{user: root, key_file: key, known_hosts: {lab.known_hosts}, connect_timeout: 1, connect_retries: 1}}
        hosts:
          - {{name: one, address: 127.0.0.1, port: {listener.port}, roles: [app]}}
        """)
    write(tmp_path / "runbooks" / "touch.yaml", """
        name: touch
        stages:
          - {name: touch, step: shell, params: {command: "true"}}
        """)
    yield hosts, listener
    listener.close()


@pytest.mark.parametrize("out", ["folder", "folder/", "a-file/plan.json"])
def test_plan_out_to_a_folder_or_an_unwritable_path_is_exit_2_before_any_host_is_contacted(
        listening_inventory, tmp_path, out):
    hosts, listener = listening_inventory
    (tmp_path / "folder").mkdir()
    (tmp_path / "a-file").write_text("not a folder\n")
    args = ("plan", "touch", "--env", "watch", "--hosts-dir", str(hosts), "--runbooks-dir", str(tmp_path / "runbooks"))
    proc = overhaul_cli(tmp_path, *args, "--out", out)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"--out {out}: " in proc.stderr and "nothing was run" in proc.stderr
    assert "Traceback" not in proc.stderr
    time.sleep(0.5)
    assert listener.connections == 0
    assert (tmp_path / "a-file").read_text() == "not a folder\n"
    # The control: with a file to write, the same plan does reach the host (which is no SSH server: refused).
    control = overhaul_cli(tmp_path, *args, "--out", "plan.json")
    assert control.returncode == 3, control.stdout + control.stderr
    assert listener.connections >= 1
    assert not (tmp_path / "plan.json").exists()  # a refused plan is not saved


# -- a parameter given a secret's value ---------------------------------------------------------------------------------

def test_a_param_equal_to_a_secret_is_saved_by_reference_and_never_shown(lab, tmp_path):
    secret = lab.secret_file("mysql-backup").read_text().strip()
    assert len(secret) >= 8
    target = f"/tmp/overhaul-planfile-{tmp_path.name}"
    write(tmp_path / "runbooks" / "token.yaml", f"""
        name: token
        params: {{token: null}}
        stages:
          - {{name: write token, step: shell, hosts: [app1], params: {{command: "echo ${{q:token}} > {target}"}}}}
        """)
    plan_file = tmp_path / "plan.json"
    planned = cli(lab, tmp_path, "plan", "token", "--env", "lab", "-p", f"token={secret}", "--out", str(plan_file),
                  "--runbooks-dir", str(tmp_path / "runbooks"), "-v")
    assert planned.returncode == 0, planned.stdout + planned.stderr
    text = plan_file.read_text()
    assert secret not in text
    assert json.loads(text)["params"] == {"token": {"secret": "mysql_backup_password"}}
    assert secret not in planned.stdout + planned.stderr
    try:
        applied = cli(lab, tmp_path, "apply", str(plan_file), "--yes", "-v")
        assert applied.returncode == 0, applied.stdout + applied.stderr
        assert secret not in applied.stdout + applied.stderr
        assert '"token": {"secret": "mysql_backup_password"}' in applied.stdout
        assert "********" in applied.stdout  # the command ran, its text redacted
        # Resolved again at apply: the host got the secret's value itself.
        assert lab.host("app1").exec(f"cat {target}").stdout.strip() == secret
    finally:
        lab.host("app1").exec(f"rm -f {target}", check=False)


# -- a file that is not a plan: exit 2, naming the file and the field ---------------------------------------------------

def _without(field):
    def edit(document):
        del document[field]
    return edit


MALFORMED = {
    "not JSON": ("{not json", "not JSON"),
    "a list": ("[1, 2]", "a JSON object is expected, not list"),
    "an old format": ('{"format": 1}', "format 1: this Overhaul reads plan format 2"),
    "NaN": ('{"format": 2, "created": NaN}', "NaN is not a number a plan file holds"),
    "a key twice": ('{"format": 2, "environment": "lab", "environment": "prod"}', "'environment' appears twice"),
}
FIELD_ERRORS = {
    "a missing field": (_without("environment"), "environment: Field required"),
    "a missing hash": (_without("sha256"), "sha256: missing"),
    "a wrong type": (lambda d: d.update(created="yesterday"), "created: Input should be a valid number"),
    "a wrong type inside": (lambda d: d["stages"][0].update(index="0"), "stages.0.index: Input should be a valid integer"),
    "an unknown field": (lambda d: d.update(approved_by="me"), "approved_by: Extra inputs are not permitted"),
    "a stage's hosts not a mapping": (lambda d: d["stages"][0].update(hosts=["db1"]),
                                      "stages.0.hosts: Input should be a valid dictionary"),
}


def _is_usage_error(proc, path: Path, said: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert str(path) in proc.stderr and said in proc.stderr, proc.stderr


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_a_file_that_is_not_a_plan_is_exit_2_naming_it(tmp_path, kind):
    content, said = MALFORMED[kind]
    path = tmp_path / "plan.json"
    path.write_text(content)
    _is_usage_error(overhaul_cli(tmp_path, "apply", str(path)), path, said)
    nothing_journaled(tmp_path)


@pytest.mark.parametrize("kind", list(FIELD_ERRORS))
def test_a_plan_with_a_missing_or_mistyped_field_is_exit_2_naming_the_field(lab, reviewed, tmp_path, kind):
    edit, said = FIELD_ERRORS[kind]
    path = tampered(reviewed, tmp_path, edit)
    _is_usage_error(cli(lab, tmp_path, "apply", str(path)), path, said)
    nothing_journaled(tmp_path)
