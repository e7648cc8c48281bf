"""The Batch API's line formats, OpenAI's JSONL keyed by `custom_id`.

    in      {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
    out     {"id": "batch_req_...", "custom_id": "q1", "error": null,
             "response": {"status_code": 200, "request_id": "chatcmpl-...", "body": {...}}}
    error   the same, with the endpoint's 4xx/5xx status and its error body; or, for a
            request that never ran (the batch expired), "response": null and
            "error": {"code": "batch_expired", "message": ...}

Two kinds of bad input, as OpenAI has them: a line that cannot be a request at all (not
a JSON object, no custom_id, a repeated custom_id, another method or endpoint) fails
the whole batch while it validates, with `errors` naming each line; a request whose
body the endpoint refuses (a bad field, an unknown model, another tenant's adapter) is
one line of the error file, and the batch goes on. That a file is JSONL of objects at
all is checked once more at upload, by the file store (adapters/files.py).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from loraserve.adapters.files import BatchFileError, parse_objects

MAX_REPORTED_ERRORS = 20    # a failed validation lists at most this many lines
ENDPOINTS = ("/v1/chat/completions", "/v1/completions")


@dataclass(frozen=True)
class BatchLine:
    number: int         # 1-based line of the input file
    custom_id: str
    body: object        # as sent; the endpoint checks it


def read_requests(data: bytes, endpoint: str) -> tuple[list[BatchLine], list[dict]]:
    """The batch's requests, or the errors (OpenAI's {code, message, param, line}) that
    fail it as a whole: only a line that cannot be answered under its own custom_id."""
    try:
        objects = parse_objects(data)
    except BatchFileError as e:
        return [], [_error("invalid_json_line", str(e), None, None)]
    lines, errors, seen = [], [], set()
    for number, obj in objects:
        custom_id, method, url = obj.get("custom_id"), obj.get("method"), obj.get("url")
        if not isinstance(custom_id, str) or not custom_id:
            errors.append(_error("missing_required_parameter", "custom_id must be a non-empty string",
                                 "custom_id", number))
        elif custom_id in seen:
            errors.append(_error("duplicate_custom_id", f"custom_id {custom_id!r} is used by an earlier line; "
                                 "each request needs its own", "custom_id", number))
        elif method != "POST":
            errors.append(_error("invalid_method", f"method must be 'POST', got {method!r}", "method", number))
        elif url != endpoint:
            errors.append(_error("mismatched_endpoint", f"url {url!r} is not this batch's endpoint {endpoint!r}; "
                                 "a batch sends every request to one endpoint", "url", number))
        else:
            seen.add(custom_id)
            lines.append(BatchLine(number, custom_id, obj.get("body")))
    return lines, errors[:MAX_REPORTED_ERRORS]


def _error(code: str, message: str, param: str | None, line: int | None) -> dict:
    return {"code": code, "message": message, "param": param, "line": line}


def answered(custom_id: str, status: int, body: dict) -> dict:
    """The line of a request the endpoint answered (200 to the output file, else the error file)."""
    request_id = body.get("id") if status == 200 else None
    return {"id": _line_id(), "custom_id": custom_id, "error": None,
            "response": {"status_code": status, "request_id": request_id or f"req_{uuid.uuid4().hex}",
                         "body": body}}


def unrun(custom_id: str, code: str, message: str) -> dict:
    """The error-file line of a request that never ran."""
    return {"id": _line_id(), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


def _line_id() -> str:
    return f"batch_req_{uuid.uuid4().hex[:24]}"
