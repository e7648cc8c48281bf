"""Every 4xx/5xx answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}.

Handlers map each failure class to one status: pydantic validation and bad JSON -> 400,
AdapterRejected -> 400, AdapterNotFound -> 404, AdapterConflict -> 409, the file, job and
batch services' errors -> SERVICE_ERRORS, ValueError from the engine's checks -> 400,
anything unexpected -> 500 (that request only).
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from loraserve.adapters import AdapterConflict, AdapterError, AdapterNotFound, AdapterRejected, ServiceError
from loraserve.adapters.files import FileNotFound, FileTooLarge, InvalidFile, InvalidPurpose, WrongFilePurpose
from loraserve.adapters.finetune_job import JobNotCancellable, JobNotFound
from loraserve.async_engine import EngineDeadError
from loraserve.batches import BatchesStopped, BatchNotCancellable, BatchNotFound

log = logging.getLogger(__name__)

# OpenAI's `type` for each status class it uses.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 502: "server_error", 503: "service_unavailable"}

# (status, code) of each error the file, fine-tuning and batch services raise; the
# message and param are the error's own.
SERVICE_ERRORS: dict[type[ServiceError], tuple[int, str]] = {
    FileNotFound: (404, "file_not_found"),
    WrongFilePurpose: (400, "invalid_file_purpose"),
    InvalidPurpose: (400, "invalid_purpose"),
    FileTooLarge: (413, "file_too_large"),
    InvalidFile: (400, "invalid_file"),
    JobNotFound: (404, "job_not_found"),
    JobNotCancellable: (400, "job_not_cancellable"),
    BatchNotFound: (404, "batch_not_found"),
    BatchNotCancellable: (409, "batch_not_cancellable"),
    BatchesStopped: (503, "batches_stopped"),
}


class APIError(Exception):
    """An error the client can act on; raised anywhere in a route, answered by the handler."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def model_not_found(model: str) -> APIError:
    # The same words whether the adapter is missing or belongs to another tenant.
    return APIError(404, f"The model `{model}` does not exist or you do not have access to it; "
                         "GET /v1/models lists the models you can use.", "model", "model_not_found")


def from_exception(e: BaseException) -> APIError:
    """The APIError an exception from the engine or the store stands for."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ServiceError):
        status, code = next((SERVICE_ERRORS[c] for c in type(e).__mro__ if c in SERVICE_ERRORS),
                            (500, "internal_error"))
        return APIError(status, e.message, e.param, code)
    if isinstance(e, EngineDeadError):
        return APIError(503, f"the engine has stopped ({e}); this replica cannot serve, retry on another",
                        code="engine_dead")
    if isinstance(e, AdapterNotFound):
        return APIError(404, str(e), code="adapter_not_found")
    if isinstance(e, AdapterRejected):
        return APIError(400, str(e), code="adapter_rejected")
    if isinstance(e, AdapterConflict):
        return APIError(409, str(e), code="adapter_conflict")
    if isinstance(e, AdapterError):
        return APIError(500, str(e), code="adapter_error")
    if isinstance(e, ValueError):   # a PromptError (loraserve/prepared.py) names its field
        return APIError(400, str(e), getattr(e, "param", None), getattr(e, "code", None))
    return APIError(500, f"internal error while serving this request ({type(e).__name__}: {e}); "
                         "other requests are unaffected", code="internal_error")


_BRANCHES = {"str", "int", "float", "bool", "dict", "list", "TextPart", "OtherPart", "StreamOptions", "ResponseFormat",
             "NamedToolChoice"}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """A one-line message naming each bad field and what it should be; and the first field."""
    parts, first = [], None
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        # Unions name each branch in `loc` (e.g. 'str', 'list[int]'): keep the field path only.
        field = ".".join(p for p in loc if not (p in _BRANCHES or "[" in p or p.startswith("function-")))
        kind = err.get("type", "")
        if kind == "json_invalid":
            ctx = err.get("ctx", {}).get("error", "")
            parts.append(f"the request body is not valid JSON ({ctx}); send a JSON object")
            continue
        if kind == "extra_forbidden":
            parts.append(f"Unrecognized request argument supplied: {field}")
        elif kind in ("model_attributes_type", "dict_type", "model_type") and not field:
            parts.append("the request body must be a JSON object sent with Content-Type: application/json")
        elif kind == "missing":
            parts.append(f"{field}: this field is required")
        else:
            shown = _short(err.get("input"))
            parts.append(f"{field or 'body'}: {err.get('msg', 'invalid value')} (got {shown})")
        first = first or (field.split(".")[0] if field else None)
    unique = list(dict.fromkeys(parts))
    return "; ".join(unique[:5]) + (f"; and {len(unique) - 5} more" if len(unique) > 5 else ""), first


def _short(value) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        message, param = validation_message(list(e.errors()))
        return APIError(400, message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        message = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        if e.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        elif e.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return APIError(e.status_code, message).response()

    for cls in (AdapterError, ServiceError, ValueError):
        @app.exception_handler(cls)
        async def _known(request: Request, e: Exception):
            return from_exception(e).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("request %s %s failed", request.method, request.url.path)
        return from_exception(e).response()
