"""Commands are built, not pasted: values never become shell syntax, whatever they hold.

The sweep gives every string parameter of every built-in step a corpus of hostile values and runs the step's
whole contract with it on real lab hosts (preflight, check, apply, verify, undo, called directly so that an
apply runs even where its preflight would refuse), then `plan` and `run` through the command line; afterwards
no host may hold a canary file.
"""

from __future__ import annotations

import ast
import contextlib
import itertools
import shlex
import typing
from pathlib import Path

import pytest
import yaml
from helpers import lab_inventory, overhaul_cli, write
from pydantic import ValidationError

from overhaul.command import Command, bash, join, open_quote, quote, sh
from overhaul.context import StepHost
from overhaul.errors import ConfigError, OverhaulError
from overhaul.runbook import load_runbook
from overhaul.step import Registry
from overhaul.transport import Transport, durable_command, lock_file_name

ROOT = Path(__file__).resolve().parent.parent
CANARY = "/tmp/overhaul-canary"
_serial = itertools.count()


def payloads() -> list[str]:
    """Hostile values, each of which would create a canary file if it ever reached a shell unquoted."""
    n = next(_serial)
    touch = f"touch {CANARY}-{n}"
    return [
        f"x'; {touch}; echo '",
        f'x"; {touch}; echo "',
        f"$({touch})",
        f"`{touch}`",
        f"x; {touch}",
        f"x | {touch}",
        f"x\n{touch}\n",
        f"-x; {touch}",
        f"--help && {touch}",
        f"{'a' * 3000}'; {touch}; '",
        f"héllo wörld ☃'; {touch}; '",
        f"x' \"$({touch})\" '",
    ]


def string_fields(params_class: type) -> list[str]:
    """The parameters a runbook can give text to: str, optional str, list of str."""
    found = []
    for name, field in params_class.model_fields.items():
        annotation = field.annotation
        options = set(typing.get_args(annotation)) or {annotation}
        if str in options or any(typing.get_origin(o) is list and typing.get_args(o) == (str,) for o in options):
            found.append(name)
    return found


REQUIRED = {"mysql.restore": {"backup": "/nonexistent/backup.sql.gz", "sha256": "0" * 64, "size": 1},
            "shell": {"command": "true"}}


def is_list(params_class: type, field: str) -> bool:
    annotation = params_class.model_fields[field].annotation
    return any(typing.get_origin(option) is list for option in typing.get_args(annotation) or (annotation,))


def hostile_params(step: type, corpus: list[str] | None = None) -> list[tuple[str, str, dict]]:
    """(field, payload, params) for every string field and payload; the shell step's own `command` and `unless`
    are shell by definition (its author's), so they are left out."""
    cases = []
    for field in string_fields(step.Params):
        if step.name == "shell" and field in ("command", "unless"):
            continue
        for payload in corpus or payloads():
            value = [payload] if is_list(step.Params, field) else payload
            cases.append((field, payload, {**REQUIRED.get(step.name, {}), field: value}))
    return cases


def canaries(lab) -> list[str]:
    found = []
    for host in lab.hosts():
        listing = host.exec(f"ls -1 {CANARY}-* 2>/dev/null || true").stdout
        found += [f"{host.name}: {line}" for line in listing.splitlines() if line.strip()]
    return found


# -- the builder, as pure logic ----------------------------------------------------------------------------


def test_values_are_quoted_and_commands_inserted_as_built():
    inner = sh("ls -- {path}", path="a b")
    assert sh("cd {folder} && {inner}", folder="/x'y", inner=inner).text == "cd '/x'\"'\"'y' && ls -- 'a b'"
    assert sh("df -P -- {mounts}", mounts=["/a", "$(x)"]).text == "df -P -- /a '$(x)'"
    assert sh("sleep {n} {f}", n=3, f=1.5).text == "sleep 3 1.5"
    assert join([sh("a"), sh("b {x}", x=";")], " && ").text == "a && b ';'"
    inner = sh("echo {x}", x="'")
    assert shlex.split(bash(inner).text) == ["bash", "-c", inner.text]


def test_a_field_inside_quotes_or_with_a_format_is_refused():
    for template in ('echo "{x}"', "echo '{x}'", 'echo "$(cat {y}) {x}"', "x=`echo \"{x}`"):
        with pytest.raises(ValueError, match="inside"):
            sh(template, x="a", y="b")
    for template in ("{x!r}", "{x:>4}", "{x[0]}", "{x.y}"):
        with pytest.raises(ValueError, match="plain name"):
            sh(template, x="a")
    # a field inside $( ) inside double quotes starts a new context: allowed, and quoted there
    assert sh('echo "$(cat -- {x})"', x="a b").text == "echo \"$(cat -- 'a b')\""
    # quotes in a comment are not quotes
    assert sh("# it's here\necho {x}", x="a b").text == "# it's here\necho 'a b'"


def test_a_command_cannot_be_made_from_text_but_by_the_builder():
    with pytest.raises(TypeError):
        Command("rm -rf /")
    with pytest.raises(TypeError):
        join(["echo hi"])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        quote(True)
    assert Command.script("echo $HOME").text == "echo $HOME"


def test_open_quote_follows_the_shell():
    # where quoting does not keep a value one inert word (each was a working injection through ${q:name})
    assert open_quote("cat <<EOF\n") == "<<"  # a here-document's body runs $( )
    assert open_quote("echo $'a\\'") == "$'"  # \' does not end $'...'
    assert open_quote('echo "$(case a in a) echo ;; esac; echo "') == '"'  # a case pattern's ) is not the $( )'s
    assert open_quote("echo `echo ") == "`"  # a backtick inside the value ends the outer one
    assert open_quote("[[ ") == "[[" and open_quote("(( ") == "((" and open_quote("echo $(( 1 + ") == "(("
    assert open_quote("cat <<< ") is None and open_quote("[[ -e x ]] && echo ") is None
    assert open_quote("( cd /x && ls ") is None and open_quote("case $x in a) echo ") is None
    assert open_quote("echo 'a") == "'"
    assert open_quote('echo "a') == '"'
    assert open_quote("echo 'a' \"b\" c") is None
    assert open_quote("echo \\' ") is None
    assert open_quote('echo "a\\"') == '"'
    assert open_quote("echo '$( ") == "'"  # no substitution inside single quotes


def test_lock_names_become_safe_file_names():
    assert lock_file_name("package-scalr-server") == "package-scalr-server.lock"
    hostile = lock_file_name("x'; touch /tmp/y; '")
    assert "/" not in hostile and "'" not in hostile and hostile.endswith(".lock")
    assert lock_file_name("a/b") != lock_file_name("a_b")


# -- no command is pasted: the code itself ---------------------------------------------------------------

SENDERS = {"run", "run_then_read", "execute", "Probe", "durable_command", "probe_script", "sh", "script", "bash",
           "as_command"}


def _engine_files() -> list[Path]:
    """What may send commands to hosts: not the lab (local processes of its own), not the journal (SQL)."""
    return [path for path in [*ROOT.glob("overhaul/**/*.py"), *ROOT.glob("steps/*.py")]
            if not {"lab", "state"} & set(path.relative_to(ROOT).parts)]


def test_no_command_sent_to_a_host_is_pasted_text():
    """Every command argument of run/run_then_read/execute/Probe/durable_command in the engine and the built-in
    steps is a built Command, and every template given to sh() or Command.script() is written in the code: never
    an f-string, a `+`, a `%` or a `.format()` of text."""
    pasted = []
    for path in _engine_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name not in SENDERS:
                continue
            arguments = node.args[1:2] if name == "Probe" else node.args[:1]
            for argument in arguments:
                if isinstance(argument, (ast.JoinedStr, ast.BinOp)) or (
                        isinstance(argument, ast.Call) and getattr(argument.func, "attr", "") == "format"):
                    pasted.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}({ast.unparse(argument)[:60]})")
    assert not pasted, "\n".join(pasted)


def test_only_the_builder_quotes_for_a_shell():
    """shlex is the builder's alone (the lab runs local processes of its own; the redactor knows quoted forms)."""
    # (the test kit's fake host reads the engine's framed commands back into words: it splits, it never quotes)
    allowed = {"overhaul/command.py", "overhaul/secrets.py", "overhaul/testing.py"}
    users = [str(path.relative_to(ROOT)) for path in _engine_files()
             if "shlex" in path.read_text() and str(path.relative_to(ROOT)) not in allowed]
    assert not users


# -- the sweep, on real hosts -----------------------------------------------------------------------------


@pytest.mark.parametrize("share", [pytest.param(3, id="a third of the corpus per field, all of it overall"),
                                   pytest.param(1, id="the whole corpus per field", marks=pytest.mark.full_sweep)])
def test_every_string_parameter_of_every_built_in_step_is_inert_on_a_host(fresh_lab, tmp_path, share):
    """Each string field gets the payloads whose place in the corpus matches the field's turn (share 3: one in
    three, the next field the next third, so that every payload reaches many fields); the marked sweep, all."""
    lab = fresh_lab(2)  # db1 (MariaDB) and worker1, changed freely by this test
    inventory = lab_inventory(lab)
    registry = Registry()
    transport = Transport(inventory)
    refused = ran = 0
    turn = itertools.count()
    try:
        for step_name in sorted(registry.names()):
            step_class = registry.get(step_name)
            fields: dict[str, int] = {}
            for index, (field, payload, params) in enumerate(hostile_params(step_class)):
                if (index + fields.setdefault(field, next(turn))) % share:
                    continue
                try:
                    step = step_class(step_class.Params.model_validate(params))
                except ValidationError:
                    refused += 1  # a clean refusal at load: the value never reaches a host
                    continue
                host_name = "db1" if step_name.startswith("mysql") else "worker1"
                host = StepHost(transport.host(host_name), timeout=30, run_id=f"inj{ran}")
                remembered = {"previous": payload, "stopped": [payload]}  # as if a journal row had been edited
                for call in (step.preflight, step.check, step.apply, step.verify,
                             lambda h, s=step, r=remembered: s.undone(h, r),
                             lambda h, s=step, r=remembered: s.undo(h, r)):
                    with contextlib.suppress(OverhaulError, NotImplementedError):
                        call(host)
                ran += 1
        lock = "x'; touch " + CANARY + "-lock; echo '"
        transport.host("worker1").run(durable_command(sh("true"), lock, 10))
    finally:
        transport.close()
    assert ran > 50 and refused > 0, (ran, refused)
    assert canaries(lab) == []


def _stage(step_name: str, field: str, params_class: type, index: int) -> str:
    fixed = "".join(f"\n      {key}: {value!r}" for key, value in REQUIRED.get(step_name, {}).items())
    value = '["${v}"]' if is_list(params_class, field) else '"${v}"'
    host = "db1" if step_name.startswith("mysql") else "worker1"
    return (f"  - name: s{index}-{step_name}-{field}\n    step: {step_name}\n    hosts: [{host}]\n"
            f"    params:\n      {field}: {value}{fixed}\n")


def _plan_and_run(tmp_path: Path, hosts_dir: str, runbook: Path, payload: str) -> set[int]:
    """`plan` then `run` of `runbook` with v=payload: never a traceback; a failed run is abandoned."""
    exits = set()
    for command in ("plan", "run"):
        args = [command, str(runbook), "--env", "lab", "--hosts-dir", hosts_dir, "--param", f"v={payload}"]
        done = overhaul_cli(tmp_path, *args, *(["--yes"] if command == "run" else []))
        assert "Traceback" not in done.stderr, done.stderr
        exits.add(done.returncode)
        if command == "run" and done.returncode == 1:
            overhaul_cli(tmp_path, "abandon", "--run", done.stdout.split("run ", 1)[1].split()[0])
    return exits


def _accepting(payload: str) -> list[tuple[str, str, type]]:
    """(step, field, Params) of every string field whose validation lets `payload` through (but secret names)."""
    registry, found = Registry(), []
    for step_name in sorted(registry.names()):
        step_class = registry.get(step_name)
        for field, _, params in hostile_params(step_class, [payload]):
            if field.endswith("_secret"):
                continue  # names an inventory secret: an unknown one is refused at load (exit 2), alone
            try:
                step_class.Params.model_validate(params)
            except ValidationError:
                continue
            found.append((step_name, field, step_class.Params))
    return found


def test_hostile_parameters_through_plan_and_run_touch_nothing(fresh_lab, tmp_path):
    """Each payload given by --param to every string field that accepts it, all in one runbook (the first stage a
    hook): preflight, check and apply of every stage see it, through the command line."""
    lab = fresh_lab(2)
    hosts_dir = str(lab.inventory.parent)
    exits: set[int] = set()
    for payload in payloads()[:4]:
        stages = [_stage(step, field, params, i) for i, (step, field, params) in enumerate(_accepting(payload))]
        assert len(stages) > 10
        runbook = write(tmp_path / "hostile.yaml", "name: hostile\nparams: {v: null}\nhooks:\n  before:\n"
                        + stages[0].replace("\n  ", "\n    ").replace("  - ", "    - ", 1)
                        + "stages:\n" + "".join(stages[1:]))
        exits |= _plan_and_run(tmp_path, hosts_dir, runbook, payload)
    assert exits <= {0, 1, 3}
    assert canaries(lab) == []


@pytest.mark.full_sweep
def test_every_payload_through_plan_and_run_one_field_at_a_time(fresh_lab, tmp_path):
    lab = fresh_lab(2)
    hosts_dir = str(lab.inventory.parent)
    exits: set[int] = set()
    registry = Registry()
    for step_name in sorted(registry.names()):
        step_class = registry.get(step_name)
        for field in dict.fromkeys(field for field, _, _ in hostile_params(step_class)):
            runbook = write(tmp_path / "one.yaml", "name: one\nparams: {v: null}\nstages:\n"
                            + _stage(step_name, field, step_class.Params, 0))
            for payload in payloads():
                exits |= _plan_and_run(tmp_path, hosts_dir, runbook, payload)
    assert exits <= {0, 1, 2, 3}
    assert canaries(lab) == []


def test_a_quoted_reference_inside_quotes_is_refused_at_load_with_its_line(tmp_path):
    path = write(tmp_path / "q.yaml", """
        name: q
        params: {v: null}
        stages:
          - name: guarded
            step: shell
            params:
              command: echo hi
              unless: 'test -e "${q:v}"'
        """)
    with pytest.raises(ConfigError) as raised:
        load_runbook(str(path))
    assert f"{path}:8: stages[0].params.unless: ${{q:v}} stands inside \"...\"" in str(raised.value)
    write(tmp_path / "fine.yaml", path.read_text().replace("'test -e \"${q:v}\"'", "test -e ${q:v}"))
    load_runbook(str(tmp_path / "fine.yaml"))


@pytest.mark.parametrize("command", [
    "cat > /tmp/x <<EOF\nname=${q:v}\nEOF", "echo `echo ${q:v}`", "[[ ${q:v} -gt 3 ]] && echo big",
    "echo $'a\\'${q:v}'", "echo \"$(case a in a) echo ;; esac; echo \"${q:v}\")\"",
])
def test_a_quoted_reference_where_quoting_does_not_protect_it_is_refused(tmp_path, command):
    """Each of these ran the value as shell through ${q:name} (a reviewer's canaries): refused at load now."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "params": {"v": None}, "stages": [
        {"name": "s", "step": "shell", "params": {"command": command}}]}))
    with pytest.raises(ConfigError, match=r"stages\[0\]\.params\.command: \$\{q:v\} stands inside"):
        load_runbook(str(path))
