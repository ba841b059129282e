"""The bearer-token check every ``/v1`` route depends on (constant-time compare).

A plain dependency, not a closure inside the app factory, so routers in other modules
(outbox, prompt, ...) use the same check: ``APIRouter(dependencies=[Depends(require_token)])``.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

_bearer = HTTPBearer(auto_error=False)


async def require_token(request: Request,
                        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    expected: bytes = request.app.state.api_token
    given = credentials.credentials.encode() if credentials else b""
    if not credentials or not hmac.compare_digest(given, expected):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
