"""``GET /v1/artifacts/{name}``: files actions produced (speech audio in the outbox), token required."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException

from rekku.artifacts import path_of
from rekku.auth import require_token
from rekku.schemas import ErrorResponse

router = APIRouter(dependencies=[Depends(require_token)], responses={401: {"model": ErrorResponse}})

#: Content types by suffix; anything else is served as bytes.
MEDIA_TYPES = {".mp3": "audio/mpeg", ".ogg": "audio/ogg", ".oga": "audio/ogg", ".wav": "audio/wav"}


@router.get("/v1/artifacts/{name}", response_class=FileResponse, responses={404: {"model": ErrorResponse}})
def get_artifact(name: str) -> Any:
    """An artifact's bytes (e.g. the ``audio_url`` of an outbox message)."""
    path = path_of(name)
    if path is None or not path.is_file():
        raise HTTPException(404, f"no artifact named {name!r}")
    return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream"))
