"""Redaction against hostile input (issue 23): secrets redacted in structured values, never in JSON text; shell-quoted
secrets; secrets that overlap or are part of the mark; one expression; and URLs with userinfo (a webhook's
`user:token@`), redacted wherever a run stores or shows them."""

from __future__ import annotations

import base64
import json
import random
import re
import shlex
import time
import urllib.parse
from pathlib import Path

import pytest
from helpers import overhaul_cli, plan_for, write
from webhook import Receiver, closed_port, receiving

from overhaul.alerts import NotifyConfig, RunInfo, RunNotifier, WebhookSettings, notify, split_userinfo
from overhaul.execution import _journal_new_run
from overhaul.inventory import load_inventory_file
from overhaul.runner import UNDO_FACTS
from overhaul.secrets import REDACTED, Redactor, encodings, url_secrets
from overhaul.state import SQLiteState

# -- redaction in values: the JSON stays JSON ------------------------------------------------------------------------

BACKUP = {"path": "/var/backups/db-20261207.sql.gz", "size": 2026}


def test_a_short_secret_in_a_fact_leaves_the_path_the_way_back_reads_keys_numbers_and_json_intact():
    redactor = Redactor()
    redactor.add("2026")
    with pytest.raises(json.JSONDecodeError):  # what redacting the JSON text did: "size": ******** is no JSON
        json.loads(redactor(json.dumps(BACKUP)))
    redacted = redactor.walk(BACKUP)
    # 2026 glued to 1207 is a date, not the secret: the path rollback restores from stays a path
    assert redacted == {"path": "/var/backups/db-20261207.sql.gz", "size": 2026}
    assert json.loads(json.dumps(redacted)) == redacted and type(redacted["size"]) is int
    assert BACKUP == {"path": "/var/backups/db-20261207.sql.gz", "size": 2026}  # the step's own value is untouched


def test_walk_goes_through_nested_values_and_leaves_every_non_string_as_it_is():
    redactor = Redactor()
    redactor.add("2026")
    fact = {"backups": [{"file": "db-2026.sql", "bytes": 2026, "ratio": 2026.0}, ("2026", None, True)],
            "ok": False, "note": None, "2026-key": "x", "sha256": "ab2026cd", "said": "password=2026"}
    assert redactor.walk(fact) == {
        "backups": [{"file": "db-********.sql", "bytes": 2026, "ratio": 2026.0}, [REDACTED, None, True]],
        "ok": False, "note": None, "2026-key": "x",  # keys are names the step chose: left as they are
        "sha256": "ab2026cd",  # inside a digest: a coincidence, and the digest is what restore checks
        "said": f"password={REDACTED}"}  # standing on its own: the secret
    assert redactor.walk("2026") == REDACTED and redactor.walk(2026) == 2026 and redactor.walk([]) == []


def test_a_secret_that_looks_like_json_syntax_cannot_change_the_document():
    redactor = Redactor()
    redactor.add('", "size')  # in the JSON text it spans a value's end and a key: redacting the text ate them
    assert redactor(json.dumps({"path": "x", "size": 1})) == '{"path": "x********": 1}'  # no JSON any more
    assert redactor.walk({"path": "x", "size": 1}) == {"path": "x", "size": 1}  # no value holds it
    assert redactor.walk({"note": 'said ", "size loudly', "size": 1}) == {"note": f"said {REDACTED} loudly", "size": 1}


# -- the shell-quoted forms of a secret ------------------------------------------------------------------------------

QUOTED = "it's-a s3cret"  # a quote and a space: shlex.quote writes 'it'"'"'s-a s3cret'


@pytest.mark.parametrize("shown", [
    shlex.quote(QUOTED),                                   # 'it'"'"'s-a s3cret'
    shlex.quote(f"--password={QUOTED}"),                   # split by the quoting inside a longer word
    shlex.quote(QUOTED)[1:-1],                             # the same, the outer quotes elsewhere
    "'" + QUOTED.replace("'", "'\\''") + "'",              # the other common form: 'it'\''s-a s3cret'
    '"' + QUOTED.replace('"', '\\"') + '"',                # double quotes: the value as it is
    shlex.join(["mysql", "-p" + QUOTED, "-e", "select 1"]),
], ids=["shlex.quote", "inside-a-quoted-word", "unquoted-ends", "backslash-form", "double-quoted", "shlex.join"])
def test_the_shell_quoted_forms_of_a_secret_with_a_quote_are_redacted(shown):
    redactor = Redactor()
    redactor.add(QUOTED)
    text = redactor(f"$ {shown} # done")
    assert REDACTED in text and "s3cret" not in text and "it'" not in text, text


def test_a_secret_with_shell_specials_is_redacted_inside_double_quotes_too():
    secret = 'pa$$ "w`rd\\'
    redactor = Redactor()
    redactor.add(secret)
    escaped = re.sub(r'(["$`\\])', r"\\\1", secret)  # what a double-quoted shell word holds
    assert escaped in encodings(secret) and shlex.quote(secret) in encodings(secret)
    assert redactor(f'echo "{escaped}" {shlex.quote(secret)}') == f'echo "{REDACTED}" {REDACTED}'


def test_the_shell_forms_of_a_secret_without_quotes_change_nothing_else():
    redactor = Redactor()
    redactor.add("plain-s3cret")
    assert redactor("run 'plain-s3cret' and \"plain-s3cret\" and plain-s3cret") == \
        f"run '{REDACTED}' and \"{REDACTED}\" and {REDACTED}"


# -- secrets that overlap, contain each other, or are part of the mark -----------------------------------------------

def test_overlapping_secrets_leave_no_fragment_and_the_longest_wins():
    redactor = Redactor()
    redactor.add("1234567890")
    redactor.add("7890abcd")  # starts inside the first one
    assert redactor("x=1234567890abcd;") == f"x={REDACTED};"  # one stretch: neither "abcd" nor "123456" is left
    assert redactor("x=7890abcd 1234567890") == f"x={REDACTED} {REDACTED}"
    redactor.add("token")
    redactor.add("token-and-more")  # one contains the other: the longest is matched where both start
    assert redactor("a token-and-more b token c") == f"a {REDACTED} b {REDACTED} c"
    assert redactor("tokentoken") == REDACTED + REDACTED  # touching, not overlapping: each is redacted


@pytest.mark.parametrize("secret", ["****", "*****", "********", "**********"])
def test_a_secret_that_is_part_of_the_mark_cannot_eat_into_marks(secret):
    redactor = Redactor()
    redactor.add("Long-s3cret-value")
    redactor.add(secret)
    once = redactor(f"a Long-s3cret-value b {secret} c")
    assert once == f"a {REDACTED} b {REDACTED} c"
    assert redactor(once) == once  # a mark is never taken for the secret: redacting twice changes nothing
    assert redactor(REDACTED + REDACTED) == REDACTED + REDACTED


def test_long_runs_of_a_secret_or_of_marks_take_one_pass():
    stars, letters = Redactor(), Redactor()
    stars.add("****")
    letters.add("aaaa")
    began = time.perf_counter()
    assert stars(REDACTED * 25_000) == REDACTED * 25_000  # 200,000 asterisks: whole marks, left as they are
    assert stars("*" * 200_001) == REDACTED  # not whole marks: the secret, overlapping itself, is one stretch
    assert letters("a" * 1_000_000 + "b") == REDACTED + "b"
    assert time.perf_counter() - began < 5  # here about 0.5 s; no stretch is scanned again for each match in it


def test_a_secret_that_contains_the_mark_is_still_redacted():
    redactor = Redactor()
    redactor.add(f"x{REDACTED}y")
    assert redactor(f"pw=x{REDACTED}y;") == f"pw={REDACTED};"


def _reference(text: str, values: set[str]) -> str:
    """What redaction means, by brute force: every occurrence of every form, overlapping ones merged."""
    spans = sorted((i, i + len(v)) for v in values for i in range(len(text)) if text.startswith(v, i))
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    out, done = [], 0
    for start, end in merged:
        out += [text[done:start], REDACTED]
        done = end
    return "".join(out) + text[done:]


def test_one_pass_agrees_with_brute_force_on_random_overlapping_secrets():
    rnd = random.Random(23)
    for _ in range(300):
        # Two letters: secrets overlap, nest and repeat all the time.
        secrets = {"".join(rnd.choice("ab") for _ in range(rnd.randint(4, 7))) for _ in range(rnd.randint(1, 4))}
        text = "".join(rnd.choice("aaabbb ") for _ in range(rnd.randint(0, 80)))
        redactor = Redactor()
        for secret in secrets:
            redactor.add(secret)
        values = set().union(*(encodings(secret) for secret in secrets))
        expected = _reference(text, values)
        assert redactor(text) == expected, (secrets, text)
        assert not any(secret in redactor(text) for secret in secrets)


# -- one compiled expression, rebuilt when a secret is added; fast ---------------------------------------------------

def test_the_expression_is_built_once_per_new_secret_and_not_per_call():
    redactor = Redactor()
    assert redactor._expression()[0] is None and redactor("nothing known") == "nothing known"
    redactor.add("first-s3cret")
    pattern = redactor._expression()[0]
    assert redactor("first-s3cret") == REDACTED and redactor._expression()[0] is pattern  # used, not rebuilt
    redactor.add("first-s3cret")  # told again (the sudo password is, at every command): no rebuild
    assert redactor._expression()[0] is pattern
    redactor.add("abc")  # too short to be redacted: no rebuild either
    assert redactor._expression()[0] is pattern
    redactor.add("second-s3cret")
    assert redactor._expression()[0] is not pattern
    assert redactor("second-s3cret first-s3cret") == f"{REDACTED} {REDACTED}"


def test_redacting_a_megabyte_with_hundreds_of_secrets_is_fast():
    rnd = random.Random(7)
    characters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    secrets = ["".join(rnd.choice(characters) for _ in range(24)) for _ in range(300)]
    redactor = Redactor()
    began = time.perf_counter()
    for secret in secrets:
        redactor.add(secret)
    added = time.perf_counter() - began
    lines = ["".join(rnd.choice(characters + " /") for _ in range(99)) for _ in range(10_000)]  # 1 MB of output
    for number in range(0, len(lines), 100):
        lines[number] += secrets[number % len(secrets)]
    text = "\n".join(lines)
    began = time.perf_counter()
    redacted = redactor(text)
    took = time.perf_counter() - began
    print(f"\n300 secrets ({len(redactor._values)} forms) added in {added:.2f} s; 1 MB redacted in {took:.3f} s")
    assert redacted.count(REDACTED) >= 100 and not any(secret in redacted for secret in secrets)
    assert took < 2.0  # here about 0.1 s; one str.replace per form took longer than the whole pass


# -- URLs with userinfo --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("POST https://hook:S3cr3tTok@relay.example.com/services/x", f"POST https://{REDACTED}@relay.example.com/services/x"),
    ("git clone https://ghp_abcdefgh123@github.com/o/r.git", f"git clone https://{REDACTED}@github.com/o/r.git"),
    ("fetch http://u:p@ss@127.0.0.1:8080/x", f"fetch http://{REDACTED}@127.0.0.1:8080/x"),  # a raw @ in the password
    ("mirror='https://ci:Other-Pass-77@repo.example.com/'", f"mirror='https://{REDACTED}@repo.example.com/'"),
    ("ssh://git@github.com/o/r.git and ssh://deploy:pw12@host/", f"ssh://git@github.com/o/r.git and ssh://{REDACTED}@host/"),
    ("https://example.com/?mail=a@b.com and https://example.com/x@y", None),  # no userinfo: unchanged
    ("https://s3.example.com/b/k?X-Amz-Signature=abcdef0123&x=1&token=t0k3n#top",
     f"https://s3.example.com/b/k?X-Amz-Signature={REDACTED}&x=1&token={REDACTED}#top"),
    ("curl 'https://api.example.com/v1?api_key=AKIA1234&page=2'", f"curl 'https://api.example.com/v1?api_key={REDACTED}&page=2'"),
    ("a=1&b=2 monkey=banana", None),
])
def test_any_url_userinfo_and_token_parameter_is_redacted_known_or_not(text, expected):
    redactor = Redactor()  # told nothing
    assert redactor(text) == (text if expected is None else expected)
    assert redactor(redactor(text)) == redactor(text)


def test_a_url_told_to_the_redactor_teaches_it_the_password_and_the_basic_header():
    redactor = Redactor()
    redactor.add("https://hook:S3cr3tTok@relay.example.com/services/x")
    assert url_secrets("https://hook:S3cr3tTok@relay.example.com/x") >= {"S3cr3tTok", "hook:S3cr3tTok"}
    basic = base64.b64encode(b"hook:S3cr3tTok").decode()
    text = redactor(f"password S3cr3tTok, header Authorization: Basic {basic}, quoted {shlex.quote('S3cr3tTok')}")
    assert text == f"password {REDACTED}, header Authorization: Basic {REDACTED}, quoted {REDACTED}"
    assert redactor("hook is a user name, not a secret") == "hook is a user name, not a secret"
    assert url_secrets("https://relay.example.com/x") == set() and url_secrets("not a url") == set()
    assert url_secrets("ssh://git@github.com/") == set()  # a login name on ssh


# -- the webhook: userinfo is sent as Basic authorization, never shown -----------------------------------------------

TOKEN = "T0001/B0002/s3cr3t-token"
PASSWORD = "S3cr3tTok"


@pytest.fixture
def hook():
    with receiving() as port:
        yield port


def test_a_webhook_with_userinfo_is_posted_with_basic_authorization(hook):
    notify(f"http://hook:{PASSWORD}@127.0.0.1:{hook}/services/{TOKEN}", "hello", wait=0.1)
    [(path, headers, body)] = Receiver.received
    authorization, host = headers["Authorization"], headers["Host"]
    assert path == f"/services/{TOKEN}" and body == {"text": "hello"}
    assert authorization == "Basic " + base64.b64encode(f"hook:{PASSWORD}".encode()).decode()
    assert host == f"127.0.0.1:{hook}"
    assert split_userinfo("https://a%40b:p%3Aw@h.example/x") == (
        "https://h.example/x", "Basic " + base64.b64encode(b"a@b:p:w").decode())
    assert split_userinfo("https://h.example/x") == ("https://h.example/x", None)


@pytest.mark.parametrize("url", [
    f"http://hook:{PASSWORD}@127.0.0.1/services/{TOKEN}",  # no port: urllib once said "nonnumeric port: 'S3cr3tTok@..."
    f"http://hook:{PASSWORD}@127.0.0.1:{{port}}/services/{TOKEN}",
], ids=["no-port", "closed-port"])
def test_a_webhook_with_userinfo_that_is_down_is_reported_without_its_password(url):
    url = url.replace("{port}", str(closed_port()))
    reported: list[str] = []
    notifier = RunNotifier(NotifyConfig(webhook=WebhookSettings(url_secret={"env": "UNUSED"})), url, reported.append,
                           retry_wait=0.05)
    [problem] = notifier.started(RunInfo("production", "upgrade", "r1", "ci"))
    print("\n" + problem)
    assert problem == reported[0] and "was not told after 2 attempts" in problem
    assert PASSWORD not in problem and "s3cr3t" not in problem and "hook:" not in problem


def test_the_webhook_password_is_known_to_the_run_redactor_as_soon_as_the_inventory_is_read(tmp_path, monkeypatch):
    write(tmp_path / "hosts/known_hosts", "")
    path = write(tmp_path / "hosts/production.yaml", "environment: production\nssh: {known_hosts: known_hosts}\n"
                 "hosts:\n  - {name: db1, address: 10.0.1.10, roles: [db]}\n"
                 "notify:\n  webhook: {url_secret: {env: PROD_HOOK}}\n")
    monkeypatch.setenv("PROD_HOOK", f"https://hook:{PASSWORD}@relay.example.com/services/{TOKEN}")
    redactor = Redactor()
    reported: list[str] = []
    notifier = RunNotifier.for_inventory(load_inventory_file(path), on_problem=reported.append, redactor=redactor)
    assert redactor(f"curl -u hook:{PASSWORD} https://relay.example.com/services/{TOKEN}") == \
        f"curl -u {REDACTED} {REDACTED}"
    assert redactor(f"the password alone: {PASSWORD}") == f"the password alone: {REDACTED}"
    redactor.add("another-run-s3cret")  # what the run's steps read later: a notifier's problem is redacted too
    assert notifier._problem("metrics: cannot write /x/another-run-s3cret.prom") == [f"metrics: cannot write /x/{REDACTED}.prom"]
    assert reported == [f"metrics: cannot write /x/{REDACTED}.prom"]


def test_a_run_s_parameters_are_journaled_redacted_in_values_with_numbers_intact(tmp_path):
    write(tmp_path / "hosts/known_hosts", "")
    inventory = load_inventory_file(write(tmp_path / "hosts/production.yaml", "environment: production\n"
                                          "ssh: {known_hosts: known_hosts}\n"
                                          "hosts:\n  - {name: db1, address: 10.0.1.10, roles: [db]}\n"))
    plan = plan_for("""
        name: keep
        params: {keep_days: 1, label: "", paths: []}
        stages:
          - {name: prune, step: shell, hosts: [db1], params: {command: "echo ${label}"}}
    """, tmp_path, inventory, params={"keep_days": 2026, "label": "nightly-2026", "paths": ["/b/2026.gz", 2026]})
    plan.redactor.add("2026")
    state = SQLiteState(tmp_path / "journal.sqlite")
    _journal_new_run(state, plan, "run-1")  # what a run journals first, before it connects anywhere
    [record] = state.runs("production")
    assert record.params == {"keep_days": 2026, "label": "nightly-********", "paths": [f"/b/{REDACTED}.gz", 2026]}
    assert plan.run_params["label"] == "nightly-2026"  # the plan itself keeps the real value


# -- on the lab: what a run journals, `show` shows and `state.export` writes ------------------------------------------

def _everything_written(tmp_path: Path, run_id: str, env: dict | None = None) -> dict[str, str]:
    """The run as every reader sees it: show, show --json, state.export, the journal's files and the host logs."""
    shown = overhaul_cli(tmp_path, "show", run_id, env=env)
    as_json = overhaul_cli(tmp_path, "show", run_id, "--json", env=env)
    exported = overhaul_cli(tmp_path, "state.export", env=env)
    for proc in (shown, as_json, exported):
        assert proc.returncode == 0, proc.stdout + proc.stderr
    texts = {"show": shown.stdout, "show --json": as_json.stdout, "state.export": exported.stdout}
    from test_web import Served  # the web pages of `overhaul serve`, as a browser receives them

    served = Served(tmp_path, {"OVERHAUL_JOURNAL": str(tmp_path / "journal.sqlite"), **(env or {})})
    try:
        for page in ("/", "/history?all=1", f"/runs/{run_id}", f"/runs/{run_id}.json", "/history.json?all=1"):
            status, body = served.get(page)
            assert status == 200, (page, body)
            texts[f"web page {page}"] = body
    finally:
        served.close()
    logs = list((tmp_path / "runs" / run_id).glob("*.log"))
    texts |= {str(path): path.read_bytes().decode(errors="replace") for path in [*logs, *tmp_path.glob("journal.sqlite*")]}
    return texts


def test_a_webhook_url_with_userinfo_never_reaches_the_journal_show_or_export(lab, tmp_path, hook):
    hosts = lab.inventory.parent  # beside the lab's inventory: its relative key paths hold
    inventory_file = hosts / "userinfo.yaml"
    write(inventory_file, lab.inventory.read_text().replace("environment: lab", "environment: userinfo")
          + "notify:\n  webhook: {url_secret: {env: OVERHAUL_TEST_WEBHOOK}}\n")
    write(tmp_path / "runbooks/creds.yaml", """
        name: creds
        params: {mirror: ""}
        stages:
          - name: prints urls
            step: shell
            hosts: [app1]
            params:
              command: "echo posting to http://hook:S3cr3tTok@127.0.0.1:1/other; echo from ${mirror}; echo S3cr3tTok"
          - name: fails with one
            step: shell
            hosts: [app1]
            retry: {attempts: 1}
            params: {command: "echo fetch https://ci:Other-Pass-77@repo.example.com/pool/app.deb >&2; exit 3"}
    """)
    args = ("run", "creds", "--env", "userinfo", "--hosts-dir", str(hosts), "--runbooks-dir", str(tmp_path / "runbooks"),
            "--param", "mirror=https://ci:Other-Pass-77@repo.example.com/")
    webhook = f"http://hook:{PASSWORD}@127.0.0.1:{hook}/services/{TOKEN}"
    down = f"http://hook:{PASSWORD}@127.0.0.1/services/{TOKEN}"  # port 80, where nothing listens here
    try:
        told = overhaul_cli(tmp_path, *args, env={"OVERHAUL_TEST_WEBHOOK": webhook})
        unheard = overhaul_cli(tmp_path, *args, env={"OVERHAUL_TEST_WEBHOOK": down})
    finally:
        inventory_file.unlink()
    assert told.returncode == 1 and unheard.returncode == 1, told.stdout + told.stderr + unheard.stdout + unheard.stderr

    basic = "Basic " + base64.b64encode(f"hook:{PASSWORD}".encode()).decode()
    assert [(path, headers["Authorization"]) for path, headers, _ in Receiver.received] == [(f"/services/{TOKEN}", basic)] * 2
    state = SQLiteState(tmp_path / "journal.sqlite")
    first, second = sorted(state.runs("userinfo"), key=lambda run: run.started)
    assert first.params == {"mirror": f"https://{REDACTED}@repo.example.com/"}
    problems = [detail for _, run_id, kind, detail in state.events("userinfo") if run_id == second.id and kind == "notify"]
    assert problems, "the webhook on port 80 was expected to be down"
    failed = [pair for pair in state.results(first.id) if pair.outcome == "failed"]
    assert failed and f"https://{REDACTED}@repo.example.com" in failed[0].message

    texts = {"console": told.stdout + told.stderr + unheard.stdout + unheard.stderr}
    for record in (first, second):
        texts |= {f"{record.id} {where}": text for where, text in _everything_written(tmp_path, record.id).items()}
    assert REDACTED in texts[f"{first.id} show"] and "posting to http://" in texts[f"{first.id} state.export"]
    forms = [PASSWORD, "Other-Pass-77", urllib.parse.quote(PASSWORD), TOKEN, "hook:"]
    for where, text in texts.items():
        for form in forms:
            assert form not in text, (where, form)


FACT_STEP = '''
from overhaul.step import Check, Params, Step


class BackupParams(Params):
    pass


class Backup(Step[BackupParams]):
    """Reports a backup whose file name holds the secret (a date) and whose size equals it."""

    name = "local.backup"
    Params = BackupParams

    def secrets(self):
        return ["pin"]

    def check(self, host):
        return Check(False, "not yet")

    def apply(self, host):
        host.secret("pin")
        return "backed up"

    def verify(self, host):
        return Check(True, "ok", {"path": "/var/backups/db-20261207.sql.gz", "size": 2026,
                                  "kept": [{"file": "db-20261130.sql.gz", "size": 1999}]})
'''


def test_a_short_secret_in_a_fact_keeps_the_journal_valid_json_with_numbers_intact(lab, tmp_path):
    (tmp_path / "pin.secret").write_text("2026\n")
    (tmp_path / "pin.secret").chmod(0o600)
    hosts = lab.inventory.parent
    inventory_file = hosts / "pin.yaml"
    text = lab.inventory.read_text().replace("environment: lab", "environment: pin")
    write(inventory_file, text.replace("secrets:\n", f"secrets:\n  pin: {{file: {tmp_path / 'pin.secret'}}}\n"))
    write(tmp_path / "steps/backup.py", FACT_STEP)
    write(tmp_path / "runbooks/backup.yaml", """
        name: backup
        params: {label: ""}
        stages:
          - {name: back up, step: local.backup, hosts: [db1]}
    """)
    try:
        proc = overhaul_cli(tmp_path, "run", "backup", "--env", "pin", "--hosts-dir", str(hosts), "--steps-dir",
                            str(tmp_path / "steps"), "--runbooks-dir", str(tmp_path / "runbooks"), "--param",
                            "label=nightly-2026")
    finally:
        inventory_file.unlink()
    assert proc.returncode == 0, proc.stdout + proc.stderr

    expected = {"path": "/var/backups/db-20261207.sql.gz", "size": 2026,  # the path rollback reads: whole
                "kept": [{"file": "db-20261130.sql.gz", "size": 1999}]}
    state = SQLiteState(tmp_path / "journal.sqlite")
    [record] = state.runs("pin")
    [pair] = state.results(record.id)
    assert {name: value for name, value in pair.facts.items() if name != UNDO_FACTS} == expected
    assert type(pair.facts["size"]) is int
    assert record.params == {"label": "nightly-********"}

    texts = _everything_written(tmp_path, record.id)
    shown = json.loads(texts["show --json"])  # valid JSON, and the same facts
    assert shown["pairs"][0]["facts"] == pair.facts and shown["run"]["params"] == record.params
    rows = [json.loads(line) for line in texts["state.export"].splitlines()]  # every line valid JSON
    [result] = [row["row"] for row in rows if row["table"] == "results" and row["row"]["run_id"] == record.id]
    assert json.loads(result["facts"]) == pair.facts
    facts_line = next(line for line in texts["show"].splitlines() if line.strip().startswith("facts: "))
    assert json.loads(facts_line.split("facts: ", 1)[1]) == pair.facts
