"""What every router shares: the context (settings, job manager, event hub), the token check, the error shapes
and the path parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..auth import token_matches
from ..events import EventHub
from ..files import FILE_NAME_PATTERN, JOB_ID_PATTERN, MAX_NAME
from ..jobs import JobManager, job_view
from ..schemas import ErrorOut
from ..uploads import ACCEPTED

API_VERSION = 1


@dataclass
class Context:
    settings: object      # server.app.Settings
    manager: JobManager
    hub: EventHub

    def view(self, job_id: str) -> dict:
        return job_view(self.manager, self.hub, job_id)


def error_response(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def validation_response(errors: list) -> JSONResponse:
    """The one answer to invalid input: 400 for malformed JSON (the body, or a field that holds JSON), else 422
    with one line in ``detail`` and a short list in ``errors``. ``errors``: pydantic's, with FastAPI's locations
    (the first item says where the value was: body, query, path, header)."""
    for e in errors:
        if e.get("type") == "json_invalid":
            field = [str(x) for x in e.get("loc", ())][1:]
            what = f"the {'.'.join(field)!r} field" if field else "the body"
            return error_response(400, f"{what} is not valid JSON")
    text, items = one_line_validation(errors)
    return JSONResponse({"detail": text, "errors": items}, status_code=422)


def one_line_validation(errors: list) -> tuple[str, list]:
    """One line for ``detail`` and a short list for ``errors`` (locations without FastAPI's first item)."""
    items = []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:]
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        items.append({"loc": loc, "msg": msg, "type": str(e.get("type", ""))})
    if not items:
        return "invalid request", items
    first = items[0]
    where = ".".join(first["loc"])
    text = f"{where}: {first['msg']}" if where else first["msg"]
    if len(items) > 1:
        text += f" (and {len(items) - 1} more)"
    return text.replace("\n", " "), items

_bearer = HTTPBearer(auto_error=False, description="the token from the server's token file")


def error_responses(*codes: int) -> dict:
    text = {400: "malformed request", 401: "missing or wrong token", 403: "not allowed by the server's flags",
            404: "no such job or file", 409: "not possible in the job's state", 413: "upload too large",
            415: "unsupported content", 422: "invalid values", 503: "the server is shutting down",
            507: "the server's disk is full"}
    return {c: {"model": ErrorOut, "description": text[c]} for c in codes}


JobId = Annotated[str, PathParam(pattern=JOB_ID_PATTERN, description="j + 12 lowercase hex digits")]
# Documented, not enforced by FastAPI: resolve_download checks it and answers 400 with its own message
# (tests/test_server_support.py holds the two equal).
FileName = Annotated[str, PathParam(description="a relative, '/'-separated name from the file list",
                                    json_schema_extra={"pattern": FILE_NAME_PATTERN, "maxLength": MAX_NAME})]


CREATE_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/JobCreate"}},
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["file"], "additionalProperties": False,
            "properties": {"file": {"type": "string", "format": "binary",
                                    "description": f"the input ({ACCEPTED}), recognised by content"},
                           "options": {"$ref": "#/components/schemas/JobOptions"}}},
            "encoding": {"options": {"contentType": "application/json"}}},
    },
}


async def require_token(request: Request,
                        _cred: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    if not token_matches(request.headers.get("authorization"), request.app.state.settings.token):
        raise HTTPException(401, "missing or wrong token: send 'Authorization: Bearer <token>' with the token "
                                 "from the server's token file", headers={"WWW-Authenticate": "Bearer"})


def v1_router() -> APIRouter:
    """Routes under /v1 behind the token."""
    return APIRouter(prefix="/v1", dependencies=[Depends(require_token)], responses=error_responses(401))


def route_maker(router: APIRouter):
    """``@v1(METHOD, PATH, ...)``: one route with one method (405 answers list every method of a path)."""
    def v1(method: str, path: str, **kw):
        return router.api_route(path, methods=[method], **kw)

    return v1
