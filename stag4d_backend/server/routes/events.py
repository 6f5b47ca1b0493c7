"""/v1/jobs/{id}/events: a JSON page (long-poll) or a server-sent-events stream."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ...job import TERMINAL_STATES
from ..jobs import JobError
from .common import Context, JobId, error_responses, route_maker, v1_router

KEEPALIVE_S = 15.0


def _after_last_event_id(header: str | None) -> int:
    """The event after ``Last-Event-ID`` (an event number: at most 10 ASCII digits); 0 for anything else, which
    no server of ours sent (``isdigit`` alone would pass '²' and 5000 digits to ``int``, which refuses both)."""
    text = (header or "").strip()
    return int(text) + 1 if text.isascii() and text.isdigit() and len(text) <= 10 else 0


def router(ctx: Context) -> APIRouter:
    r = v1_router()
    v1 = route_maker(r)
    manager, hub, view = ctx.manager, ctx.hub, ctx.view

    def _sse(ev: dict) -> str:
        return f"id: {ev['n']}\nevent: {ev.get('kind', 'message')}\ndata: {json.dumps(ev, default=str)}\n\n"

    def _state_now(job_id: str) -> str:
        try:
            return view(job_id)["state"]
        except JobError:
            return "deleted"

    sse_event = {"type": "object", "properties": {  # one event (OpenAPI 3.1 has no itemSchema)
        "id": {"type": "string"}, "event": {"type": "string"}, "data": {"type": "string"},
        "retry": {"type": "integer"}}}

    @v1("GET", "/jobs/{job_id}/events", tags=["jobs"], responses={
        200: {"description": "SSE stream (Accept: text/event-stream or format=sse) or a JSON page",
              "content": {"application/json": {"schema": {"$ref": "#/components/schemas/EventPage"}},
                          "text/event-stream": {"schema": sse_event}}},
        **error_responses(404, 422)})
    async def job_events(request: Request, job_id: JobId,
                         since: Annotated[int | None, Query(ge=0, le=10**9, description="first event number")] = None,
                         format: Literal["sse", "json"] | None = None,
                         wait: Annotated[float, Query(ge=0, le=30, description="long-poll seconds (json)")] = 0.0,
                         last_event_id: Annotated[str | None, Header(include_in_schema=False)] = None):
        """The job's events from number ``since`` on (or after ``Last-Event-ID``)."""
        await run_in_threadpool(manager.read, job_id)  # 404 for an unknown job
        start = since
        if start is None:
            start = _after_last_event_id(last_event_id)
        log = hub.log(job_id)
        sse = format == "sse" or (format is None and "text/event-stream" in request.headers.get("accept", ""))
        if not sse:
            log.refresh()
            if log.count <= start and wait > 0:
                await hub.wait(log, start, wait)
            evs = log.since(start)
            return JSONResponse({"events": evs, "next": start + len(evs), "state": _state_now(job_id)})

        async def stream():
            n = start
            yield "retry: 1000\n\n"
            while True:
                log.refresh()
                evs = log.since(n)
                if evs:
                    n = evs[-1]["n"] + 1
                    yield "".join(_sse(e) for e in evs)
                    continue
                if log.closed:
                    return
                if log.ended and await run_in_threadpool(_state_now, job_id) in TERMINAL_STATES + ("deleted",):
                    return
                if not await hub.wait(log, n, KEEPALIVE_S):
                    if not log.closed:
                        yield ": keepalive\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return r
