"""Reading a multipart upload without trusting its size: the declared length and the
bytes actually streamed are both capped, so an oversized upload is refused with a 413
before it is buffered."""

from __future__ import annotations

from typing import Callable

from fastapi import Request
from starlette.formparsers import MultiPartException, MultiPartParser

from .errors import APIError

FORM_OVERHEAD = 64 << 10   # multipart boundaries, headers and the small fields


async def read_capped_form(request: Request, limit: int, too_large: Callable[[int], APIError],
                           max_files: int, max_fields: int):
    """The parsed form; `too_large(size)` builds the 413 naming the flag that sets `limit`."""
    cap = limit + FORM_OVERHEAD
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise too_large(int(declared))

    async def capped():
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > cap:
                raise too_large(total)
            yield chunk

    try:
        return await MultiPartParser(request.headers, capped(), max_files=max_files, max_fields=max_fields).parse()
    except MultiPartException as e:
        raise APIError(400, f"the multipart form is malformed ({e.message})") from None
