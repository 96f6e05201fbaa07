"""Reading request bodies with a size and a nesting limit."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from server.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType


async def read_json_body(request: Request, max_bytes: int, max_depth: int = 64) -> Any:
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        # A cross-site HTML form can post text/plain (or a form encoding) with no preflight; with no API
        # keys set, that would reach the engines on behalf of any web page the user opens.
        raise UnsupportedMediaType(f"the request body must be sent as application/json, not {media or 'untyped'}; "
                                   "set the header Content-Type: application/json")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {max_bytes} bytes")
    size, chunks = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"request body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return decode_json(b"".join(chunks), max_depth)


def decode_json(raw: bytes, max_depth: int) -> Any:
    """The decoded body; InvalidRequest when it is not JSON or nests containers more than `max_depth`
    deep. Python's decoder recurses once per level (a body of 5,000 nested objects, 25 KB, raised
    RecursionError: a 500), and so would everything that walks the body after it."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise InvalidRequest(f"the request body nests more than {max_depth} levels deep") from None
    except ValueError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if too_deep(body, max_depth):
        raise InvalidRequest(f"the request body nests more than {max_depth} levels deep")
    return body


def too_deep(value: Any, max_depth: int) -> bool:
    """Whether `value` nests lists and objects more than `max_depth` deep (the top level counts as 1)."""
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False
