"""The view's web app: `create_app` (FastAPI, its pages, its JSON for the live curves, its own
bundled static files: nothing comes from a CDN) and `serve_view` (uvicorn).

Read-only: every route is a GET. Without a token it answers only requests addressed to a
loopback host (`safactory.loopback.LoopbackHostGuard`); with one, only requests that carry it
(`safactory.view.auth.TokenGate`). URLs past the shared limit get a 414
(`safactory.request_limits.RequestLimits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from safactory.data.store import TrajectoryStore, store_url
from safactory.loopback import LoopbackHostGuard
from safactory.request_limits import RequestLimits
from safactory.view.auth import TokenGate, check_bind
from safactory.view.evals import EvalCatalog
from safactory.view.format import FILTERS
from safactory.view.queries import StoreReader
from safactory.view.runs import RunCatalog
from safactory.view.tokens import Decoders

HERE = Path(__file__).resolve().parent


@dataclass
class ViewState:
    """What the routes share, built once per app (kept on `app.state.view`)."""

    store: TrajectoryStore | None
    reader: StoreReader | None
    runs: RunCatalog
    evals: EvalCatalog
    decoders: Decoders
    templates: Jinja2Templates
    poll_s: float


def default_runs_dir(db: str) -> Path | None:
    """Where run directories are looked for when `--runs` is not given: the `--db` directory (a run
    directory, or a folder of them), or the folder of a store file; none for a database URL."""
    if "://" in db:
        return None
    path = Path(db).expanduser()
    return path if path.is_dir() else path.parent


def create_app(db: str | None, runs_dir: Path | None = None, *, poll_s: float = 2.0) -> FastAPI:
    """The view over the store `db` (a URL, a .db file or a run directory; it must exist) and the run
    and evaluation directories under `runs_dir` (default: `default_runs_dir(db)`)."""
    from safactory.view.api import router as api_router
    from safactory.view.pages import router as page_router

    store = TrajectoryStore(store_url(db, existing=True)) if db is not None else None
    reader = StoreReader(store) if store is not None else None
    if runs_dir is None and db is not None:
        runs_dir = default_runs_dir(db)
    runs = RunCatalog(reader, runs_dir.resolve() if runs_dir is not None else None)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters.update(FILTERS)
    app = FastAPI(title="safactory view", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.view = ViewState(
        store=store,
        reader=reader,
        runs=runs,
        evals=EvalCatalog(reader, runs),
        decoders=Decoders(),
        templates=templates,
        poll_s=poll_s,
    )
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.include_router(page_router)
    app.include_router(api_router)
    app.add_middleware(
        RequestLimits, error_body=lambda status, code, message: {"error": {"code": code, "message": message}}
    )
    if store is not None:
        app.router.on_shutdown.append(store.close)
    return app


def guarded(app: FastAPI, token: str | None) -> Any:
    """The app behind its gate: the token's, or the loopback host guard without one."""
    return TokenGate(app, token) if token else LoopbackHostGuard(app)


def serve_view(
    db: str, runs_dir: Path | None, host: str = "127.0.0.1", port: int = 8800, token: str | None = None
) -> None:
    """Serve the view until interrupted."""
    import uvicorn

    check_bind(host, token)
    app = guarded(create_app(db, runs_dir), token)
    # no access log: it would write every request's whole URL (and a `?token=` once) into the log
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
