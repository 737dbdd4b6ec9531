"""The view's HTML pages: runs, one run, trajectories, one trajectory, evaluations.

Each route gathers what its template (`templates/*.html`) shows; the templates only lay it out.
A bad filter or an unknown evaluation is a 400 page saying why, an unknown run or trajectory a 404.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from safactory.view.charts import chart_specs
from safactory.view.evals import EvalSourceError
from safactory.view.filters import VERDICTS, FilterError, TrajectoryFilter
from safactory.view.queries import MAX_PAGE
from safactory.view.rundirs import REPORT_FILE
from safactory.view.runs import heldout
from safactory.view.tokens import all_turns, shade

router = APIRouter()
KINDS = ("rollout", "eval", "expert", "redteam", "proxy")
METRICS_SHOWN = (
    "success_rate",
    "unsafe_rate",
    "mean_reward",
    "pass_at_k",
    "utility",
    "utility_under_attack",
    "attack_success_rate",
    "refusal_rate",
    "over_refusal_rate",
    "turns",
    "tokens",
    "episodes",
)

LOWER_IS_BETTER = {"unsafe_rate", "attack_success_rate", "over_refusal_rate"}
NEUTRAL = {"turns", "tokens", "episodes", "latency_s"}  # a change is neither better nor worse


def _render(request: Request, name: str, code: int = 200, **context: Any) -> HTMLResponse:
    view = request.app.state.view
    return view.templates.TemplateResponse(request, name, {"page": name.removesuffix(".html"), **context}, code)


def _problem(request: Request, code: int, message: str) -> HTMLResponse:
    return _render(request, "error.html", code, status=code, message=message)


@router.get("/", include_in_schema=False)
def home() -> RedirectResponse:
    return RedirectResponse("/runs", status_code=303)


@router.get("/runs", response_class=HTMLResponse)
def runs_page(request: Request) -> HTMLResponse:
    view = request.app.state.view
    return _render(request, "runs.html", runs=view.runs.rows(), runs_dir=view.runs.runs_dir)


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(request: Request, run_id: str) -> HTMLResponse:
    view = request.app.state.view
    run = view.runs.find(run_id)
    if run is None:
        return _problem(request, 404, f"no run {run_id!r} in the store or the runs folder")
    reader = view.reader
    stored = reader is not None and run.n_trajectories is not None
    summary = run.directory.summary() if run.directory is not None else {}
    script = {"run": run.run_id, "status": run.status, "charts": chart_specs(), "poll_s": view.poll_s}
    return _render(
        request,
        "run.html",
        run=run,
        checkpoints=reader.checkpoints(run.run_id) if stored else [],
        kinds=reader.kinds(run.run_id) if stored else [],
        evals=heldout(summary),
        script=json.dumps(script).replace("<", "\\u003c"),  # safe inside <script>
    )


@router.get("/runs/{run_id}/report", response_model=None)
def run_report(request: Request, run_id: str) -> Response:
    """The run's own single-file report.html, as it is."""
    run = request.app.state.view.runs.find(run_id)
    if run is None or run.directory is None or not run.directory.has_report():
        return _problem(request, 404, f"run {run_id!r} has no {REPORT_FILE} (write it with `safactory report DIR`)")
    return FileResponse(run.directory.path / REPORT_FILE, media_type="text/html")


@router.get("/trajectories", response_class=HTMLResponse)
def trajectories_page(request: Request) -> HTMLResponse:
    view = request.app.state.view
    params = dict(request.query_params)
    try:
        filt = TrajectoryFilter.parse(params)
        before = _cursor(params, "before")
        after = _cursor(params, "after")
        limit = _cursor(params, "limit") or 50
    except FilterError as exc:
        return _problem(request, 400, str(exc))
    if view.reader is None:
        return _problem(request, 404, "the view has no store (start it with --db)")
    page = view.reader.page(filt, before=before, after=after, limit=limit)
    return _render(
        request,
        "trajectories.html",
        filt=filt,
        values=filt.active(),
        result=page,
        limit=min(limit, MAX_PAGE),
        run_ids=[r["id"] for r in view.reader.runs()],
        kinds=KINDS,
        verdicts=VERDICTS,
    )


def _cursor(params: dict[str, str], name: str) -> int | None:
    raw = params.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise FilterError(f"{name}: a whole number, not {raw[:50]!r}") from None
    if value < 0:
        raise FilterError(f"{name}: not negative")
    return value


@router.get("/trajectories/{trajectory_id}", response_class=HTMLResponse)
def trajectory_page(request: Request, trajectory_id: str) -> HTMLResponse:
    view = request.app.state.view
    if view.reader is None:
        return _problem(request, 404, "the view has no store (start it with --db)")
    detail = view.reader.detail(trajectory_id)
    if detail is None:
        return _problem(request, 404, f"no trajectory {trajectory_id!r} in the store")
    run_id = detail.row["run_id"]
    directory = view.runs.directory(run_id) or view.runs.directory(run_id.removesuffix("-student"))
    decode, tokenizer = view.decoders.get(directory.path if directory is not None else None)
    turns = all_turns(detail.trajectory.steps, decode) if detail.trajectory is not None else {}
    return _render(
        request, "trajectory.html", d=detail, t=detail.trajectory, turns=turns, tokenizer=tokenizer, shade=shade
    )


@router.get("/evals", response_class=HTMLResponse)
def evals_page(request: Request, a: str = "", b: str = "") -> HTMLResponse:
    view = request.app.state.view
    sources = view.evals.sources()
    context: dict[str, Any] = {
        "sources": sources,
        "a": a,
        "b": b,
        "metrics_shown": METRICS_SHOWN,
        "lower_is_better": LOWER_IS_BETTER,
        "neutral": NEUTRAL,
    }
    if a and b:
        try:
            first, second, result = view.evals.compare(a, b)
        except (EvalSourceError, KeyError, ValueError) as exc:
            return _problem(request, 400, f"cannot compare {a} and {b}: {exc}")
        envs = [e for e in first["metrics"] if e in second["metrics"]]
        context.update(first=first, second=second, result=result, envs=envs)
    return _render(request, "evals.html", **context)
