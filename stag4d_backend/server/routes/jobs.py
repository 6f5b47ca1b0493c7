"""/v1/jobs: create (JSON or an upload), list, one job, cancel, resume, delete."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from ..jobs import JobError
from ..schemas import JOB_CREATE, JobList, JobOptions, JobOut, PathJob
from ..uploads import ACCEPTED, UploadError, receive_upload, sniff_file
from .common import CREATE_BODY, Context, JobId, error_responses, route_maker, v1_router

MAX_JSON_BYTES = 1024 * 1024


def _validated(validate, raw, where: tuple = ()):
    """``validate(raw)``; invalid input goes the way of every request error (app.py's handler: 400 / 422), with
    its location under ``body`` (and ``where``: the multipart field that held the JSON)."""
    try:
        return validate(raw)
    except ValidationError as exc:
        raise RequestValidationError([dict(e, loc=("body", *where, *e["loc"])) for e in exc.errors()]) from None


async def _read_json_body(request: Request) -> bytes:
    """The body, refused (413) past MAX_JSON_BYTES whatever Content-Length says."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and (len(declared) > 12 or int(declared) > MAX_JSON_BYTES):
        raise HTTPException(413, f"a JSON body may be at most {MAX_JSON_BYTES} bytes")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_JSON_BYTES:
                raise HTTPException(413, f"a JSON body may be at most {MAX_JSON_BYTES} bytes")
    except ClientDisconnect:
        raise HTTPException(400, "the client went away before the body was complete") from None
    return bytes(body)


def _path_request(req: PathJob, allowed: bool) -> dict:
    """The job request of a server path (sniffed by content); HTTPException when it cannot be used."""
    if not allowed:
        raise HTTPException(403, "jobs on server-side paths are off; upload the file instead, or start the "
                                 "server with --allow-server-paths")
    p = Path(req.path).expanduser()
    if not p.is_absolute():
        raise HTTPException(400, f"path {req.path!r}: give an absolute path on the server")
    try:
        if p.is_dir():
            kind, mtype = "folder", None
        elif p.is_file():
            sniffed = sniff_file(p)
            if sniffed is None:
                raise HTTPException(415, f"{p}: not a supported video or image ({ACCEPTED})")
            kind, mtype = sniffed[0], sniffed[1]
        else:
            raise HTTPException(404, f"{p}: no such file or folder on the server")
    except PermissionError as exc:
        raise HTTPException(403, f"{p}: the server may not read it ({exc.strerror})") from None
    except OSError as exc:  # a name too long, a file in place of a folder, a loop: nothing to read there
        raise HTTPException(404, f"{p}: no such file or folder on the server ({exc.strerror})") from None
    except ValueError:  # characters the file system encoding cannot represent: no such file either
        raise HTTPException(404, f"path {req.path!r}: no such file or folder on the server") from None
    return {"kind": kind, "input": str(p.resolve()), "source": "path", "media_type": mtype,
            "options": req.options.model_dump(exclude_none=True)}


def router(ctx: Context) -> APIRouter:
    r = v1_router()
    v1 = route_maker(r)
    settings, manager, hub, view = ctx.settings, ctx.manager, ctx.hub, ctx.view

    @v1("POST", "/jobs", status_code=201, response_model=JobOut, tags=["jobs"],
        openapi_extra={"requestBody": CREATE_BODY},
        responses=error_responses(400, 403, 404, 413, 415, 422, 507))
    async def create_job(request: Request):
        """A new job from JSON (example, prompt, server path) or from an upload (multipart: file + options)."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json" or ctype.endswith("+json"):
            req = _validated(JOB_CREATE.validate_json, await _read_json_body(request))
            if req.kind == "path":
                job_request = await run_in_threadpool(_path_request, req, settings.allow_server_paths)
            else:
                job_request = {"kind": req.kind, "options": req.options.model_dump(exclude_none=True)}
                if req.kind == "prompt":
                    job_request["prompt"] = req.prompt
            job_id = await run_in_threadpool(manager.create, job_request)
        elif ctype == "multipart/form-data":
            try:
                up = await receive_upload(request, manager.upload_dir, settings.max_upload_bytes)
            except UploadError as exc:
                raise HTTPException(exc.status, exc.detail) from None
            try:
                # The field holds JSON, checked exactly as the JSON body's "options" (strict types included).
                options = _validated(JobOptions.model_validate_json, up.fields.get("options") or "{}", ("options",))
                job_request = {"kind": up.kind, "media_type": up.media_type, "filename": up.filename,
                               "size": up.size, "source": "upload", "options": options.model_dump(exclude_none=True)}
                job_id = await run_in_threadpool(manager.create, job_request, up.path, up.suffix)
            finally:
                up.path.unlink(missing_ok=True)
        else:
            raise HTTPException(415, "send application/json or multipart/form-data (file + options)")
        return await run_in_threadpool(view, job_id)

    @v1("GET", "/jobs", response_model=JobList, tags=["jobs"])
    async def list_jobs():
        """Every job in the jobs directory, newest first."""
        def collect():
            out = []
            for job_id in manager.list_ids():
                try:
                    out.append(view(job_id))
                except JobError:
                    continue  # deleted meanwhile
            out.sort(key=lambda j: j["created"], reverse=True)
            return {"jobs": out}

        return await run_in_threadpool(collect)

    @v1("GET", "/jobs/{job_id}", response_model=JobOut, tags=["jobs"], responses=error_responses(404, 422))
    async def get_job(job_id: JobId):
        return await run_in_threadpool(view, job_id)

    @v1("POST", "/jobs/{job_id}/cancel", status_code=202, response_model=JobOut, tags=["jobs"],
             responses=error_responses(404, 409, 422))
    async def cancel_job(job_id: JobId):
        """Stops the job at its next step boundary (within 2 s); a queued job is cancelled at once."""
        await run_in_threadpool(manager.cancel, job_id)
        return await run_in_threadpool(view, job_id)

    @v1("POST", "/jobs/{job_id}/resume", status_code=202, response_model=JobOut, tags=["jobs"],
             responses=error_responses(404, 409, 422, 503, 507))
    async def resume_job(job_id: JobId):
        """Queues a cancelled, interrupted or failed job again; it resumes from its last checkpoint."""
        await run_in_threadpool(manager.resume, job_id)
        return await run_in_threadpool(view, job_id)

    @v1("DELETE", "/jobs/{job_id}", status_code=204, tags=["jobs"], responses=error_responses(404, 422))
    async def delete_job(job_id: JobId):
        """Stops the job if it runs, then removes its directory."""
        await run_in_threadpool(manager.delete, job_id)
        hub.forget(job_id)
        return Response(status_code=204)

    return r
