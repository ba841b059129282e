"""selenium_elevenlabs: ``speech_selenium_elevenlabs`` — speak a message through the text-to-speech site.

Runs on the selenium pool with the process's browser (plugins/selenium_elevenlabs/browser.py): open the page, log in if
asked, fill the editor, generate, download the .mp3, read the remaining credits (docs/plugins.md §3; the
selectors are class attributes). The audio is kept as an artifact (``REKKU_ARTIFACT_DIR``) and sent to
every destination as an ``audio_<interface>`` action on the io pool, under the idempotency key
``speech:<action id>``, so the browser never waits on a platform and a re-run never sends twice.
The credits go to the trainers (``message_<interface>``) and into the result. Restricted: trainer-only
under ``RESTRICT_ACTIONS=trainer_only``.
"""

from __future__ import annotations

import re
import time
from typing import Any

from rekku.plugin import (
    AIPluginBase,
    PluginError,
    artifact_size,
    artifact_url,
    current_action,
    default_ingress,
    get_interfaces,
    get_settings,
    keep_artifact,
    register_plugin,
)

from .settings import SeleniumElevenLabsSettings

#: Longest message the site takes in one generation.
MAX_MESSAGE = 3000
#: Path of the text-to-speech page under ELEVENLABS_URL.
PAGE = "/app/speech-synthesis/text-to-speech"


class SeleniumElevenLabs(AIPluginBase):
    pool = "selenium"
    restricted = True
    max_retries = 1
    settings_class = SeleniumElevenLabsSettings

    #: docs/plugins.md §3, kept so the real site and test sites built to it both work.
    EMAIL = "input[name='email']"
    PASSWORD = "input[name='password']"  # noqa: S105 - a CSS selector
    SIGN_IN = "//button[contains(., 'Sign in')]"
    SKIP = "//button[normalize-space(.)='Skip']"
    EDITOR = "textarea[data-testid='tts-editor']"
    GENERATE = "button[aria-label^='Generate speech']"
    LOADING = "button[aria-label='Loading'][data-loading='true']"
    DOWNLOAD = "button[aria-label='Download']"
    CREDITS = "//*[contains(text(), 'credits remaining')]"
    LOGIN_ERROR = "[role='alert']"

    def __init__(self) -> None:
        self.time_limit = SeleniumElevenLabsSettings.get().time_limit
        register_plugin("selenium_elevenlabs", self)

    @staticmethod
    def get_supported_action_types() -> list[str]:
        return ["speech_selenium_elevenlabs"]

    def get_supported_actions(self) -> dict:
        return {"speech_selenium_elevenlabs": {
            "description": "Speak a message with the ElevenLabs voice and send the audio to chats",
            "required_fields": ["message", "destinations"], "optional_fields": [], "restricted": True}}

    def get_prompt_instructions(self, action_name: str) -> dict:
        return {"description": "Turn 'message' (at most 3000 characters) into speech and send the audio "
                               "to every destination. Trainer only.",
                "payload": {"message": {"type": "string", "required": True},
                            "destinations": {"type": "array", "required": True,
                                             "items": {"interface": "string", "chat_id": "string",
                                                       "thread_id": "string (optional)"}}}}

    def unavailable_reason(self) -> str | None:
        settings = SeleniumElevenLabsSettings.get()
        if not settings.email or not settings.password:
            return "ELEVENLABS_EMAIL and ELEVENLABS_PASSWORD are not set"
        try:
            import selenium  # noqa: F401
        except ImportError:
            return "selenium is not installed (pip install 'rekku-on-celery[selenium]')"
        return None

    def validate_payload(self, action_type: str, payload: dict) -> list[str]:
        errors = []
        message = payload.get("message")
        if not isinstance(message, str) or not message.strip():
            errors.append(f"Field 'message' must be a non-empty string for action '{action_type}'")
        elif len(message) > MAX_MESSAGE:
            errors.append(f"Field 'message' is longer than {MAX_MESSAGE} characters for action '{action_type}'")
        destinations = payload.get("destinations")
        if not isinstance(destinations, list) or not destinations:
            errors.append(f"Field 'destinations' must be a non-empty list for action '{action_type}'")
            return errors
        for i, dest in enumerate(destinations):
            if not isinstance(dest, dict) or not dest.get("interface") or dest.get("chat_id") in (None, ""):
                errors.append(f"destinations[{i}] needs 'interface' and 'chat_id' for action '{action_type}'")
        return errors

    def handle_custom_action(self, action_type: str, payload: dict) -> dict:
        ctx = current_action()
        action_id = ctx.action_id if ctx else f"local-{int(time.time() * 1000)}"
        name = f"{action_id}.mp3"
        existing = artifact_size(name)
        if existing is not None:  # a re-run after the audio was kept: do not spend credits again
            speech = {"bytes": existing, "credits": None, "credits_remaining": None, "reused": True}
        else:
            speech = self.speak(payload["message"], name)
        result = {"audio": name, "audio_url": artifact_url(name), **speech}
        result["deliveries"] = send_audio(action_id, name, payload["destinations"])
        if speech.get("credits"):
            result["credits_reported_to"] = report_credits(action_id, speech["credits"])
        return result

    # ----------------------------------------------------------------- the browser flow
    def speak(self, message: str, name: str) -> dict[str, Any]:
        """Drive the site once; returns ``{"bytes", "credits", "credits_remaining"}``."""
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec
        from selenium.webdriver.support.ui import WebDriverWait

        from .browser import PageError, browser_session

        settings = SeleniumElevenLabsSettings.get()
        step = _progress
        with browser_session() as browser:
            d = browser.driver
            step("opening the text-to-speech page")
            d.get(settings.url.rstrip("/") + PAGE)
            if "login" in d.current_url:
                step("logging in")
                self._log_in(d, settings)
            for button in d.find_elements(By.XPATH, self.SKIP):
                if button.is_displayed():
                    button.click()
            try:
                editor = WebDriverWait(d, 15).until(ec.element_to_be_clickable((By.CSS_SELECTOR, self.EDITOR)))
            except TimeoutException:
                raise PageError("the text-to-speech editor did not appear") from None
            d.execute_script(_SET_VALUE, editor, message)
            step("generating speech")
            d.find_element(By.CSS_SELECTOR, self.GENERATE).click()
            try:
                WebDriverWait(d, settings.generate_timeout, poll_frequency=0.05).until(
                    lambda drv: not drv.find_elements(By.CSS_SELECTOR, self.LOADING)
                    and drv.find_elements(By.CSS_SELECTOR, self.DOWNLOAD))
            except TimeoutException:
                raise PageError(f"speech generation did not finish within "
                                f"{settings.generate_timeout:g} s") from None
            step("downloading the audio")
            d.find_element(By.CSS_SELECTOR, self.DOWNLOAD).click()
            mp3 = browser.wait_for_download(".mp3", settings.download_timeout)
            if mp3 is None:
                raise PageError(f"the .mp3 download did not finish within {settings.download_timeout:g} s")
            kept = keep_artifact(mp3, name)
            credits = None
            for element in d.find_elements(By.XPATH, self.CREDITS):
                credits = element.text.strip() or credits
            return {"bytes": kept.stat().st_size, "credits": credits, "credits_remaining": _number(credits),
                    "browser": {"session": d.session_id, "actions": browser.actions}}

    def _log_in(self, d: Any, settings: SeleniumElevenLabsSettings) -> None:
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        from .browser import PageError

        try:
            email = WebDriverWait(d, 15).until(lambda drv: drv.find_element(By.CSS_SELECTOR, self.EMAIL))
        except TimeoutException:
            raise PageError("the login form did not appear") from None
        email.clear()
        email.send_keys(settings.email)
        password = d.find_element(By.CSS_SELECTOR, self.PASSWORD)
        password.clear()
        password.send_keys(settings.password.get_secret_value() if settings.password else "")
        d.find_element(By.XPATH, self.SIGN_IN).click()
        try:
            WebDriverWait(d, 15, poll_frequency=0.1).until(
                lambda drv: "login" not in drv.current_url or drv.find_elements(By.CSS_SELECTOR, self.LOGIN_ERROR))
        except TimeoutException:
            raise PageError("the login did not complete") from None
        if "login" in d.current_url:
            alerts = [a.text.strip() for a in d.find_elements(By.CSS_SELECTOR, self.LOGIN_ERROR) if a.text.strip()]
            raise PageError("login failed: " + (alerts[0] if alerts else "still on the login page"))
        if PAGE not in d.current_url:
            d.get(settings.url.rstrip("/") + PAGE)


#: Sets a textarea's value the way a user would (React and plain pages both see the input event).
_SET_VALUE = """
const el = arguments[0], value = arguments[1];
const setter = Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value').set;
el.focus(); setter.call(el, value);
el.dispatchEvent(new Event('input', {bubbles: true}));
el.dispatchEvent(new Event('change', {bubbles: true}));
"""


def _progress(step: str) -> None:
    ctx = current_action()
    if ctx is not None:
        ctx.report_progress(step)


def _number(text: str | None) -> int | None:
    match = re.search(r"(\d[\d,.\s]*)\s*credits remaining", text or "")
    return int(re.sub(r"\D", "", match.group(1))) if match else None


def send_audio(action_id: str, name: str, destinations: list[dict]) -> list[dict]:
    """Enqueue ``audio_<interface>`` for every destination, once per action (key ``speech:<id>``).

    Every destination gets the artifact's NAME, the one form of a server file an audio field takes
    (rekku.artifacts.classify_file_ref): Telegram's io worker uploads the artifact's bytes (the
    directory is shared with the io workers), the webhook and the outbox pass on its API URL
    (``/v1/artifacts/{name}``), which clients fetch with the token."""
    ctx = current_action()
    actions = []
    for dest in destinations:
        body = {"audio": name, "target": str(dest["chat_id"])}
        if dest.get("thread_id") not in (None, ""):
            body["thread_id"] = str(dest["thread_id"])
        actions.append({"type": f"audio_{dest['interface']}", "payload": body})
    context = {k: getattr(ctx, k) for k in ("interface", "chat_id", "thread_id", "user_id", "username")} if ctx else {}
    answer = default_ingress().submit({"actions": actions}, context=context, idempotency_key=f"speech:{action_id}")
    out = []
    for i, dest in enumerate(destinations):
        entry = {"interface": dest["interface"], "chat_id": str(dest["chat_id"])}
        for accepted in answer.accepted:
            if accepted["index"] == i:
                entry["action_id"] = accepted["id"]
        for r in answer.rejected:
            if r.get("index") == i:
                entry["error"] = "; ".join(r.get("errors") or [])
        out.append(entry)
    if not answer.accepted:
        errors = "; ".join(e.get("error", "") for e in out if e.get("error"))
        raise PluginError(f"the audio was made ({name}) but no destination can take it: {errors}")
    return out


def report_credits(action_id: str, credits: str) -> list[str]:
    """Tell every trainer on an available interface how many credits are left (once per action)."""
    interfaces = get_interfaces()
    trainers = sorted((i, u) for i, u in get_settings().trainer_ids if interfaces.get(i) is not None)
    if not trainers:
        return []
    actions = [{"type": f"message_{i}", "payload": {"text": f"ElevenLabs: {credits} (speech action {action_id})",
                                                    "target": u}} for i, u in trainers]
    context = {"interface": trainers[0][0], "user_id": trainers[0][1]}
    answer = default_ingress().submit({"actions": actions}, context=context,
                                      idempotency_key=f"speech-credits:{action_id}")
    return [f"{trainers[a['index']][0]}:{trainers[a['index']][1]}" for a in answer.accepted]


PLUGIN_CLASS = SeleniumElevenLabs
