"""What every topro Serve app's HTTP face shares: status codes and messages for bad requests, a body-size cap.

- Malformed JSON: 400. A body that is not JSON (Content-Type): 415. Wrong shape or
  types: 422, one line naming each bad field (``sentences[0][1]: Input should be a
  valid string``). ``RequestProblem(status, message)`` raised anywhere: that status.
- A body larger than ``app.state.max_body_bytes``: 413, before it is read when it says its length, else
  as soon as the bytes read pass the cap (chunked bodies). A body that stalls for
  ``app.state.body_timeout_s``: 408.
- A ``serve_multiplexed_model_id`` header that is not an id (printable ASCII, at most 256 characters): 400.
  Serve's HTTP proxy decodes that header as UTF-8 before any app code runs and answers a plain-text 500
  when it cannot, so ``proxy_middlewares`` puts the same check into the proxy: ``topro serve`` sets
  ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=topro.endpoint.http:proxy_middlewares`` for the Ray it starts (set it
  on the head node of a real cluster).
"""
from __future__ import annotations

import asyncio
import re
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from topro.endpoint.schemas import ErrorResponse, RequestProblem, describe_validation_errors

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_BODY_TIMEOUT_S = 30.0
MODEL_ID_HEADER = "serve_multiplexed_model_id"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "topro.endpoint.http:proxy_middlewares"
_MODEL_ID_VALUE = re.compile(rb"^[\x21-\x7e]{0,256}$")


async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
    errors = list(err.errors())
    bad_json = [e for e in errors if e.get("type") == "json_invalid"]
    if bad_json:
        reason = (bad_json[0].get("ctx") or {}).get("error", "")
        return JSONResponse({"detail": f"malformed JSON body: {reason}".rstrip(": ")}, status_code=400)
    content_type = request.headers.get("content-type", "")
    if content_type and "json" not in content_type.lower():
        return JSONResponse({"detail": f"Content-Type {content_type!r}: send application/json"}, status_code=415)
    return JSONResponse({"detail": describe_validation_errors(errors)}, status_code=422)


async def refused(request: Request, err: RequestProblem) -> JSONResponse:
    return JSONResponse({"detail": err.message}, status_code=err.status)


class BodyProblem(HTTPException):
    """Raised while the body is read; an HTTPException, so FastAPI's body parsing passes it on as it is."""

    def __init__(self, status: int, message: str):
        super().__init__(status_code=status, detail=message)
        self.status, self.message = status, message


class BodySizeLimit:
    """The body-size cap and the body timeout (pure ASGI).

    A declared ``Content-Length`` over ``state.max_body_bytes`` is refused unread (413). Bytes are also
    counted as they arrive, so a chunked body (no ``Content-Length``) or one longer than it said is cut off
    at the cap (413), not read and parsed in full. A body that stops arriving for ``state.body_timeout_s``
    gets 408 and the request ends, instead of holding the connection open.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        max_bytes = getattr(state, "max_body_bytes", DEFAULT_MAX_BODY_BYTES)
        timeout = getattr(state, "body_timeout_s", DEFAULT_BODY_TIMEOUT_S)
        for key, value in scope.get("headers", ()):
            if key == b"content-length" and value.isdigit() and int(value) > max_bytes:
                await JSONResponse({"detail": f"body of {int(value)} bytes; the limit is {max_bytes}"},
                                   status_code=413)(scope, receive, send)
                return
        received = 0
        body_done = False
        response_started = False

        async def counted_receive():
            nonlocal received, body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout)
            except asyncio.TimeoutError:
                raise BodyProblem(408, f"the body stopped arriving ({received} bytes in, nothing for "
                                       f"{timeout:g} s); send it whole") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise BodyProblem(413, f"body of more than {max_bytes} bytes (read {received} so far); "
                                           f"the limit is {max_bytes}")
                body_done = not message.get("more_body", False)
            return message

        async def noted_send(message):
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, noted_send)
        except BodyProblem as problem:
            if response_started:
                raise
            await JSONResponse({"detail": problem.message}, status_code=problem.status)(scope, receive, send)


class ModelIdHeaderCheck:
    """Refuse (400) a model-id header whose value is not printable ASCII of at most 256 bytes (pure ASGI)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            for key, value in scope.get("headers", ()):
                if key.lower().replace(b"-", b"_") == MODEL_ID_HEADER.encode() and not _MODEL_ID_VALUE.match(
                        value.strip()):
                    shown = value[:40].decode("utf-8", "backslashreplace")
                    response = JSONResponse({"detail": f"header {MODEL_ID_HEADER}: {shown!r} is not a model id "
                                                       "(printable ASCII, at most 256 characters; see GET /models)"},
                                            status_code=400)
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def proxy_middlewares() -> list:
    """Middlewares for Serve's HTTP proxy (``$RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    from starlette.middleware import Middleware

    return [Middleware(ModelIdHeaderCheck)]


def make_api(title: str, description: str) -> FastAPI:
    """A FastAPI app with the shared error handling and body-size cap."""
    api = FastAPI(title=title, description=description,
                  responses={code: {"model": ErrorResponse} for code in (400, 404, 408, 413, 415, 422)})
    api.add_exception_handler(RequestValidationError, invalid_request)
    api.add_exception_handler(RequestProblem, refused)
    api.add_middleware(BodySizeLimit)
    api.add_middleware(ModelIdHeaderCheck)
    api.state.max_body_bytes = DEFAULT_MAX_BODY_BYTES
    api.state.body_timeout_s = DEFAULT_BODY_TIMEOUT_S
    return api


def body_limit(max_sentences: int, max_words: int, max_word_chars: int) -> int:
    """Bytes of the largest request within the limits, every character JSON-escaped (\\uXXXX)."""
    return max_sentences * max_words * (6 * max_word_chars + 3) + 4096


def bind_app(deployment, cfg, deployment_options: dict[str, dict[str, Any]] | None = None):
    """``deployment`` bound to the validated args ``cfg`` (a dataclass, sent to the replicas as a dict),
    with the options a Serve config's ``deployments:`` entry of that name would set (``topro serve``
    deploys without a config file)."""
    options = (deployment_options or {}).get(deployment.name)
    if options:
        deployment = deployment.options(**options)
    return deployment.bind(asdict(cfg))
