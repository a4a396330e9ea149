"""Hostile input files and names: bounded loading, and always a clear error (exit 2), never a traceback."""

from __future__ import annotations

import os
import time
import tracemalloc
from pathlib import Path

import pytest
from helpers import overhaul_cli
from test_config_errors import INVENTORY, RUNBOOK, make_hosts_dir

from overhaul import config
from overhaul.errors import ConfigError
from overhaul.inventory import load_inventory
from overhaul.runbook import load_runbook


@pytest.fixture
def hosts_dir(tmp_path: Path) -> Path:
    return make_hosts_dir(tmp_path)


def alias_bomb(levels: int = 9) -> str:
    """The "billion laughs": each anchor is a list of nine aliases of the one before; 9**9 values once expanded."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 9)}]" for n in range(1, levels)]
    return "\n".join(lines) + "\n"


# name, bytes of the file, what the error says (after "<path>")
HOSTILE = [
    ("alias bomb", (INVENTORY + "vars:\n" + "".join(f"  {line}\n" for line in alias_bomb().splitlines())).encode(),
     ": its aliases (*name) expand to more than 100000 extra values"),
    ("recursive alias", (INVENTORY + "vars: &v {loop: *v}\n").encode(),
     ":13: an alias refers to a node that contains it"),
    ("deep flow nesting", (INVENTORY + "vars: {x: " + "[" * 20000 + "]" * 20000 + "}\n").encode(),
     ":13: nested more than 64 levels deep"),
    ("deep block nesting", (INVENTORY + "vars:\n" + "".join(" " * (n + 1) + f"k{n}:\n" for n in range(1000))).encode(),
     ":76: nested more than 64 levels deep"),
    ("latin-1 text", INVENTORY.replace("root", "r\xf6ot").encode("latin-1"),
     ":3: not UTF-8 text (byte 0xf6 at offset"),
    ("utf-16 text", INVENTORY.encode("utf-16"), ":1: not UTF-8 text (byte 0xff at offset 0)"),
    ("a NUL byte", INVENTORY.replace("db1", "db\x001").encode(), ":7: not valid YAML: control character #x0000"),
    ("a NUL byte after non-ASCII text", INVENTORY.replace("root", "r" + "\xf6" * 20 + "t").replace("db1", "db\x001").encode(),
     ":7: not valid YAML: control character #x0000"),
    ("a 5000-digit number", (INVENTORY + "vars: {n: " + "9" * 5000 + "}\n").encode(), ": not valid YAML: Exceeds the limit"),
    ("an impossible date", (INVENTORY + "vars: {d: 2024-13-45}\n").encode(), ": not valid YAML: month must be in 1..12"),
    ("a list as a key", (INVENTORY + "vars: {[a, b]: 1}\n").encode(), ":13: vars: a key must be a plain value"),
    ("a python tag", (INVENTORY + "vars: {x: !!python/object/apply:os.system [id]}\n").encode(),
     ":13: not valid YAML: could not determine a constructor"),
    ("more than 5 MB", (INVENTORY + "vars: {pad: '" + "x" * (5 * 2**20) + "'}\n").encode(),
     ": the file is 5.0 MB; an inventory or runbook may be at most 5 MB"),
]


@pytest.fixture(params=sorted(config.PARSERS))
def yaml_parser(request, monkeypatch):
    """Each YAML parser Overhaul may load files with: libyaml's (where PyYAML has it) and PyYAML's own."""
    monkeypatch.setattr(config, "_BoundedLoader", config.bounded_loader(config.PARSERS[request.param]))
    return request.param


def test_both_parsers_are_there():
    assert sorted(config.PARSERS) == ["libyaml", "python"]  # (this machine's PyYAML has libyaml: both are tested)


@pytest.mark.parametrize("content, expected", [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE])
def test_a_hostile_inventory_is_a_clear_input_error(hosts_dir, content, expected, yaml_parser):
    path = hosts_dir / "staging.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_inventory("staging", hosts_dir)
    assert f"{path}{expected}" in str(caught.value)


def test_an_alias_bomb_fails_fast_in_bounded_memory(hosts_dir):
    (hosts_dir / "staging.yaml").write_text(INVENTORY + "vars:\n" + "".join(f"  {x}\n" for x in alias_bomb(12).splitlines()))
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(ConfigError, match="alias bomb"):
            load_inventory("staging", hosts_dir)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 2
    assert peak < 20 * 2**20  # 9**12 values expanded would be terabytes


def test_aliases_within_bounds_still_work(hosts_dir):
    base = "role_vars:\n  db: &common {tier: 1, zone: a}\n  app: {<<: *common, tier: 2}\nvars: {again: *common}\n"
    (hosts_dir / "staging.yaml").write_text(INVENTORY + base)
    inventory = load_inventory("staging", hosts_dir)
    assert inventory.role_vars["app"] == {"tier": 2, "zone": "a"} and inventory.vars["again"] == {"tier": 1, "zone": "a"}


@pytest.mark.parametrize("kind", ["a directory", "a named pipe"])
def test_an_inventory_that_is_not_a_regular_file_is_refused_without_reading_it(hosts_dir, kind):
    path = hosts_dir / "staging.yaml"
    path.mkdir() if kind == "a directory" else os.mkfifo(path)  # reading a pipe would wait forever
    with pytest.raises(ConfigError, match=f"{path}: not a regular file"):
        load_inventory("staging", hosts_dir)


def test_a_hostile_runbook_is_a_clear_input_error(tmp_path):
    path = tmp_path / "runbook.yaml"
    path.write_text(RUNBOOK + "description: &d [" + ", ".join(["x"] * 9) + "]\n" + alias_bomb().replace("a0: &a0", "b: &a0"))
    with pytest.raises(ConfigError, match=r"runbook.yaml: its aliases \(\*name\) expand to more than"):
        load_runbook(str(path))


# -- names that would be paths --------------------------------------------------------------------------------------

@pytest.mark.parametrize("env", ["../outside", "sub/staging", "/tmp/outside", "..", "a\\b", "", "staging\n"])
def test_an_environment_name_with_a_path_in_it_is_refused_before_any_file_is_read(hosts_dir, env):
    (hosts_dir.parent / "outside.yaml").write_text(INVENTORY.replace("staging", "outside"))
    with pytest.raises(ConfigError) as caught:
        load_inventory(env, hosts_dir)
    assert str(caught.value) == (f"environment {env!r}: expected a name of letters, digits, '.', '_' or '-' "
                                 "(no path separators, no '..')")


@pytest.mark.parametrize("name", ["../evil", "sub/evil", "..", "evil/../../evil"])
def test_a_runbook_name_with_a_path_in_it_is_refused(tmp_path, name):
    runbooks = tmp_path / "runbooks"
    (runbooks / "sub").mkdir(parents=True)
    for path in (tmp_path / "evil.yaml", runbooks / "sub" / "evil.yaml"):
        path.write_text(RUNBOOK)
    with pytest.raises(ConfigError, match=r"runbook .*: expected a name of letters, digits"):
        load_runbook(name, runbooks)


def test_a_runbook_given_as_a_path_to_a_yaml_file_still_loads(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.yaml").write_text(RUNBOOK)
    assert load_runbook(str(tmp_path / "sub" / "mine.yaml")).runbook.name == "test"
    with pytest.raises(ConfigError, match=r"runbook .*/sub/missing\.yaml: no such file"):
        load_runbook(str(tmp_path / "sub" / "missing.yaml"))


# -- through the command line: exit 2, one clear line, never a traceback --------------------------------------------

CLI_CASES = [case for case in HOSTILE if case[0] in ("alias bomb", "deep flow nesting", "latin-1 text", "a list as a key")]


@pytest.mark.parametrize("content, expected", [case[1:] for case in CLI_CASES], ids=[case[0] for case in CLI_CASES])
def test_the_command_line_exits_2_without_a_traceback_on_a_hostile_file(hosts_dir, tmp_path, content, expected):
    (hosts_dir / "staging.yaml").write_bytes(content)
    proc = overhaul_cli(tmp_path, "inventory", "--env", "staging", "--hosts-dir", str(hosts_dir))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"staging.yaml{expected}" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_the_command_line_refuses_an_env_with_a_path_with_exit_2(hosts_dir, tmp_path):
    proc = overhaul_cli(tmp_path, "inventory", "--env", "../hosts/staging", "--hosts-dir", str(hosts_dir))
    assert proc.returncode == 2
    assert "environment '../hosts/staging': expected a name" in proc.stderr and "Traceback" not in proc.stderr


def test_both_parsers_read_the_same_values_and_lines(monkeypatch):
    """The repository's inventories and runbooks: the same data and the same line for every key and item."""
    repository = Path(__file__).resolve().parent.parent
    files = sorted(repository.glob("hosts/*.yaml")) + sorted(repository.glob("runbooks/*.yaml"))
    assert files
    read = {}
    for name, parser in config.PARSERS.items():
        monkeypatch.setattr(config, "_BoundedLoader", config.bounded_loader(parser))
        read[name] = [(document.data, document.lines) for document in map(config.load_document, files)]
    assert read["libyaml"] == read["python"]
