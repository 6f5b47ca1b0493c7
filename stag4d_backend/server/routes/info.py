"""/v1/health (no token), /v1/openapi.json and /v1/info."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ... import __version__
from ..errors import internal_error
from ..schemas import BAKE_FORMATS, PRESETS, Health, Info
from .common import API_VERSION, Context, route_maker, v1_router

MODELS_TTL_S = 30.0


def health_router() -> APIRouter:
    r = APIRouter()

    @r.get("/v1/health", response_model=Health, tags=["server"])
    async def health():
        """Liveness; the only route without a token."""
        return {"status": "ok", "api": API_VERSION}

    return r


def router(ctx: Context) -> APIRouter:
    r = v1_router()
    v1 = route_maker(r)
    settings, manager = ctx.settings, ctx.manager
    models_cache: dict = {"at": -1e9, "models": []}

    @v1("GET", "/openapi.json", include_in_schema=False)
    async def openapi_doc(request: Request):
        return JSONResponse(request.app.openapi())

    def _models() -> list[dict]:
        now = time.monotonic()
        if now - models_cache["at"] < MODELS_TTL_S:
            return models_cache["models"]
        out = []
        try:
            from ..models import registry
        except ImportError:
            registry = None
        for name in getattr(registry, "MODELS", {}) if registry else {}:
            try:
                st = registry.status(name)
                spec = st.spec
                out.append({"name": name, "title": spec.title, "present": st.location is not None,
                            "size_gb": spec.size_gb, "licence": spec.licence, "licence_note": spec.licence_note,
                            "problem": st.problem})
            except Exception as exc:  # a registry problem must not break /info
                out.append({"name": name, "title": name, "present": False,
                            "problem": internal_error(f"cannot check the model {name}", exc)})
        models_cache.update(at=now, models=out)
        return out

    @v1("GET", "/info", response_model=Info, tags=["server"])
    async def info():
        """Version, devices, presets, models and their licences, limits."""
        if not manager.devices_ready.is_set():
            await run_in_threadpool(manager.devices_ready.wait, 180)
        devices = manager.devices or ["cpu"]
        return {"version": __version__, "api": API_VERSION, "device": devices[0], "devices": devices,
                "presets": list(PRESETS), "models": await run_in_threadpool(_models),
                "jobs_per_device": settings.jobs_per_device, "max_upload_bytes": settings.max_upload_bytes,
                "allow_server_paths": settings.allow_server_paths, "formats": list(BAKE_FORMATS)}

    return r
