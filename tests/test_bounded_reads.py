"""Only regular files are read, within bounds; nothing Overhaul writes is readable by others (issue 23).

Reading: an inventory, a runbook, a saved plan or an exported journal named as /dev/zero, a named pipe or a
folder is a clear input error (exit 2) naming the file, at once: never a hang, never a MemoryError. A YAML
file dense in nodes is refused as its nodes are composed.

Writing: the journal (and SQLite's -wal and -shm), the runs' logs, exported journals and saved plans are 0600,
in folders 0700, whatever the umask.
"""

from __future__ import annotations

import os
import resource
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import overhaul_cli
from test_config_errors import INVENTORY, make_hosts_dir

from overhaul import config
from overhaul.errors import ConfigError
from overhaul.execution import file_sha256
from overhaul.files import amount, append_private, private_dir, read_regular, write_private
from overhaul.inventory import load_inventory
from overhaul.state import SQLiteState


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def hosts_dir(tmp_path: Path) -> Path:
    return make_hosts_dir(tmp_path)


@pytest.fixture
def open_umask():
    """The loosest umask (0): whatever Overhaul writes gets only the mode it asks for."""
    old = os.umask(0)
    yield
    os.umask(old)


def not_regular(kind: str, path: Path) -> Path:
    """`path` made into `kind`: a named pipe nobody writes to, a folder, or a link to /dev/zero."""
    if kind == "a named pipe":
        os.mkfifo(path)
    elif kind == "a directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")
    return path


KINDS = ["a named pipe", "a directory", "a character device"]


def within(seconds: float, work):
    """What `work()` returns or raises, run in a thread: a test fails (rather than hangs) if it blocks."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = work()
        except BaseException as exc:  # handed back to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still reading after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# -- read_regular ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_read_regular_refuses_what_is_not_a_regular_file_naming_it_and_what_it_is(tmp_path, kind):
    path = not_regular(kind, tmp_path / "plan.json")
    with pytest.raises(ConfigError) as caught:
        within(10, lambda: read_regular(path, 1024, "a saved plan"))
    assert str(caught.value) == f"{path}: not a regular file ({kind}); expected a saved plan in a regular file"


def test_read_regular_reads_up_to_its_limit_and_refuses_one_byte_more(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"x" * 100)
    assert read_regular(path, 100) == b"x" * 100
    with pytest.raises(ConfigError, match=rf"^{path}: the file is 100 bytes; a saved plan may be at most 99 bytes$"):
        read_regular(path, 99, "a saved plan")


def test_read_regular_leaves_a_missing_file_to_its_caller(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_regular(tmp_path / "nowhere", 100)


def test_amounts_in_messages():
    assert [amount(n) for n in (0, 1023, 1536, 5 * 2**20, 3 * 2**30)] == [
        "0 bytes", "1023 bytes", "1.5 KB", "5.0 MB", "3.0 GB"]
    assert amount(5 * 2**20, whole=True) == "5 MB" and amount(5 * 2**20 + 1, whole=True) == "5.0 MB"


@pytest.mark.parametrize("kind", KINDS)
def test_the_digest_of_a_runbook_or_inventory_reads_only_a_regular_file(tmp_path, kind):
    # (apply hashes the runbook a saved plan names: any path, /dev/zero included)
    path = not_regular(kind, tmp_path / "runbook.yaml")
    with pytest.raises(ConfigError, match=f"^{path}: not a regular file"):
        within(10, lambda: file_sha256(path))


# -- the command line: exit 2, the file named, at once ----------------------------------------------------------------

def refused(proc: subprocess.CompletedProcess, path: Path, kind: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{path}: not a regular file ({kind})" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_an_inventory_that_is_not_a_regular_file_is_exit_2(hosts_dir, tmp_path, kind):
    path = not_regular(kind, hosts_dir / "staging.yaml")
    refused(overhaul_cli(tmp_path, "inventory", "--env", "staging", "--hosts-dir", str(hosts_dir), timeout=60), path, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_a_runbook_that_is_not_a_regular_file_is_exit_2(hosts_dir, tmp_path, kind):
    (hosts_dir / "staging.yaml").write_text(INVENTORY)
    path = not_regular(kind, tmp_path / "book.yaml")
    refused(overhaul_cli(tmp_path, "plan", str(path), "--env", "staging", "--hosts-dir", str(hosts_dir), timeout=60),
            path, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_a_journal_to_import_that_is_not_a_regular_file_is_exit_2(tmp_path, kind):
    path = not_regular(kind, tmp_path / "export.jsonl")
    refused(overhaul_cli(tmp_path, "state.import", "--file", str(path), timeout=60), path, kind)


def test_the_device_itself_is_refused_too(tmp_path):
    proc = overhaul_cli(tmp_path, "state.import", "--file", "/dev/zero", timeout=60)
    refused(proc, Path("/dev/zero"), "a character device")


def _limit_memory() -> None:  # (for a child that would read /dev/zero: a MemoryError at 1 GB, not at 1.8 GB)
    resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))


@pytest.mark.parametrize("kind", KINDS)
def test_a_plan_to_apply_that_is_not_a_regular_file_is_exit_2(hosts_dir, tmp_path, kind):
    path = not_regular(kind, tmp_path / "plan.json")
    proc = subprocess.run([sys.executable, "-m", "overhaul", "apply", str(path), "--hosts-dir", str(hosts_dir)],
                          cwd=tmp_path, env={**os.environ, "OVERHAUL_JOURNAL": str(tmp_path / "journal.sqlite")},
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=10, preexec_fn=_limit_memory)
    refused(proc, path, kind)


# -- YAML: a bound on the nodes composed -----------------------------------------------------------------------------

@pytest.fixture(params=sorted(config.PARSERS))
def yaml_parser(request, monkeypatch):
    """Each YAML parser Overhaul may load files with: libyaml's (where PyYAML has it) and PyYAML's own."""
    monkeypatch.setattr(config, "_BoundedLoader", config.bounded_loader(config.PARSERS[request.param]))
    return request.param


def test_a_yaml_file_dense_in_nodes_is_refused_as_they_are_composed(tmp_path, yaml_parser, monkeypatch):
    path = tmp_path / "dense.yaml"
    path.write_text("[" + ",".join(["0"] * 2_500_000) + "]\n")  # 5 MB: within the size cap
    assert path.stat().st_size <= config.MAX_BYTES
    composed = []
    original = config._BoundedLoader.compose_node  # (yaml_parser's)

    def counting(self, parent, index):
        composed.append(1)
        return original(self, parent, index)

    monkeypatch.setattr(config._BoundedLoader, "compose_node", counting)
    with pytest.raises(ConfigError) as caught:
        config.load_document(path)
    assert str(caught.value) == (f"{path}:1: more than 200,000 values (keys, items and aliases count); an inventory "
                                 "or runbook may have at most that many")
    assert len(composed) == config.MAX_NODES + 1  # it stopped there: the other 2.3 million were never composed


def test_the_node_bound_is_exact(tmp_path, yaml_parser, monkeypatch):
    monkeypatch.setattr(config, "MAX_NODES", 10)
    path = tmp_path / "list.yaml"
    path.write_text("a: [1, 2, 3]\nb: {c: 4}\n")  # the mapping, a, the list, 3 items, b, the mapping, c, 4: 10
    assert config.load_document(path).data == {"a": [1, 2, 3], "b": {"c": 4}}
    path.write_text("a: [1, 2, 3]\nb: {c: 4}\nd: 5\n")
    with pytest.raises(ConfigError, match=rf"^{path}:3: more than 10 values"):
        config.load_document(path)


def test_a_dense_inventory_is_exit_2_naming_the_file_and_the_limit(hosts_dir, tmp_path):
    path = hosts_dir / "staging.yaml"
    path.write_text(INVENTORY + "vars:\n  many: [" + ",".join(["0"] * 2_500_000) + "]\n")
    proc = overhaul_cli(tmp_path, "inventory", "--env", "staging", "--hosts-dir", str(hosts_dir), timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{path}:14: more than 200,000 values" in proc.stderr and "Traceback" not in proc.stderr


def test_a_real_inventory_is_far_below_the_node_bound(hosts_dir):
    hosts = "".join(f"  - name: app{n}\n    address: 10.0.{n // 250}.{n % 250 + 1}\n    roles: [app, web]\n"
                    f"    port: 22\n    vars: {{zone: a, rack: r{n % 40}}}\n" for n in range(2000))
    (hosts_dir / "staging.yaml").write_text(INVENTORY.split("\nhosts:")[0] + "\nhosts:\n" + hosts)
    assert len(load_inventory("staging", hosts_dir).hosts) == 2000


# -- private files and folders ---------------------------------------------------------------------------------------

def test_private_dir_makes_every_missing_folder_0700_and_leaves_an_existing_one(tmp_path, open_umask):
    existing = tmp_path / "mine"
    existing.mkdir(mode=0o755)
    made = private_dir(existing / "a" / "b")
    assert made == existing / "a" / "b"
    assert [mode(existing), mode(existing / "a"), mode(made)] == [0o755, 0o700, 0o700]
    private_dir(existing, tighten_existing=True)
    assert mode(existing) == 0o700


def test_write_private_is_0600_from_the_start_and_replaces_a_looser_file(tmp_path, open_umask):
    path = tmp_path / "out" / "plan.json"
    write_private(path, "one\n")
    assert (path.read_text(), mode(path), mode(path.parent)) == ("one\n", 0o600, 0o700)
    path.chmod(0o644)
    write_private(path, (line for line in ["two\n", "three\n"]))
    assert (path.read_text(), mode(path)) == ("two\nthree\n", 0o600)
    assert sorted(p.name for p in path.parent.iterdir()) == ["plan.json"]  # no temp file left


def test_write_private_never_replaces_what_is_not_a_regular_file(tmp_path):
    fifo = not_regular("a named pipe", tmp_path / "out")
    with pytest.raises(ConfigError, match=f"^{fifo}: not a regular file .a named pipe.; Overhaul writes only regular"):
        write_private(fifo, "x")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_append_private_creates_0600_and_tightens_an_older_log(tmp_path, open_umask):
    log = tmp_path / "runs" / "r1" / "01-backup-database-db1.log"
    append_private(log, "$ true\n")
    append_private(log, "[exit 0]\n")
    assert (log.read_text(), mode(log), mode(log.parent), mode(log.parent.parent)) == (
        "$ true\n[exit 0]\n", 0o600, 0o700, 0o700)
    log.chmod(0o644)
    append_private(log, "more\n")
    assert mode(log) == 0o600


def test_the_sqlite_journal_its_wal_and_shm_are_0600_in_a_0700_folder(tmp_path, open_umask):
    path = tmp_path / ".overhaul" / "journal.sqlite"
    state = SQLiteState(path)
    try:
        assert {p.name for p in path.parent.iterdir()} >= {"journal.sqlite", "journal.sqlite-wal", "journal.sqlite-shm"}
        assert {p.name: mode(p) for p in path.parent.iterdir()} == dict.fromkeys(os.listdir(path.parent), 0o600)
        assert mode(path.parent) == 0o700
    finally:
        state.close()


def test_an_older_journal_and_overhaul_folder_are_tightened(tmp_path):
    folder = tmp_path / ".overhaul"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    path = folder / "journal.sqlite"
    sqlite3.connect(path).close()
    path.chmod(0o644)
    SQLiteState(path).close()
    assert (mode(folder), mode(path)) == (0o700, 0o600)


def test_a_folder_the_operator_named_for_the_journal_is_left_as_it_is(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o755)
    SQLiteState(folder / "journal.sqlite").close()
    assert (mode(folder), mode(folder / "journal.sqlite")) == (0o755, 0o600)


def test_state_export_writes_a_private_file(tmp_path):
    out = tmp_path / "exports" / "journal.jsonl"
    proc = subprocess.run(["sh", "-c", 'umask 000 && exec "$0" -m overhaul state.export --out "$1"', sys.executable,
                           str(out)], cwd=tmp_path, env={**os.environ, "OVERHAUL_JOURNAL": str(tmp_path / "j.sqlite")},
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (mode(out), mode(out.parent)) == (0o600, 0o700)


# -- a real run on the lab: everything under .overhaul/ ---------------------------------------------------------------

def overhaul_under_umask_0(lab, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`overhaul ARGS --hosts-dir LAB` in `cwd` with umask 0 and its journal at cwd/.overhaul/journal.sqlite."""
    return subprocess.run(["sh", "-c", 'umask 000 && exec "$@"', "sh", sys.executable, "-m", "overhaul", *args,
                           "--hosts-dir", str(lab.inventory.parent)], cwd=cwd,
                          env={**os.environ, "OVERHAUL_JOURNAL": str(cwd / ".overhaul" / "journal.sqlite")},
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)


def modes_under(top: Path) -> dict[str, int]:
    found = {".": mode(top)}
    for folder, folders, files in os.walk(top):
        for name in folders + files:
            path = Path(folder) / name
            found[str(path.relative_to(top))] = mode(path)
    return found


@pytest.fixture(scope="module")
def verified(lab, tmp_path_factory) -> Path:
    """A folder where `overhaul verify --env lab` ran (umask 0): its .overhaul/ to inspect."""
    cwd = tmp_path_factory.mktemp("verified")
    proc = overhaul_under_umask_0(lab, cwd, "verify", "--env", "lab")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return cwd / ".overhaul"


def test_a_run_makes_its_folders_0700_and_its_journal_0600(verified):
    found = modes_under(verified)
    logs = [name for name in found if name.startswith("runs/") and name.endswith(".log")]
    assert logs, found  # (the run's per-host logs are there)
    folders = {name for name in found if (verified / name).is_dir()}
    assert folders >= {".", "runs"} and len(folders) == 3, found  # ., runs, runs/<run id>
    assert {name: found[name] for name in folders} == dict.fromkeys(folders, 0o700)
    others = {name: bits for name, bits in found.items() if name not in folders and name not in logs}
    assert "journal.sqlite" in others and others == dict.fromkeys(others, 0o600)


def test_everything_a_run_writes_under_overhaul_is_0600_in_0700_folders(verified):
    found = modes_under(verified)
    assert found == {name: 0o700 if (verified / name).is_dir() else 0o600 for name in found}


def test_plan_out_is_0600_in_0700_folders(lab, tmp_path):
    out = tmp_path / "plans" / "reviewed" / "plan.json"
    proc = overhaul_under_umask_0(lab, tmp_path, "plan", "verify", "--env", "lab", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (mode(out), mode(out.parent), mode(out.parent.parent)) == (0o600, 0o700, 0o700)
