"""The baseline: a bare Litestar endpoint that decodes the same payload with msgspec and answers OK.

No checks, no audit, no metrics: what the receiver would cost if auditing were free.
Run: uvicorn --factory tests.benchmarks.bare:create_app
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Litestar, Request, Response, post

OK = b'{"ActionStatus":"OK","ErrorInfo":"","ErrorCode":0}'


@post("/callback", status_code=200)
async def callback(request: Request[Any, Any, Any]) -> Response[bytes]:
    msgspec.json.decode(await request.body())
    return Response(OK, media_type="application/json")


def create_app() -> Litestar:
    return Litestar([callback], openapi_config=None)
