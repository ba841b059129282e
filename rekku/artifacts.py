"""Files actions produce (speech audio), kept under ``REKKU_ARTIFACT_DIR`` and served by the API.

The directory is shared by the workers that write artifacts, the io workers that upload them and
the ingress that serves them (a volume in docker-compose). Names are flat (``<action id>.mp3``), so
a name from a URL can never leave the directory.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from rekku.errors import PluginError
from rekku.settings import Settings, get_settings

#: What an artifact name may look like (no directories, no dot files).
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,190}$")


def artifact_dir(settings: Settings | None = None) -> Path:
    settings = settings or get_settings()
    path = (settings.artifact_dir or settings.home_dir / "artifacts").expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def path_of(name: str, settings: Settings | None = None) -> Path | None:
    """The artifact's file, or None when the name is invalid."""
    if not NAME.match(name) or name.startswith(".") or ".." in name:
        return None
    return artifact_dir(settings) / name


def url_of(name: str) -> str:
    """The artifact's URL path on the ingress (``GET /v1/artifacts/{name}``, token required)."""
    return f"/v1/artifacts/{name}"


def keep(source: Path, name: str, settings: Settings | None = None) -> Path:
    """Move ``source`` into the artifact directory as ``name``; refused above REKKU_ARTIFACT_MAX_BYTES."""
    settings = settings or get_settings()
    size = source.stat().st_size
    if size > settings.artifact_max_bytes:
        raise PluginError(f"the file is {size} bytes, above REKKU_ARTIFACT_MAX_BYTES ({settings.artifact_max_bytes})")
    target = path_of(name, settings)
    if target is None:
        raise ValueError(f"invalid artifact name {name!r}")
    partial = target.with_name(f".{name}.part")
    shutil.copyfile(source, partial)
    partial.replace(target)  # readers never see half a file
    return target
