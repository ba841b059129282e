"""``GET /v1/artifacts/{name}``: files actions produced (speech audio in the outbox), token required.

The file is opened once by :func:`rekku.artifacts.open_artifact` (inside the artifact directory,
``O_NOFOLLOW``, a regular file with no other hard link) and streamed from that descriptor: a
symbolic link placed in the directory is a 404, and nothing can swap the file between the check
and the read (serving by path, as ``FileResponse`` does, would open it a second time).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, BinaryIO

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException

from rekku.artifacts import FileRefRefused, open_artifact
from rekku.auth import require_token
from rekku.schemas import ErrorResponse

router = APIRouter(dependencies=[Depends(require_token)], responses={401: {"model": ErrorResponse}})

#: Content types by suffix; anything else is served as bytes.
MEDIA_TYPES = {".mp3": "audio/mpeg", ".ogg": "audio/ogg", ".oga": "audio/ogg", ".wav": "audio/wav"}
#: Bytes read per chunk of the response.
CHUNK = 64 * 1024


@router.get("/v1/artifacts/{name}", response_class=StreamingResponse, responses={404: {"model": ErrorResponse}})
def get_artifact(name: str) -> Any:
    """An artifact's bytes (e.g. the ``audio_url`` of an outbox message)."""
    try:
        fh = open_artifact(name)
    except FileRefRefused:
        raise HTTPException(404, f"no artifact named {name[:200]!r}") from None
    size = os.fstat(fh.fileno()).st_size
    suffix = os.path.splitext(name)[1].lower()
    return StreamingResponse(_chunks(fh), media_type=MEDIA_TYPES.get(suffix, "application/octet-stream"),
                             headers={"Content-Length": str(size)})


def _chunks(fh: BinaryIO) -> Iterator[bytes]:
    """The open file's bytes, closing it at the end (or when the client goes away)."""
    with fh:
        while chunk := fh.read(CHUNK):
            yield chunk
