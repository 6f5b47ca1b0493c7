"""/v1/jobs/{id}/files: the job's file list and one file (Range requests), confined to the job directory."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from ..downloads import SnapshotResponse, content_disposition, open_snapshot, parse_range
from ..files import BadName, list_files, media_type, resolve_download
from ..schemas import FileList
from .common import Context, FileName, JobId, error_responses, route_maker, v1_router


def router(ctx: Context) -> APIRouter:
    r = v1_router()
    v1 = route_maker(r)
    manager = ctx.manager

    @v1("GET", "/jobs/{job_id}/files", response_model=FileList, tags=["files"], responses=error_responses(404, 422))
    async def job_files(job_id: JobId):
        """Every file the job wrote (relative names, '/'-separated)."""
        path, _, _ = await run_in_threadpool(manager.read, job_id)
        return {"files": await run_in_threadpool(list_files, path)}

    @v1("GET", "/jobs/{job_id}/files/{name:path}", tags=["files"], responses={
        200: {"description": "the file's bytes (Range requests supported)",
              "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}},
        206: {"description": "the requested range of the file's bytes",
              "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}},
        416: {"description": "the range starts at or past the end of the file (or ends before it starts); "
                             "empty body, Content-Range: bytes */SIZE"},
        **error_responses(400, 404, 422)})
    async def job_file(request: Request, job_id: JobId, name: FileName):
        """One file of the job, by its relative name; nothing outside the job directory."""
        byte_range = parse_range(request.headers.get("range"))  # headers first: nothing is open yet
        path, _, _ = await run_in_threadpool(manager.read, job_id)

        def open_it():
            target = resolve_download(path, name)
            headers = media_type(target), content_disposition(target.name)
            return headers, *open_snapshot(target)

        try:
            (kind, disposition), fd, size = await run_in_threadpool(open_it)
        except BadName as exc:
            raise HTTPException(400, str(exc)) from None
        except OSError:  # missing, outside, not a regular file, or gone since the check
            raise HTTPException(404, f"job {job_id} has no file {name!r}") from None
        return SnapshotResponse(fd, size, kind, disposition, byte_range)

    return r
