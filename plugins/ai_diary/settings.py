"""The ai_diary plugin's variables: how much of the diary a prompt carries."""

from __future__ import annotations

from pydantic import Field

from rekku.plugin import PluginSettings


class DiarySettings(PluginSettings):
    """``DiarySettings.get()``; .env.example documents each variable."""

    #: Most characters of diary entries injected into a prompt (whole entries only).
    max_chars: int = Field(15000, ge=0, validation_alias="REKKU_DIARY_MAX_CHARS")
    #: Oldest diary entry injected into a prompt, in days.
    max_days: float = Field(7.0, ge=0, validation_alias="REKKU_DIARY_MAX_DAYS")
