"""The HTML pages, rendered on the server from the API's models.

Handlers are plain functions: Starlette runs them in its thread pool, so a
slow query never holds up the event loop that streams ``/api/events``.
"""

from __future__ import annotations

from typing import Any

from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import HTMLResponse

from ledger.output import terminal_safe
from ledger.web import gantt
from ledger.web.jsonapi import load_stats, load_task, load_tasks, load_workflow, stats_query
from ledger.web.models import EventOut, WorkflowOut


def shown_as_text(value: Any) -> Any:
    r"""Every text a page prints, as the CLI prints it (:func:`ledger.output.terminal_safe`):
    the templates' ``finalize``.

    HTML escaping stops markup, not a bidi override (``safe\u202etxt.exe`` showed as
    "safeexe.txt"), an ESC, or a lone surrogate (which UTF-8 cannot hold: a 500).
    The escapes are plain ASCII text, so markup already escaped (``join``'s) stays markup.
    """
    if isinstance(value, Markup):
        return Markup(terminal_safe(value))
    return terminal_safe(value) if isinstance(value, str) else value


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    state = request.app.state
    html = state.templates.get_template(template).render(
        request=request, ledger_url=state.ledger.url, **context
    )
    return HTMLResponse(html, status_code=status_code)


def task(request: Request) -> HTMLResponse:
    """``/tasks/<id>``: every event, the state as of any event or time, prune notes."""
    detail = load_task(request)
    return render(request, "task.html", task=detail, title=f"task {detail.task_id}")


def workflow(request: Request) -> HTMLResponse:
    """``/workflows/<id>``: the workflow as a tree and an SVG Gantt chart."""
    wf = load_workflow(request)
    ledger = request.app.state.ledger
    # The exception text of each failed task (the workflow model keeps its type only).
    messages = {}
    for run in wf.tasks.values():
        if run.state == "FAILURE":
            rows = [EventOut.of(e) for e in ledger.history(run.task_id)]
            last = next(r for r in reversed(rows) if r.state == "FAILURE")
            messages[run.task_id] = f"{last.exc_type or 'Exception'}: {last.exc_message or ''}".strip()
    return render(
        request,
        "workflow.html",
        wf=WorkflowOut.of(wf),
        chart=gantt.layout(wf, messages),
        title=f"workflow {wf.root}",
    )


def live(request: Request) -> HTMLResponse:
    """``/live``: events as they are appended (the page's script reads ``/api/events``)."""
    return render(request, "live.html", title="live")



def tasks(request: Request) -> HTMLResponse:
    """``/``: the catalogue, filtered, paged, newest first; the first page follows the log."""
    return render(request, "tasks.html", tasks=load_tasks(request), title="tasks")


def task_rows(request: Request) -> HTMLResponse:
    """The Tasks table's rows alone: what the Tasks page's script swaps in when events arrive."""
    return render(request, "task_rows.html", tasks=load_tasks(request))


def stats(request: Request) -> HTMLResponse:
    """``/stats``: per name, worker or queue: counts, rates and percentiles over a period."""
    return render(request, "stats.html", stats=load_stats(request), query=stats_query(request),
                  title="stats")
