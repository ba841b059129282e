"""Files actions produce (speech audio), kept under ``REKKU_ARTIFACT_DIR`` and served by the API;
and THE rule for every payload field that names a file (:func:`classify_file_ref`).

The directory is shared by the workers that write artifacts, the io workers that upload them and
the ingress that serves them (a volume in docker-compose). Names are flat (``<action id>.mp3``).

Why a rule: the model's reply is untrusted (any chat user can steer it), and an audio field that
took "any existing local path" let it upload ``/proc/self/environ`` (every token of the worker) to
a chat. A file field therefore accepts exactly three forms, and nothing that could name another
file on a server:

(a) **an artifact**, by name: what the system produced itself. The name matches :data:`NAME`
    (flat, with an extension, no leading dot, no ``..``, no ``/``, no NUL), and it is opened inside
    the artifact directory relative to that directory's descriptor with ``O_NOFOLLOW``: a symbolic
    link (even one inside the directory), a hard link to another file, a directory or a FIFO is
    refused (:func:`open_artifact`);
(b) **an http(s) URL**, passed on as a link for the platform or the client to fetch. Rekku never
    downloads it and never re-uploads it; ``file:``, ``ftp:``, ``data:``… are refused;
(c) **a platform file id** (Telegram's ``file_id``): :data:`FILE_ID`, 20 to 255 characters of
    ``A-Z a-z 0-9 _ -`` — no ``.``, ``/`` or ``:``, so it can never be mistaken for an artifact name
    (those always have a ``.``), a path or a URL. It is passed on as is and never opened.

Anything else is refused. The ingress checks it at validation (interfaces through
``Interface.audio_ref``, so the LLM gets the reason as a correction), and the worker checks it
again before sending, so a message already queued or pushed straight to the broker cannot
exfiltrate a file either.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from rekku.errors import PluginError
from rekku.settings import Settings, get_settings

#: An artifact's name: flat, starting with a letter or digit, with at least one extension; ``..``,
#: ``/``, a leading dot and NUL cannot match. (A ``.`` is required so no name is also a file id.)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)+")
#: Longest artifact name (what MariaDB indexes comfortably, and far below any file system's limit).
MAX_NAME = 191
#: A platform file id (Telegram ``file_id``): an opaque token, never a path (no ``.``, ``/``, ``:``).
FILE_ID = re.compile(r"[A-Za-z0-9_-]{20,255}")
#: Schemes a URL may have; it is passed on, never fetched by us.
URL_SCHEMES = ("http", "https")

#: The kinds of :class:`FileRef`.
ARTIFACT, URL, PLATFORM_FILE_ID = "artifact", "url", "file_id"

#: How each accepted form is described to the LLM, by kind.
FORMS = {
    ARTIFACT: "the name of an artifact Rekku produced (a flat file name with an extension, like "
              "'<action id>.mp3' from a speech action's result)",
    URL: "an http:// or https:// URL (passed on as a link, never downloaded by Rekku)",
    PLATFORM_FILE_ID: "a platform file id (Telegram's file_id: 20 to 255 letters, digits, '_' or '-', "
                      "without '/' or '.')",
}

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_UNSAFE_URL_CHARS = re.compile(r"[\x00-\x20\x7f\\]")
#: Open flags of an artifact: never through a symbolic link, never block on a FIFO, no controlling tty.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


@dataclass(frozen=True)
class FileRef:
    """A file field's value that passed :func:`classify_file_ref`: its kind and the value to use."""

    kind: str
    value: str


class FileRefRefused(ValueError):
    """A file field's value is none of the accepted forms; ``reason`` says why, for the LLM."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def explain(self, field: str, action_type: str, kinds: tuple[str, ...] = (ARTIFACT, URL, PLATFORM_FILE_ID)) -> str:
        """The whole correction: which field of which action, why, and what it takes instead."""
        forms = "; ".join(f"({chr(ord('a') + i)}) {FORMS[k]}" for i, k in enumerate(kinds))
        return (f"Field '{field}' of action '{action_type}' was refused: {self.reason}. "
                f"It takes only {forms}. Files on the server are never read by path.")


def artifact_dir(settings: Settings | None = None) -> Path:
    settings = settings or get_settings()
    path = (settings.artifact_dir or settings.home_dir / "artifacts").expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_artifact_name(name: object) -> bool:
    """Whether ``name`` can be an artifact's name at all (flat, with an extension, no dot file)."""
    return isinstance(name, str) and len(name) <= MAX_NAME and NAME.fullmatch(name) is not None


def url_of(name: str) -> str:
    """The artifact's URL path on the ingress (``GET /v1/artifacts/{name}``, token required)."""
    return f"/v1/artifacts/{name}"


def open_artifact(name: str, settings: Settings | None = None) -> BinaryIO:
    """The artifact ``name`` opened for reading, or :class:`FileRefRefused`.

    Opened relative to the directory's own descriptor with ``O_NOFOLLOW``, so what is read is the
    regular file of that name in that directory, never what a symbolic link points to; a file with
    other hard links (the same inode also elsewhere, maybe outside) is refused too."""
    if not is_artifact_name(name):
        raise FileRefRefused(f"{_shown(name)} is not an artifact name")
    directory = os.open(artifact_dir(settings), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = os.open(name, _OPEN_FLAGS, dir_fd=directory)
    except FileNotFoundError:
        raise FileRefRefused(f"there is no artifact named {_shown(name)}") from None
    except OSError as exc:  # ELOOP: a symbolic link (O_NOFOLLOW)
        raise FileRefRefused(f"{_shown(name)} in the artifact directory is not a file Rekku produced "
                             f"({'a symbolic link' if _is_link(directory, name) else exc.strerror})") from None
    finally:
        os.close(directory)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileRefRefused(f"{_shown(name)} in the artifact directory is not a regular file")
        if info.st_nlink != 1:
            raise FileRefRefused(f"{_shown(name)} in the artifact directory is a hard link to another file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def artifact_size(name: str, settings: Settings | None = None) -> int | None:
    """The artifact's size in bytes, or None when there is no such artifact (or it is refused)."""
    try:
        with open_artifact(name, settings) as fh:
            return os.fstat(fh.fileno()).st_size
    except FileRefRefused:
        return None


def classify_file_ref(value: object, settings: Settings | None = None) -> FileRef:
    """THE rule for a payload field naming a file (see the module doc): an artifact that exists
    (checked by opening it as :func:`open_artifact` does), an http(s) URL, or a platform file id.
    Raises :class:`FileRefRefused` with the reason for anything else."""
    if not isinstance(value, str) or not value:
        raise FileRefRefused("it is not a non-empty string")
    scheme = _SCHEME.match(value)
    if scheme:
        return FileRef(URL, _checked_url(value, scheme.group(1)))
    if is_artifact_name(value):
        open_artifact(value, settings).close()
        return FileRef(ARTIFACT, value)
    if FILE_ID.fullmatch(value):
        return FileRef(PLATFORM_FILE_ID, value)
    if "/" in value or "\\" in value or value.startswith(("~", ".")) or "\x00" in value:
        raise FileRefRefused(f"{_shown(value)} is a file path")
    raise FileRefRefused(f"{_shown(value)} is none of the accepted forms")


def keep(source: Path, name: str, settings: Settings | None = None) -> Path:
    """Move ``source`` into the artifact directory as ``name``; refused above REKKU_ARTIFACT_MAX_BYTES.

    Written to a fresh dot file (created exclusively, so never through a planted link) and renamed
    over ``name``: readers never see half a file, and the rename replaces a link rather than following it."""
    settings = settings or get_settings()
    size = source.stat().st_size
    if size > settings.artifact_max_bytes:
        raise PluginError(f"the file is {size} bytes, above REKKU_ARTIFACT_MAX_BYTES ({settings.artifact_max_bytes})")
    if not is_artifact_name(name):
        raise ValueError(f"invalid artifact name {name!r}")
    directory = artifact_dir(settings)
    fd, partial = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            shutil.copyfileobj(src, out)  # mkstemp made it 0600: the requester's audio, private like all state
        os.replace(partial, directory / name)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return directory / name


def _checked_url(value: str, scheme: str) -> str:
    """``value`` when it is a well-formed http(s) URL with a host; else FileRefRefused."""
    if scheme.lower() not in URL_SCHEMES:
        raise FileRefRefused(f"the URL scheme '{scheme.lower()}:' is not accepted (only http and https)")
    if _UNSAFE_URL_CHARS.search(value):
        raise FileRefRefused("the URL contains spaces, control characters or backslashes")
    try:
        host = urlsplit(value).hostname
    except ValueError:
        host = None
    if not host:
        raise FileRefRefused("the URL has no host")
    return value


def _is_link(directory: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=directory, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _shown(value: object) -> str:
    """A value quoted for an error message, cut short (the model sees it; keep it readable)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
