"""The upload limit, enforced while the request body arrives: a 3 GB upload is refused after 25 MB, not
after it was buffered."""
from __future__ import annotations

import json

from starlette.exceptions import HTTPException

MAX_DRAIN_FACTOR = 4  # read (and drop) at most this many times the limit, so the client gets its 413 cleanly


class UploadTooLarge(HTTPException):
    """Raised while the form is parsed. An HTTPException, because FastAPI turns any other exception raised
    while it parses a body into a 400 'error parsing the body'."""

    def __init__(self, limit_mb: float):
        self.limit_mb = limit_mb
        super().__init__(413, f"the upload is larger than this server's limit of {limit_mb:g} MB (--max-upload-mb)")


class UploadLimit:
    """ASGI middleware: bodies of POSTs under `prefix` are counted as they arrive."""

    def __init__(self, app, limit_mb: float, prefix: str = "/v1/audio/"):
        self.app, self.limit_mb, self.limit, self.prefix = app, limit_mb, int(limit_mb * 2**20), prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or not scope["path"].startswith(self.prefix):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._drain(receive, 0)
            return await self._refuse(send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    if message.get("more_body"):
                        await self._drain(receive, received)
                    raise UploadTooLarge(self.limit_mb)
            return message

        await self.app(scope, counted, send)

    async def _drain(self, receive, received: int) -> None:
        """Read the rest of the body and drop it: a client still sending when the answer comes would see a
        broken connection instead of the 413."""
        while received <= self.limit * MAX_DRAIN_FACTOR:
            message = await receive()
            if message["type"] != "http.request":
                return
            received += len(message.get("body", b""))
            if not message.get("more_body"):
                return

    async def _refuse(self, send) -> None:
        body = json.dumps({"error": {"message": UploadTooLarge(self.limit_mb).detail, "type": "invalid_request_error",
                                     "param": "file", "code": "file_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
