"""Project settings: the project root, its `overhaul.yaml`, and the state backend they choose.

The project root is the nearest folder holding `hosts/` or `overhaul.yaml`, found from the current
directory upward (as git finds `.git`), so every operator and CI job in one project shares one state and
one set of inventories whatever folder they run from; from outside any project, a command that needs one
says where it looked (and writes nothing there).

The state backend is `sqlite` (the default: a file under the root's `.overhaul/`), a `postgresql://` URL
(a team's shared journal and lock), or a scheme an `overhaul.state` entry point provides.
`OVERHAUL_STATE` overrides the file; `OVERHAUL_JOURNAL` names the SQLite file.
"""

from __future__ import annotations

import os
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from overhaul.config import load_document
from overhaul.errors import OverhaulError
from overhaul.secrets import SecretRef
from overhaul.state.records import State, StateSettingError

SETTINGS_FILE = "overhaul.yaml"
DEFAULT_JOURNAL = Path(".overhaul") / "journal.sqlite"


class StateSettings(BaseModel):
    """Where the journal and the environment leases live."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field("sqlite", description="`sqlite` (the project's own file), `sqlite:///PATH` (from the project root), "
                     "`sqlite:////ABSOLUTE/PATH`, "
                     "`postgresql://USER@HOST:PORT/DATABASE`, or a scheme from an `overhaul.state` entry point")
    password: SecretRef | None = Field(None, description="the database password, by reference ({file: PATH}, "
                                       "{env: VAR}...); never in the URL")
    lease: float = Field(60.0, gt=0, description="seconds a run's lease on its environment lasts without a heartbeat "
                         "(heartbeats come every sixth of it)")
    retry_for: float = Field(60.0, ge=0, description="seconds to wait for an unreachable state database before a run "
                             "stops as interrupted")


class WebSettings(BaseModel):
    """`overhaul serve`: the journal as read-only web pages."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(None, description="where the pages are reached (https://overhaul.internal): a run's last "
                            "line and its notification link to its page")
    listen: str = Field("127.0.0.1:8040", description="HOST:PORT to listen on (loopback unless told otherwise)")
    token: SecretRef | None = Field(None, description="a token every request must carry (Authorization: Bearer TOKEN, "
                                    "or basic auth with it as the password), by reference ({env: VAR}, {file: PATH})")


class Settings(BaseModel):
    """The project's `overhaul.yaml`."""

    model_config = ConfigDict(extra="forbid")

    default_env: str | None = Field(None, description="the environment a command takes when given no --env "
                                    "(OVERHAUL_ENV overrides it; `overhaul lab.up` sets it to `lab` if unset)")

    state: StateSettings = Field(default_factory=StateSettings, description="the state backend; a URL alone is short "
                                 "for {url: URL}")
    web: WebSettings = Field(default_factory=WebSettings, description="the web pages of `overhaul serve`")

    @field_validator("state", mode="before")
    @classmethod
    def _url_alone(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) else value


class NoProject(OverhaulError):
    """No project root from here upward: the message names the folders looked in."""


def find_project_root(start: Path | None = None) -> Path | None:
    """The nearest folder from `start` (the current directory) upward holding `hosts/` or `overhaul.yaml`."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "hosts").is_dir() or (folder / SETTINGS_FILE).is_file():
            return folder
    return None


def project_root(start: Path | None = None) -> Path:
    """The project root (see `find_project_root`), or NoProject naming where it looked."""
    found = find_project_root(start)
    if found is None:
        start = (start or Path.cwd()).resolve()
        looked = [str(folder) for folder in (start, *start.parents)]
        raise NoProject(f"no Overhaul project here: no hosts/ folder nor overhaul.yaml in {', '.join(looked)}; "
                        "run from your project's folder (or one inside it), or start one with a hosts/ folder "
                        "(`overhaul lab.up` makes a lab project)")
    return found


def project_folder(name: str) -> Path:
    """An optional folder of the project (runbooks, steps, checks) by its name: the project root's, or outside any
    project the current directory's."""
    root = find_project_root()
    return root / name if root is not None else Path(name)


def load_settings(root: Path | None = None) -> Settings:
    """The root's `overhaul.yaml` (if any), then the environment's overrides (outside a project: those alone)."""
    root = root or find_project_root()
    path = root / SETTINGS_FILE if root is not None else None
    settings = load_document(path).validate(Settings) if path is not None and path.is_file() else Settings()
    overrides = {"url": os.environ.get("OVERHAUL_STATE"), "lease": os.environ.get("OVERHAUL_LOCK_LEASE"),
                 "retry_for": os.environ.get("OVERHAUL_STATE_RETRY")}
    given = {key: value for key, value in overrides.items() if value}
    if given:
        settings.state = StateSettings.model_validate({**settings.state.model_dump(exclude_unset=True), **given})
    return settings


def default_environment() -> tuple[str, str] | None:
    """The environment to take when none is given, and where it was set: OVERHAUL_ENV, then `default_env:`."""
    named = os.environ.get("OVERHAUL_ENV", "").strip()
    if named:
        return named, "OVERHAUL_ENV"
    root = find_project_root()
    chosen = load_settings(root).default_env if root is not None else None
    return (chosen, f"default_env in {root / SETTINGS_FILE}") if chosen and root is not None else None


def set_default_environment(root: Path, env: str) -> bool:
    """Make `env` the project's default environment unless one is set already (appended: the file's text and
    comments stay as they are). True if it was set."""
    path = root / SETTINGS_FILE
    if path.is_file():
        if load_document(path).validate(Settings).default_env:
            return False
        text = path.read_text()
        path.write_text(text + ("" if text.endswith("\n") or not text else "\n") + f"default_env: {env}\n")
    else:
        path.write_text(f"# Overhaul's project settings (see the docs: Working as a team)\ndefault_env: {env}\n")
    return True


def run_page(run_id: str) -> str | None:
    """The run's web page (`overhaul serve` at web.url in overhaul.yaml), when the project says where that is."""
    url = load_settings().web.url
    return f"{url.rstrip('/')}/runs/{run_id}" if url else None


def journal_path() -> Path:
    """The embedded journal's file: OVERHAUL_JOURNAL, else `.overhaul/journal.sqlite` at the project root."""
    named = os.environ.get("OVERHAUL_JOURNAL")
    return Path(named) if named else project_root() / DEFAULT_JOURNAL


def outputs_dir() -> Path:
    """Where this controller keeps the runs' per-host logs (beside the embedded journal, whatever the backend)."""
    return journal_path().parent / "runs"


def open_state(settings: Settings | None = None, *, migrate: bool = False) -> State:
    """The configured backend, opened and its schema checked (migrated when `migrate` or when new)."""
    chosen = (settings or load_settings()).state
    url = chosen.url
    scheme = url.partition(":")[0]
    if url == "sqlite" or scheme == "sqlite":
        from overhaul.state.sqlite import SQLiteState

        path = project_root() / url.removeprefix("sqlite:///") if url != "sqlite" else journal_path()
        return SQLiteState(path, lease=chosen.lease)
    password = chosen.password.resolve() if chosen.password is not None else None
    if scheme in ("postgresql", "postgres"):
        try:
            from overhaul.state.postgresql import PostgresState
        except ImportError as exc:
            raise StateSettingError(f"state {url}: the PostgreSQL backend needs psycopg: pip install 'overhaul[postgresql]' "
                             f"({exc})") from None
        return PostgresState(url, password, lease=chosen.lease, retry_for=chosen.retry_for, migrate=migrate)
    plugins = {point.name: point for point in entry_points(group="overhaul.state")}
    if scheme not in plugins:
        raise StateSettingError(f"state {url!r}: unknown backend {scheme!r} (known: sqlite, postgresql"
                         f"{''.join(', ' + name for name in sorted(plugins))})")
    return plugins[scheme].load()(url, password=password, lease=chosen.lease, retry_for=chosen.retry_for,
                                  migrate=migrate)
