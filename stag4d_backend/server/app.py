"""The HTTP API under /v1 (docs/api.md is the contract, docs/server.md the design).

Every route but ``GET /v1/health`` needs the bearer token. Errors are ``{"detail": "<one line>"}`` (validation
errors add ``errors``). The OpenAPI document is served at ``/v1/openapi.json`` (behind the token too).

Every validation failure, FastAPI's (path, query, header) and the routes' own (bodies, the ``options`` field of an
upload), ends in one handler: malformed JSON is 400, invalid values 422. A failure nobody expected is a 507 when
the disk is full and otherwise a 500 whose detail is a stable line with an error id (errors.py); the traceback,
with its paths and exception text, goes to the server's log only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from .. import __version__
from .events import EventHub
from ..job import is_disk_full
from .errors import DISK_FULL, internal_error
from .jobs import JobError, JobManager
from .routes import events, files, info, jobs
from .routes.common import Context, error_response, validation_response
from .schemas import JOB_CREATE, EventPage


@dataclass
class Settings:
    jobs_dir: Path
    token: str
    max_upload_bytes: int = 2 * 1024**3
    allow_server_paths: bool = False
    jobs_per_device: int = 1
    devices: list[str] | None = None           # None: probe (CUDA devices, else the CPU)
    auto_resume: bool = True
    notes: list[str] = field(default_factory=list)


def create_app(settings: Settings, manager: JobManager | None = None, on_shutdown=None) -> FastAPI:
    """The app; its lifespan starts the event poller and, on shutdown, stops the manager (running jobs become
    "interrupted") and calls ``on_shutdown()``."""
    hub = EventHub(settings.jobs_dir)
    manager = manager or JobManager(settings.jobs_dir, settings.devices, settings.jobs_per_device,
                                    settings.auto_resume)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        hub.start()
        try:
            yield
        finally:
            await hub.stop()
            await run_in_threadpool(manager.shutdown)
            if on_shutdown is not None:
                on_shutdown()

    app = FastAPI(title="STAG4D backend", version=__version__, openapi_url=None, docs_url=None, redoc_url=None,
                  lifespan=lifespan,
                  description="Jobs that turn a video, an image or a prompt into animated 3D Gaussians. "
                              "See docs/api.md.")
    app.state.manager, app.state.hub, app.state.settings = manager, hub, settings
    ctx = Context(settings, manager, hub)
    routers = [info.health_router()] + [routes.router(ctx) for routes in (info, jobs, events, files)]

    # ------------------------------------------------------------------------------------------ errors

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return validation_response(exc.errors())

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # Starlette lists the methods of one route only; a path may have several
            methods = set()
            for route in (r for rt in routers for r in rt.routes):  # the routers' own (included ones are wrapped)
                if getattr(route, "methods", None) and route.matches(request.scope)[0] != Match.NONE:
                    methods |= route.methods
            if methods:
                headers["Allow"] = ", ".join(sorted(methods))
        return error_response(exc.status_code, str(exc.detail), headers or None)

    @app.exception_handler(JobError)
    async def _job_error(request: Request, exc: JobError):
        return error_response(exc.status, exc.detail)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect):  # closed mid-body (or timed out): nobody to answer
        return error_response(400, "the client closed the connection before the request's body was complete")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        if is_disk_full(exc):
            return error_response(507, DISK_FULL)
        return error_response(500, internal_error(f"internal error in {request.method} {request.url.path}", exc))

    # An OSError (a full disk: 507) is answered by the same handler from Starlette's ExceptionMiddleware, which
    # does not re-raise: the handler for Exception runs in ServerErrorMiddleware, which re-raises, so uvicorn
    # logs the traceback again and closes the connection under a client that may already be reusing it.
    app.add_exception_handler(OSError, _unexpected)

    for rt in routers:
        app.include_router(rt)

    def custom_openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, js in (("JobCreate", JOB_CREATE.json_schema(ref_template="#/components/schemas/{model}")),
                         ("EventPage", EventPage.model_json_schema(ref_template="#/components/schemas/{model}"))):
            comps.update(js.pop("$defs", {}))
            comps[name] = js
        schema["servers"] = [{"url": "/"}]
        app.openapi_schema = schema
        return schema

    app.openapi = custom_openapi
    return app
