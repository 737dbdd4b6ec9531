"""The JSON the run page's script polls: a run's metrics rows from a byte offset on, and its status.

`GET /api/runs/{run}/metrics?offset=N` answers `{"rows": [...], "offset": M, "status": ...}`: the
rows of the complete lines of `metrics.jsonl` between N and M, each cut to what the charts draw
(`safactory.view.charts.slim`). The page asks again with `offset=M` while the run is running.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from safactory.view.charts import slim
from safactory.view.rundirs import read_metrics

router = APIRouter(prefix="/api")


@router.get("/runs/{run_id}/metrics")
def run_metrics(request: Request, run_id: str, offset: int = Query(0, ge=0)) -> JSONResponse:
    view = request.app.state.view
    directory = view.runs.directory(run_id)
    if directory is None:  # a run of the store alone has no metrics log
        if view.reader is None or view.reader.run(run_id) is None:
            return JSONResponse({"error": f"no run {run_id!r}"}, status_code=404)
        return JSONResponse({"rows": [], "offset": 0, "status": "stored"})
    rows, end = read_metrics(directory.path, offset)
    body: dict[str, Any] = {"rows": [slim(r) for r in rows], "offset": end, "status": directory.status()}
    return JSONResponse(body)
