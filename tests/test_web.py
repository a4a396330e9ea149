"""`overhaul serve`: the journal as web pages, read in a real browser (Debian's chromium, headless, by Selenium).

The server is the `overhaul serve` command, over the journal the lab's runs wrote (SQLite, and PostgreSQL for two
controllers). Screenshots of each page are written to OVERHAUL_SCREENSHOTS when it is set (the docs' images).
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import overhaul_cli, write
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from overhaul.state import ResultRecord, RunRecord, SQLiteState

CHROMIUM = "/usr/bin/chromium"  # Debian's (make test installs chromium and chromium-driver)
CHROMEDRIVER = "/usr/bin/chromedriver"
SHOTS = os.environ.get("OVERHAUL_SCREENSHOTS", "")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Served:
    """An `overhaul serve` process on a port of its own, over the journal `env` names."""

    def __init__(self, cwd: Path, env: dict[str, str], *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "overhaul", "serve", "--listen", f"127.0.0.1:{self.port}",
                                         *args], cwd=cwd, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"overhaul serve did not start: {self.process.communicate()[0]}") from None
                time.sleep(0.1)

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        request = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def shot(browser: webdriver.Chrome, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(Path(SHOTS) / f"{name}.png"))


def wait_for(condition, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_the_pages_show_the_lab_its_history_a_live_run_and_a_failed_pairs_output(lab, tmp_path, browser, tag):
    hosts = ("--hosts-dir", str(lab.inventory.parent))
    env = {"OVERHAUL_JOURNAL": str(tmp_path / "journal.sqlite")}
    assert overhaul_cli(tmp_path, "verify", "--env", "lab", "--no-checks", *hosts).returncode == 0
    write(tmp_path / "runbooks" / "slow.yaml", f"""
        name: slow
        stages:
          - {{name: one by one, step: shell, strategy: serial, hosts: [app1, app2],
             params: {{command: "sleep 3; echo {tag}"}}}}
          - {{name: break, step: shell, hosts: [app2], params: {{command: "echo about to fail {tag}; exit 3"}}}}
    """)
    served = Served(tmp_path, env, *hosts)
    try:
        browser.get(served.url + "/")
        assert browser.find_element(By.ID, "env-lab").is_displayed()
        shown = browser.find_element(By.ID, "env-lab").text
        assert "expected version: unknown" in shown and "not locked" in shown, shown  # (no upgrade in this journal)
        assert re.search(r"^app1 ok 1\.0\.0$", shown, re.M), shown  # each host's last outcome and version read
        shot(browser, "environments")
        status, document = served.get("/environments.json")
        [lab_env] = [env for env in json.loads(document)["environments"] if env["name"] == "lab"]
        assert status == 200 and {"host": "app1", "outcome": "ok", "version": "1.0.0"}.items() <= \
            next(host for host in lab_env["hosts"] if host["host"] == "app1").items()

        running = subprocess.Popen([sys.executable, "-m", "overhaul", "run", "slow", "--env", "lab", *hosts,
                                    "--runbooks-dir", str(tmp_path / "runbooks")], cwd=tmp_path,
                                   env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        journal = SQLiteState(tmp_path / "journal.sqlite")
        wait_for(lambda: any(r.runbook == "slow" for r in journal.runs("lab", 5)), "the run was never journaled")
        [run] = [r for r in journal.runs("lab", 5) if r.runbook == "slow"]
        browser.get(served.url + "/history")
        assert run.id in browser.find_element(By.ID, "runs").text  # a run started from the command line is listed
        shot(browser, "history")
        browser.get(served.url + f"/runs/{run.id}")
        browser.execute_script("window.sameDocument = true")  # gone if the page reloads

        def cells() -> list[str]:  # read at once in the page (its matrix is replaced as the run goes)
            return browser.execute_script(
                "return [...document.querySelectorAll('#matrix td.cell')].map(cell => cell.textContent.trim())")

        seen = [cells()]
        wait_for(lambda: seen.append(cells()) or "failed" in seen[-1], "the matrix never showed the failed pair", 120)
        running.communicate(timeout=120)
        assert browser.execute_script("return window.sameDocument") is True  # filled in live, with no reload
        finished = [sum(text in ("changed", "ok", "failed") for text in shown) for shown in seen]
        assert finished[0] < finished[-1] and sorted(finished) == finished, seen  # pair by pair as they ended
        wait_for(lambda: browser.find_element(By.ID, "status").text == "failed", "the status never turned failed")
        preflight = browser.find_element(By.ID, "preflight").text  # the gate's table, as the run journaled it
        assert re.search(r"app1\s+ok\s+ok\s+-", preflight) and re.search(r"app2\s+ok\s+ok\s+ok", preflight), preflight
        pair = browser.find_element(By.ID, "pair-2-app2")
        assert f"about to fail {tag}" in pair.find_element(By.CSS_SELECTOR, "pre.output").text
        shot(browser, "run")
        status, document = served.get(f"/runs/{run.id}.json")  # the same document as `show --json`
        assert status == 200
        served_document = json.loads(document)
        assert served_document == json.loads(overhaul_cli(tmp_path, "show", run.id, "--json").stdout)
        # (both are show_document's: what it holds is asserted too, or a document missing a part would pass)
        [broken] = [p for p in served_document["pairs"] if p["stage_number"] == 2 and p["host"] == "app2"]
        assert broken["outcome"] == "failed" and served_document["run"]["id"] == run.id
        assert [c["exit_code"] for c in served_document["commands"] if c["host"] == "app2" and c["stage_number"] == 2
                ][-1] == 3
        assert "preflight" in [event["kind"] for event in served_document["events"]]
    finally:
        served.close()


def test_html_in_a_journaled_name_or_output_is_shown_as_text(tmp_path, browser):
    journal = SQLiteState(tmp_path / "journal.sqlite")
    hostile = "<script>document.title='owned'</script><b>x</b>"
    run = RunRecord("20261207T000000-abcdef", "evil<i>book</i>", "/nowhere.yaml", "0" * 64, "lab", {"note": hostile},
                    "root@vm", time.time(), time.time(), "failed")
    journal.start_run(run)
    journal.record(ResultRecord(run.id, 0, "stage <img src=x onerror=alert(1)>", hostile, "failed", 1, time.time(),
                                time.time(), f"exited 1: {hostile}"))
    served = Served(tmp_path, {"OVERHAUL_JOURNAL": str(tmp_path / "journal.sqlite")})
    try:
        for path in ("/", "/history", f"/runs/{run.id}"):
            browser.get(served.url + path)
            assert browser.title != "owned"
            assert not browser.find_elements(By.CSS_SELECTOR, "body b, body i, body img")  # no markup of theirs
        assert hostile in browser.find_element(By.ID, "matrix").text  # the host's name, as text
        assert f"exited 1: {hostile}" in browser.find_element(By.ID, f"pair-1-{hostile}").text
        assert "evil<i>book</i>" in browser.find_element(By.TAG_NAME, "h1").text
    finally:
        served.close()


def test_with_a_token_every_request_must_carry_it(tmp_path):
    write(tmp_path / "token", "s3cret-token\n")
    write(tmp_path / "overhaul.yaml", f"web:\n  token: {{file: {tmp_path / 'token'}}}\n")
    (tmp_path / "token").chmod(0o600)
    served = Served(tmp_path, {"OVERHAUL_JOURNAL": str(tmp_path / "journal.sqlite")})
    try:
        for path in ("/", "/history", "/history.json", "/runs/last"):
            status, _ = served.get(path)
            assert status == 401, path
        assert served.get("/", {"Authorization": "Bearer wrong"})[0] == 401
        assert served.get("/", {"Authorization": "Bearer s3cret-token"})[0] == 200
        basic = base64.b64encode(b"anyone:s3cret-token").decode()
        assert served.get("/history.json", {"Authorization": f"Basic {basic}"})[0] == 200
    finally:
        served.close()


def test_a_non_loopback_address_without_a_token_is_refused(tmp_path):
    write(tmp_path / "overhaul.yaml", "state: sqlite\n")
    refused = overhaul_cli(tmp_path, "serve", "--listen", "0.0.0.0:8040")
    assert refused.returncode == 3
    assert "not a loopback address, and overhaul.yaml has no web.token" in refused.stderr


def test_two_controllers_runs_on_postgresql_appear_on_one_page(lab, tmp_path, postgres, browser):
    url = postgres.database()
    env = {"OVERHAUL_STATE": url, "PGPASSFILE": str(postgres.passfile)}
    write(tmp_path / "runbooks" / "hello.yaml", """
        name: hello
        stages:
          - {name: hello, step: shell, hosts: [app1], params: {command: "true"}}
    """)
    ids = []
    for machine in ("controller-a", "controller-b"):
        folder = tmp_path / machine
        folder.mkdir()
        proc = overhaul_cli(folder, "run", "hello", "--env", "lab", "--hosts-dir", str(lab.inventory.parent),
                            "--runbooks-dir", str(tmp_path / "runbooks"), env={**env, "USER": machine})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        ids.append(re.search(r"^run (\S+):", proc.stdout, re.M).group(1))
    served = Served(tmp_path, env)
    try:
        browser.get(served.url + "/history")
        listed = browser.find_element(By.ID, "runs").text
        assert all(run_id in listed for run_id in ids), listed
    finally:
        served.close()


def test_with_web_url_set_a_runs_last_line_and_its_notification_link_its_page(lab, tmp_path, monkeypatch):
    write(tmp_path / "overhaul.yaml", "web:\n  url: https://overhaul.example.internal/\n")
    write(tmp_path / "runbooks" / "hello.yaml", """
        name: hello
        stages:
          - {name: hello, step: shell, hosts: [app1], params: {command: "true"}}
    """)
    proc = overhaul_cli(tmp_path, "run", "hello", "--env", "lab", "--hosts-dir", str(lab.inventory.parent),
                        "--runbooks-dir", str(tmp_path / "runbooks"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = re.search(r"^run (\S+):", proc.stdout, re.M).group(1)
    assert proc.stdout.rstrip().splitlines()[-1].endswith(
        f"details: overhaul show {run_id} or https://overhaul.example.internal/runs/{run_id}")
    from webhook import Receiver, receiving

    from overhaul.alerts import NotifyConfig, RunInfo, RunNotifier, WebhookSettings

    monkeypatch.chdir(tmp_path)  # (the project whose overhaul.yaml says where the pages are)
    with receiving() as port:  # the message a webhook receives, as posted
        notifier = RunNotifier(NotifyConfig(webhook=WebhookSettings(url_secret={"env": "UNUSED"})),
                               f"http://127.0.0.1:{port}/hook", retry_wait=0.1)
        assert notifier.ended(RunInfo("lab", "hello", run_id, "root"), "succeeded", 1) == []
    [(_, _, body)] = Receiver.received
    page = f"overhaul show {run_id} or https://overhaul.example.internal/runs/{run_id}"
    assert body["text"].endswith(f"Details: {page}") and body["overhaul"]["show"] == page, body


def test_a_runs_header_says_the_version_it_went_from_and_to(tmp_path):
    journal = SQLiteState(tmp_path / "journal.sqlite")
    run = RunRecord("20261207T000000-fedcba", "upgrade", "/nowhere.yaml", "0" * 64, "lab", {"version": "1.1.0"},
                    "root@vm", time.time(), time.time(), "succeeded")
    journal.start_run(run)
    journal.record(ResultRecord(run.id, 2, "upgrade package", "app1", "changed", 1, time.time(), time.time(),
                                "scalr-server 1.0.0 -> 1.1.0", facts={"version": "1.1.0", "previous": "1.0.0"}))
    served = Served(tmp_path, {"OVERHAUL_JOURNAL": str(tmp_path / "journal.sqlite")})
    try:
        status, page = served.get(f"/runs/{run.id}")
    finally:
        served.close()
    assert status == 200 and "version 1.0.0 -&gt; 1.1.0" in page
