"""The journal as web pages (`overhaul serve`): read-only, over the configured `State`; no write path at all.

Routes: `/` (environments), `/history`, `/runs/<id>`, each with its JSON beside it (`/environments.json`,
`/history.json`, `/runs/<id>.json`: the last two the documents of `history --json` and `show --json`), and
`/runs/<id>/events`, server-sent events that tell a run's page to refresh its matrix within a second of the journal.
Every value is escaped (Jinja2's autoescape); the journal is already redacted. With a token, every request must
carry it.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from overhaul.documents import run_document, show_document
from overhaul.errors import OverhaulError
from overhaul.state.records import STATUSES, State
from overhaul.web import pages

REFRESH = 0.5  # seconds between two looks at the journal for a live run page


def make_app(state: State, *, token: str | None = None, hosts_dir: Path | None = None,
             refresh: float = REFRESH) -> Starlette:
    """The web application over `state`; `token`: required of every request (None: none asked, for loopback)."""
    templates = Environment(loader=PackageLoader("overhaul.web"), autoescape=select_autoescape(default=True))
    templates.globals["statuses"] = STATUSES

    def render(name: str, **values: Any) -> HTMLResponse:
        return HTMLResponse(templates.get_template(name).render(**values))

    def front(request: Request) -> Response:
        return render("environments.html", environments=pages.environments(state, hosts_dir))

    def front_json(request: Request) -> Response:
        return JSONResponse({"environments": [pages.environment_document(env)
                                              for env in pages.environments(state, hosts_dir)]})

    def history(request: Request) -> Response:
        chosen, page = _filter(request)
        runs, more = pages.history(state, chosen, page)
        def link(number: int) -> str:
            return "?" + urlencode({**request.query_params, "page": str(number)})

        return render("history.html", runs=runs, chosen=chosen, page=page, more=more, local=pages.local,
                      since=request.query_params.get("since", ""), link=link,
                      json_link="/history.json?" + urlencode(request.query_params))

    def history_json(request: Request) -> Response:
        chosen, page = _filter(request)
        runs, more = pages.history(state, chosen, page)
        return JSONResponse({"runs": [run_document(record) for record in runs], "page": page, "more": more})

    def run(request: Request) -> Response:
        record = _run(state, request.path_params["run_id"])
        shown = pages.run_page(state, record, _number(request, "hosts"))
        return render("run.html", page=shown, local=pages.local, last_output=pages.last_output,
                      live=record.status == "running")

    def matrix(request: Request) -> Response:
        record = _run(state, request.path_params["run_id"])
        shown = pages.run_page(state, record, _number(request, "hosts"))
        return render("matrix.html", page=shown, local=pages.local, last_output=pages.last_output)

    def run_json(request: Request) -> Response:
        return JSONResponse(show_document(state, _run(state, request.path_params["run_id"])))

    def events(request: Request) -> Response:
        record = _run(state, request.path_params["run_id"])

        async def changes() -> AsyncIterator[str]:
            seen = ""
            while not await request.is_disconnected():
                now, run = await asyncio.to_thread(pages.fingerprint, state, record)
                if now != seen:
                    seen = now
                    yield f"data: {json.dumps({'status': run.status, 'duration': f'{run.duration:.1f} s'})}\n\n"
                await asyncio.sleep(refresh)

        return StreamingResponse(changes(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    app = Starlette(routes=[
        Route("/", front), Route("/environments.json", front_json), Route("/history", history),
        Route("/history.json", history_json),
        Route("/runs/{run_id}.json", run_json), Route("/runs/{run_id}/matrix", matrix),
        Route("/runs/{run_id}/events", events), Route("/runs/{run_id}", run),
    ], exception_handlers={LookupError: _not_found, OverhaulError: _bad_request})
    if token is not None:
        app.add_middleware(_TokenRequired, token=token)  # type: ignore[arg-type]
    return app


class _TokenRequired:
    """Every request carries the token: `Authorization: Bearer TOKEN`, or basic auth with it as the password
    (what a browser asks for); else 401. Compared in constant time."""

    def __init__(self, app: Callable[..., Awaitable[None]], token: str):
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] == "http" and not self._carries(dict(scope.get("headers") or [])):
            response = PlainTextResponse("a token is required", status_code=401,
                                         headers={"WWW-Authenticate": 'Basic realm="overhaul", charset="UTF-8"'})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _carries(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, value = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer":
            given = value.strip()
        elif scheme.lower() == b"basic":
            try:
                given = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
            except ValueError:
                return False
        else:
            return False
        return hmac.compare_digest(given, self.token)


def _run(state: State, run_id: str) -> Any:
    from overhaul.history import find_run

    if not run_id or len(run_id) > 64:
        raise LookupError(f"no run {run_id!r}")
    try:
        return find_run(state, run_id)
    except OverhaulError as exc:  # (its message names the journal's location: not for the page)
        raise LookupError(f"no run {run_id!r}" if "no run" in str(exc) else str(exc).partition(" in ")[0]) from None


def _filter(request: Request) -> tuple[pages.HistoryFilter, int]:
    query = request.query_params
    status = query.get("status", "")
    if status and status not in STATUSES:
        raise OverhaulError(f"status {status!r}: not a run status (one of: {', '.join(STATUSES)})")
    since = query.get("since", "")
    try:
        after = datetime.fromisoformat(since).timestamp() if since else None
    except ValueError:
        raise OverhaulError(f"since {since!r}: expected a date (2026-11-01)") from None
    return pages.HistoryFilter(env=query.get("env", ""), runbook=query.get("runbook", ""), status=status, since=after,
                               all=query.get("all", "") in ("1", "on", "true")), _number(request, "page")


def _number(request: Request, name: str) -> int:
    value = request.query_params.get(name, "0")
    return int(value) if value.isdigit() and len(value) < 7 else 0


async def _not_found(request: Request, exc: Exception) -> Response:
    return PlainTextResponse(f"not found: {exc}", status_code=404)


async def _bad_request(request: Request, exc: Exception) -> Response:
    return PlainTextResponse(str(exc), status_code=400)
