"""The selenium_elevenlabs plugin's variables: its browser's (the selenium pool's Chromium or Grid)
and the text-to-speech site's account and waits, read by this package only.

Its own module, so the plugin (``__init__``) and its browser (``browser.py``) both import it.
"""

from __future__ import annotations

from pydantic import Field, SecretStr

from rekku.plugin import PluginSettings


class SeleniumElevenLabsSettings(PluginSettings):
    """``SeleniumElevenLabsSettings.get()``; .env.example documents each variable."""

    #: Run the local Chromium without a window.
    headless: bool = Field(True, validation_alias="REKKU_SELENIUM_HEADLESS")
    #: A W3C WebDriver server (Selenium Grid, or chromedriver --port=N); set, browsers are webdriver.Remote
    #: sessions there instead of a local Chromium (README "Browser and Reddit": downloads).
    remote_url: str | None = Field(None, validation_alias="SELENIUM_REMOTE_URL")
    #: Actions one browser serves before it is recycled (0: never).
    max_actions: int = Field(50, ge=0, validation_alias="SELENIUM_MAX_ACTIONS")
    #: Local Chromium and chromedriver binaries.
    chromium_path: str = Field("/usr/bin/chromium", validation_alias="REKKU_CHROMIUM_PATH")
    chromedriver_path: str = Field("/usr/bin/chromedriver", validation_alias="REKKU_CHROMEDRIVER_PATH")
    #: The ElevenLabs account; without both, the speech action is disabled.
    email: str | None = Field(None, validation_alias="ELEVENLABS_EMAIL")
    password: SecretStr | None = Field(None, validation_alias="ELEVENLABS_PASSWORD")
    #: Base URL of the text-to-speech site (a test site in the tests).
    url: str = Field("https://elevenlabs.io", validation_alias="ELEVENLABS_URL")
    #: Seconds to wait for the generated speech, and then for its download.
    generate_timeout: float = Field(90.0, gt=0, validation_alias="ELEVENLABS_GENERATE_TIMEOUT")
    download_timeout: float = Field(120.0, gt=0, validation_alias="ELEVENLABS_DOWNLOAD_TIMEOUT")
    #: Time limit of a whole speech action, in seconds (a hung page fails it and the browser is discarded).
    time_limit: float = Field(300.0, gt=0, validation_alias="ELEVENLABS_TIME_LIMIT")
