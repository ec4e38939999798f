"""The ASGI application: routes, templates, the shared event feed, the safety layer.

``create_app(ledger)`` serves any ASGI server; ``celery-ledger web`` runs it
under uvicorn (:mod:`ledger.web.server`). Every route is a GET: nothing here
writes to the ledger.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ledger.api import Ledger
from ledger.events import RecordedEvent
from ledger.web import jsonapi, pages
from ledger.web.feed import CLIENT_QUEUE, EventFeed, Overflow
from ledger.web.models import LiveEvent
from ledger.web.security import Credentials, Guard

STATIC = Path(__file__).parent / "static"
#: An SSE comment this often keeps proxies from closing an idle stream and lets
#: the server notice a client that went away.
KEEPALIVE_S = 15.0


def templates() -> Environment:
    # Autoescape everything: task names, args, results and tracebacks are user data.
    env = Environment(
        loader=PackageLoader("ledger.web", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=pages.shown_as_text,
    )
    env.filters["when"] = lambda t: t.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if t else ""
    env.filters["segment"] = path_segment
    return env


def path_segment(value: str) -> str:
    """``value`` as one URL path segment: every reserved character percent-encoded.

    Jinja's ``urlencode`` keeps ``/``, so the id ``a/../b`` linked as ``/tasks/a/../b``,
    which a browser resolves to ``/tasks/b``. The routes take the decoded rest of
    the path (``{task_id:path}``), so ``%2F`` comes back as ``/``.
    """
    return quote(str(value), safe="")


def create_app(
    ledger: Ledger,
    *,
    credentials: Credentials | None = None,
    poll_interval: float = 0.1,
    client_queue: int = CLIENT_QUEUE,
    host: str | None = None,
) -> Starlette:
    """The console for ``ledger``; ``credentials`` makes every request present them.

    ``host`` is the name or address it listens on: without credentials, requests
    addressed to it are answered as well as those to the loopback names.

    ``client_queue`` is how many events an SSE client may have waiting before
    it is cut off as too slow (:mod:`ledger.web.feed`).
    """
    feed = EventFeed(ledger, sse_message, client_queue=client_queue, poll_interval=poll_interval)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        import asyncio

        feed.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            feed.stop()

    app = Starlette(
        routes=[
            Route("/", pages.tasks),
            Route("/partials/tasks", pages.task_rows),
            Route("/tasks/{task_id:path}", pages.task),
            Route("/workflows/{some_id:path}", pages.workflow),
            Route("/live", pages.live),
            Route("/stats", pages.stats),
            Route("/api/tasks", jsonapi.tasks),
            Route("/api/tasks/{task_id:path}", jsonapi.task),
            Route("/api/workflows/{some_id:path}", jsonapi.workflow),
            Route("/api/stats", jsonapi.stats),
            Route("/api/events", events),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        middleware=[Middleware(Guard, credentials=credentials, bound=host)],
        exception_handlers={400: _plain_error, 404: _plain_error},
        lifespan=lifespan,
    )
    app.state.ledger = ledger
    app.state.feed = feed
    app.state.templates = templates()
    return app


async def _plain_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", "error")
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": detail}, status_code=status)
    return pages.render(request, "error.html", status, status=status, detail=detail, title=f"error {status}")


def sse_message(event: RecordedEvent) -> str:
    """One event as Server-Sent Events text: its position as the id, its JSON as data."""
    return f"id: {event.position}\ndata: {LiveEvent.of(event).model_dump_json()}\n\n"


async def events(request: Request) -> Response:
    """``/api/events``: Server-Sent Events, one ``data:`` line of JSON per appended event.

    ``?backlog=N`` first replays up to N recent events (the Live page asks for
    them). A client that falls too far behind gets ``event: overflow`` and the
    stream ends (a browser reconnects by itself).
    """
    import asyncio

    backlog = jsonapi.int_param(request, "backlog", 0, maximum=200)
    feed: EventFeed = request.app.state.feed

    async def stream() -> AsyncIterator[str]:
        with feed.subscribe(backlog) as sub:
            yield ": connected\n\n"
            while True:
                try:
                    batch = await asyncio.wait_for(sub.next_batch(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    yield ": keepalive\n\n"
                    continue
                if isinstance(batch[-1], Overflow):
                    yield f"event: overflow\ndata: {json.dumps({'dropped': batch[-1].dropped})}\n\n"
                    return
                yield "".join(batch)  # type: ignore[arg-type]

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"cache-control": "no-store", "x-accel-buffering": "no"},
    )
