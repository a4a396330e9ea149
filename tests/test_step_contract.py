"""The step contract: reversibility said, check and apply required, params declared once, remembered and facts
JSON, plug-ins loaded lazily and isolated, and local steps in the checkout's steps/ folder."""

from __future__ import annotations

import re
import sys
import textwrap
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import pytest
from helpers import overhaul_cli, write
from test_config_errors import INVENTORY, make_hosts_dir

from overhaul.errors import ConfigError
from overhaul.inventory import load_inventory
from overhaul.plan import build_plan
from overhaul.runbook import load_runbook
from overhaul.state import SQLiteState
from overhaul.step import ENTRY_POINT_GROUP, Check, Params, Registry, Step
from overhaul.stepdocs import reference

ROOT = Path(__file__).resolve().parent.parent
UNDECIDED_STEP = '''
from overhaul.command import sh
from overhaul.errors import StepFailed
from overhaul.step import Check, Params, Step


class TouchParams(Params):
    path: str


class Touch(Step[TouchParams]):
    """The docs' first example as an author would write it: it says nothing of undo."""

    name = "acme.touch"

    def check(self, host):
        return Check(host.run(sh("test -f {path}", path=self.params.path)).ok, self.params.path)

    def apply(self, host):
        if not host.run(sh("touch -- {path}", path=self.params.path)).ok:
            raise StepFailed("touch failed")
        return f"created {self.params.path}"
'''


def fenced_python(page: str, start: str) -> str:
    text = (ROOT / "docs" / page).read_text()
    [code] = [block.split("```", 1)[0] for block in text.split("```python\n")[1:] if block.startswith(start)]
    return code


def touch_then_fail(name: str, step: str) -> str:
    """A runbook that creates a marker with `step` on app1, then fails a check: `on_failure: undo` takes over."""
    return textwrap.dedent(f"""
        name: {name}
        on_failure: undo
        params: {{path: null}}
        stages:
          - {{name: make file, step: {step}, hosts: [app1], params: {{path: "${{path}}"}}}}
          - {{name: breaks, step: disk.usage, hosts: [app1], params: {{mounts: [/], threshold: 1}}}}
    """)


# 1. Reversibility must be said -------------------------------------------------------------------------------------


def test_an_undo_refuses_a_change_whose_step_does_not_say_whether_it_can_be_undone(lab, tmp_path, tag):
    """The issue's case: a step that does not mention undo is not 'reversible with nothing to undo'. Its runbook's
    `on_failure: undo` refuses, naming the stage and the step, and the file it made stays (not 'taken back'); the
    plan says so beforehand. The docs' own example (reversible, with undone/undo) is taken back for real."""
    app1 = lab.host("app1")
    write(tmp_path / "steps" / "touch.py", UNDECIDED_STEP)
    write(tmp_path / "steps" / "docs.py", fenced_python("writing-steps.md", "# steps/touch.py"))
    write(tmp_path / "runbooks" / "undecided.yaml", touch_then_fail("undecided", "acme.touch"))
    write(tmp_path / "runbooks" / "documented.yaml", touch_then_fail("documented", "local.touch"))
    common = ("--env", "lab", "--hosts-dir", str(lab.inventory.parent), "--steps-dir", str(tmp_path / "steps"),
              "--runbooks-dir", str(tmp_path / "runbooks"))
    undecided, documented = f"/tmp/contract-undecided-{tag}", f"/tmp/contract-documented-{tag}"
    try:
        planned = overhaul_cli(tmp_path, "plan", "undecided", "--param", f"path={undecided}", *common)
        assert planned.returncode == 0, planned.stdout + planned.stderr
        assert "undo unknown: acme.touch does not say whether its change can be undone" in planned.stdout

        ran = overhaul_cli(tmp_path, "run", "undecided", "--yes", "--param", f"path={undecided}", *common)
        assert ran.returncode == 1, ran.stdout + ran.stderr
        assert "every change this run made was taken back" not in ran.stdout
        assert ("stage 1 make file (acme.touch) changed app1, and its step does not say whether its change can be "
                "undone (set reversible = True with undone/undo, or reversible = False with irreversible)") in ran.stdout
        assert app1.exec(f"test -f {undecided}", check=False).returncode == 0  # nothing was taken back, and not said so

        ran = overhaul_cli(tmp_path, "run", "documented", "--yes", "--param", f"path={documented}", *common)
        assert ran.returncode == 1, ran.stdout + ran.stderr
        assert "rolled back: every change this run made was taken back" in ran.stdout
        assert app1.exec(f"test -e {documented}", check=False).returncode != 0  # really taken back
    finally:
        app1.exec(f"rm -f {undecided} {documented}")


def test_every_built_in_step_that_changes_hosts_says_whether_it_can_be_undone():
    registry = Registry()
    said = {name: registry.get(name).reversible for name in registry.builtin_names()
            if not registry.get(name).read_only}
    assert said == {"app.reconfigure": False, "mysql.backup": True, "mysql.restore": False, "package.upgrade": True,
                    "services.stop": True, "shell": False}
    assert Step.reversible is None  # undecided by default


# 2. check and apply are required -----------------------------------------------------------------------------------


def test_a_step_without_check_or_apply_is_refused_at_registration(tmp_path):
    from overhaul.step import AssertionStep

    class NoCheck(Step[Params]):
        name = "acme.nocheck"

        def apply(self, host):
            return "did it"

    class Neither(Step[Params]):
        name = "acme.neither"

    class Health(AssertionStep):  # read-only: AssertionStep defines apply
        name = "acme.health"

        def check(self, host):
            return Check(True, "fine")

    registry = Registry(entries=[])
    with pytest.raises(ConfigError, match=r"step 'acme.nocheck' \(.*NoCheck\) does not define check:"):
        registry.add(NoCheck)
    with pytest.raises(ConfigError, match=r"step 'acme.neither' .* does not define check and apply"):
        registry.add(Neither)
    registry.add(Health)
    assert registry.names() == ["acme.health"]
    # From a steps/ folder: the module and the step are named, before any runbook runs.
    write(tmp_path / "steps" / "lazy.py", """
        from overhaul.step import Check, Step

        class Lazy(Step):
            name = "acme.lazy"

            def check(self, host):
                return Check(False, "not yet")
    """)
    with pytest.raises(ConfigError, match=r"lazy.py: step 'acme.lazy' .* does not define apply"):
        Registry([tmp_path / "steps"], entries=[])


# 3. Params declared once -------------------------------------------------------------------------------------------


def test_params_are_declared_once_by_the_generic_argument():
    class TouchParams(Params):
        path: str

    class OtherParams(Params):
        other: int = 0

    class Touch(Step[TouchParams]):
        name = "acme.touch"

    assert Touch.Params is TouchParams
    assert Touch(TouchParams(path="/x")).params.path == "/x"

    class Agreeing(Step[TouchParams]):
        Params = TouchParams  # redundant, but it agrees

    assert Agreeing.Params is TouchParams
    with pytest.raises(TypeError, match=r"Disagreeing .*parameters are TouchParams \(Step\[TouchParams\]\) but it "
                                        r"declares Params = OtherParams"):
        class Disagreeing(Step[TouchParams]):
            name = "acme.disagreeing"
            Params = OtherParams

    class Narrower(Touch):  # a subclass without a generic argument inherits (or overrides) Params as before
        Params = OtherParams

    assert Narrower.Params is OtherParams


def test_the_built_in_steps_declare_their_params_once():
    registry = Registry()
    for name in registry.builtin_names():
        step = registry.get(name)
        generic = next((base.__args__[0] for base in step.__dict__.get("__orig_bases__", ())
                        if getattr(base, "__args__", None)), None)
        if generic is not None:
            assert step.Params is generic, name
            source = Path(sys.modules[step.__module__].__file__).read_text()
            assert not re.search(rf"^\s+Params = {generic.__name__}$", source, re.M), f"{name}: Params declared twice"


# 4. remembered and facts are JSON ----------------------------------------------------------------------------------

NOT_JSON_STEP = '''
import datetime

from overhaul.step import Check, Params, Step


class WhenParams(Params):
    where: str
    """remembered or facts: where the datetime goes"""


class When(Step[WhenParams]):
    name = "acme.when"
    reversible = True

    def check(self, host):
        return Check(False, "not yet")

    def apply(self, host):
        host.run("true")
        if self.params.where == "remembered":
            self.remembered["started"] = datetime.datetime.now()
        return "applied"

    def verify(self, host):
        facts = {"checked": [datetime.date.today()]} if self.params.where == "facts" else {}
        return Check(True, "holds", facts)
'''


def test_a_value_that_is_not_json_fails_its_pair_not_the_run(lab, tmp_path):
    """A datetime in `remembered` (or in a verify's facts) fails that pair with a message naming the step and the key;
    the run goes on (the next stage runs), ends failed (exit 1, no traceback), leaves no pair `running`, and an undo
    of it refuses: what the pair remembered could not be journaled."""
    write(tmp_path / "steps" / "when.py", NOT_JSON_STEP)
    write(tmp_path / "runbooks" / "when.yaml", """
        name: when
        stages:
          - {name: remember a date, step: acme.when, hosts: [app1], params: {where: remembered}, on_failure: continue}
          - {name: report a date, step: acme.when, hosts: [app2], params: {where: facts}, on_failure: continue}
          - {name: plain, step: acme.when, hosts: [app2], params: {where: nowhere}}
    """)
    common = ("--env", "lab", "--hosts-dir", str(lab.inventory.parent), "--steps-dir", str(tmp_path / "steps"))
    ran = overhaul_cli(tmp_path, "run", str(tmp_path / "runbooks" / "when.yaml"), "--yes", *common)
    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert "Traceback" not in ran.stdout + ran.stderr
    assert ("step 'acme.when' returned values that are not JSON: remembered['started'] is a datetime" in ran.stdout)
    assert "step 'acme.when' returned values that are not JSON: facts['checked'][0] is a date" in ran.stdout
    journal = SQLiteState(tmp_path / "journal.sqlite")
    [run] = journal.runs("lab")
    assert run.status == "failed"
    outcomes = {(r.stage, r.host): r.outcome for r in journal.results(run.id)}
    assert outcomes == {("remember a date", "app1"): "failed", ("report a date", "app2"): "failed",
                        ("plain", "app2"): "changed"}
    undo = overhaul_cli(tmp_path, "undo", "--run", run.id, "--yes", "--hosts-dir", str(lab.inventory.parent),
                        "--steps-dir", str(tmp_path / "steps"))
    assert undo.returncode == 3, undo.stdout + undo.stderr
    assert ("stage 1 remember a date (acme.when) changed app1, and what it remembered to take that back was not JSON"
            in undo.stdout + undo.stderr)


# 5. Plug-ins loaded lazily and isolated ----------------------------------------------------------------------------


def plugin(folder: Path, package: str, entries: dict[str, str], modules: dict[str, str]) -> Path:
    """An installed plug-in distribution in `folder` (put it on sys.path): its modules and a dist-info with entry
    points, as pip would leave them."""
    for module, code in modules.items():
        write(folder / f"{module}.py", code)
    info = folder / f"{package.replace('-', '_')}-1.0.dist-info"
    write(info / "METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
    write(info / "entry_points.txt", f"[{ENTRY_POINT_GROUP}]\n" +
          "".join(f"{name} = {value}\n" for name, value in entries.items()))
    return folder


GOOD_PLUGIN = '''
import pathlib

from overhaul.step import Check, Params, Step

pathlib.Path(__file__).with_suffix(".imported").open("a").write("imported\\n")


class Ping(Step[Params]):
    name = "acme.ping"
    reversible = True

    def check(self, host):
        return Check(True, "pong")

    def apply(self, host):
        return "pinged"
'''


def test_a_plug_in_is_imported_only_when_a_runbook_uses_it_and_a_broken_one_fails_only_those(tmp_path, monkeypatch):
    site = plugin(tmp_path / "site", "acme-steps", {"acme.ping": "acme_ping:Ping", "acme.broken": "acme_missing.steps:X",
                                                    "acme.raises": "acme_raises:X"},
                  {"acme_ping": GOOD_PLUGIN, "acme_raises": "raise RuntimeError('no config file')\n"})
    monkeypatch.syspath_prepend(str(site))
    registry = Registry()
    assert {"acme.ping", "acme.broken", "acme.raises", "shell"} <= set(registry.names())  # listed, none imported
    assert "acme_ping" not in sys.modules and not (site / "acme_ping.imported").exists()
    with pytest.raises(KeyError, match=r"did you mean 'acme\.broken'"):
        registry.get("acme.brokn")

    hosts = make_hosts_dir(tmp_path)
    (hosts / "staging.yaml").write_text(INVENTORY)
    inventory = load_inventory("staging", hosts)

    def plan(step: str):
        runbook = write(tmp_path / f"{step}.yaml", f"name: t\nstages:\n  - {{name: s, step: {step}, hosts: [app1]}}\n")
        return build_plan(load_runbook(str(runbook)), inventory, registry, {})

    assert plan("disk.usage").hosts == ["app1"]  # a runbook that does not use the broken plug-ins: unaffected
    assert "acme_ping" not in sys.modules
    with pytest.raises(ConfigError) as broken:
        plan("acme.broken")
    assert str(broken.value) == (f"{tmp_path / 'acme.broken.yaml'}:3: stages[0].step: the plug-in of step "
                                 "'acme.broken', entry point acme.broken = acme_missing.steps:X (package acme-steps): "
                                 "cannot be loaded: ModuleNotFoundError: No module named 'acme_missing'")
    with pytest.raises(ConfigError, match=r"entry point acme.raises = acme_raises:X \(package acme-steps\): cannot be "
                                          r"loaded: RuntimeError: no config file"):
        plan("acme.raises")
    assert plan("acme.ping").stages[0].step.name == "acme.ping"
    assert plan("acme.ping").stages[0].step is sys.modules["acme_ping"].Ping
    assert (site / "acme_ping.imported").read_text() == "imported\n"  # once, when first used
    sys.modules.pop("acme_ping", None)


def test_a_plug_in_that_is_not_a_whole_step_is_named_when_used():
    entries = [EntryPoint("acme.half", "overhaul.step:AssertionStep", ENTRY_POINT_GROUP),
               EntryPoint("acme.misnamed", "overhaul.steps.shell:Shell", ENTRY_POINT_GROUP)]
    registry = Registry(entries=entries)
    with pytest.raises(ConfigError, match=r"entry point acme.half = overhaul.step:AssertionStep: .* is not a "
                                          r"Step subclass with a name"):
        registry.get("acme.half")
    with pytest.raises(ConfigError, match=r"entry point acme.misnamed = overhaul.steps.shell:Shell: its class names "
                                          r"itself 'shell'"):
        registry.get("acme.misnamed")


def test_the_steps_reference_lists_built_in_steps_only(tmp_path, monkeypatch):
    """docs/steps.md documents Overhaul's own steps: an installed plug-in (even a broken one) changes nothing there."""
    site = plugin(tmp_path / "site", "acme-steps", {"acme.ping": "acme_ping:Ping", "acme.broken": "acme_missing:X"},
                  {"acme_ping": GOOD_PLUGIN})
    monkeypatch.syspath_prepend(str(site))
    registry = Registry()
    assert "acme.ping" in registry.names() and "acme.ping" not in registry.builtin_names()
    assert registry.builtin_names() == sorted(e.name for e in entry_points(group=ENTRY_POINT_GROUP)
                                              if e.dist is not None and e.dist.name == "overhaul")
    assert reference(registry) == (ROOT / "docs" / "steps.md").read_text()
    assert "acme_ping" not in sys.modules


# 6. Local steps in the checkout's steps/ folder --------------------------------------------------------------------

NGINX_STEP = '''
from overhaul.step import Check, Params, Step


class ReloadParams(Params):
    unit: str = "nginx"


class NginxReload(Step[ReloadParams]):
    name = "acme.nginx-reload"
    reversible = True

    def check(self, host):
        return Check(False, "reload")

    def apply(self, host):
        return "reloaded"
'''


def test_an_operators_step_in_a_folder_that_is_also_the_built_in_package_loads(tmp_path, monkeypatch):
    """The checkout's case, on a package of its own: `registry(steps_dir)` of the command line, given the folder of
    the built-in package, loads an operator's module there (steps/nginx.py) and leaves the built-in modules to their
    entry points: not imported until used, then imported once, under their own name."""
    import overhaul.api
    import overhaul.step

    package = f"contract_builtin_{tmp_path.name.replace('-', '_')}"
    folder = tmp_path / "site" / package
    write(folder / "__init__.py", "")
    write(folder / "shell.py", GOOD_PLUGIN)  # a built-in module: an entry point names it
    write(folder / "nginx.py", NGINX_STEP)  # the operator's own
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(overhaul.step, "BUILTIN_PACKAGE", package)
    fake = [EntryPoint("acme.ping", f"{package}.shell:Ping", ENTRY_POINT_GROUP)]
    monkeypatch.setattr(overhaul.step, "entry_points", lambda group: fake if group == ENTRY_POINT_GROUP else [])
    try:
        registry = overhaul.api.registry(str(folder))
        assert registry.names() == ["acme.nginx-reload", "acme.ping"]
        nginx = registry.get("acme.nginx-reload")
        assert nginx.__module__ == f"{package}.nginx" and nginx.Params.__name__ == "ReloadParams"
        assert not (folder / "shell.imported").exists()  # the built-in module: not imported by the folder's loading
        assert registry.get("acme.ping") is sys.modules[f"{package}.shell"].Ping
        assert (folder / "shell.imported").read_text() == "imported\n"  # once
        assert not [name for name in sys.modules if name.startswith("overhaul_local_steps.")
                    and name.endswith(("shell", "nginx"))]
    finally:
        for name in [name for name in sys.modules if name.startswith(package)]:
            del sys.modules[name]

