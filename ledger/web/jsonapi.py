"""The JSON API: the same models the pages show, as JSON (``/api/...``).

Bad query parameters answer 400 with one line naming the parameter.
"""

from __future__ import annotations

from datetime import datetime

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from ledger.output import json_text
from ledger.timeline import UnknownId, Workflow, find_workflow
from ledger.times import parse_as_of
from ledger.web.models import StatsOut, StatsQuery, TaskDetail, TaskPage, TaskQuery, WorkflowOut
from ledger.web.tasklist import find_tasks, task_stats


def json_response(model) -> Response:
    # Not model_dump_json(): pydantic refuses a lone surrogate in a stored value (a
    # 500); json_text writes it as JSON's \ud800 escape, which reads back as stored.
    return Response(json_text(model.model_dump(mode="json"), separators=(",", ":")),
                    media_type="application/json")


def int_param(request: Request, name: str, default: int, *, maximum: int) -> int:
    text = request.query_params.get(name)
    if text in (None, ""):
        return default
    if not text.isdigit() or int(text) > maximum:
        raise HTTPException(400, f"{name} must be a whole number from 0 to {maximum}, not {text!r}")
    return int(text)


def as_of_param(request: Request) -> int | datetime | None:
    text = request.query_params.get("as_of")
    if not text:
        return None
    try:
        return parse_as_of(text)
    except ValueError as exc:
        raise HTTPException(400, f"as_of: {exc}") from None


def load_task(request: Request) -> TaskDetail:
    task_id = request.path_params["task_id"]
    detail = TaskDetail.of(request.app.state.ledger, task_id, as_of_param(request))
    if detail is None:
        raise HTTPException(404, f"no events for task {task_id!r} in this ledger")
    return detail


def load_workflow(request: Request) -> Workflow:
    some_id = request.path_params["some_id"]
    try:
        return find_workflow(request.app.state.ledger, some_id)
    except UnknownId:
        raise HTTPException(404, f"no task, group or chord {some_id!r} in this ledger") from None


def task(request: Request) -> Response:
    """``/api/tasks/<id>[?as_of=POSITION|TIME]``: state and every event of the task."""
    return json_response(load_task(request))


def workflow(request: Request) -> Response:
    """``/api/workflows/<id>``: the workflow any member id belongs to."""
    return json_response(WorkflowOut.of(load_workflow(request)))



def task_query(request: Request) -> TaskQuery:
    try:
        return TaskQuery.from_params(request.query_params)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None


def stats_query(request: Request) -> StatsQuery:
    try:
        return StatsQuery.from_params(request.query_params)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None


def load_tasks(request: Request) -> TaskPage:
    try:
        return find_tasks(request.app.state.ledger, task_query(request))
    except ValueError as exc:  # a filter the catalogue refuses (BadFilter), or too deep a page
        raise HTTPException(400, str(exc)) from None


def load_stats(request: Request) -> StatsOut:
    try:
        return task_stats(request.app.state.ledger, stats_query(request))
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None


def tasks(request: Request) -> Response:
    """``/api/tasks?name=&state=&worker=&queue=&exception=&since=&until=&root=&args=&page=&limit=``."""
    return json_response(load_tasks(request))


def stats(request: Request) -> Response:
    """``/api/stats?since=&until=`` (or ``hours=``, default 24) ``&by=name|worker|queue``."""
    return json_response(load_stats(request))
