"""reddit_plugin: ``message_reddit`` — reply on Reddit, or submit a new self post, with praw.

``thread_id`` set: reply to that comment, falling back to the submission of that id (upstream's
order). No ``thread_id``: a self post in ``target`` (``r/name`` or ``name``; upstream's
``lstrip("r/")`` ate leading r's and slashes) with ``title`` and optional ``flair_id``.

The original Rekku also had a Reddit *interface* whose ``message_reddit`` took ``reply_message_id``:
here it is the older name of ``thread_id`` (the same reply to a comment, renamed at the ingress). Its
other two meanings are refused clearly, never guessed: a reply to a private message (a ``t4_`` id) and a
direct message to a user (a ``u/name`` target).

Endpoints come from ``REDDIT_URL`` (token) and ``REDDIT_OAUTH_URL`` (API), so tests run praw
against a local fake. One account, one rate limit (``REDDIT_RATE_LIMIT``, a Celery rate limit per
worker node). A post is recorded in ``interface_deliveries`` as ``sending`` before the call and
``sent`` after it, like rekku/interfaces/delivery.py: a redelivered action never posts twice (a
record left ``sending`` by a dead worker is reported ``uncertain``, not posted again).
"""

from __future__ import annotations

import re
import threading
from typing import Any

import sqlalchemy as sa
from pydantic import Field, SecretStr
from sqlalchemy.exc import IntegrityError

from rekku.plugin import (
    DELIVERY_SENDING,
    DELIVERY_SENT,
    AIPluginBase,
    Delivery,
    PluginError,
    PluginSettings,
    TransientError,
    current_action,
    get_settings,
    register_plugin,
    session_factory,
    utcnow,
)

#: A subreddit name as Reddit allows it (3-21 characters; a few old ones have 2).
SUBREDDIT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]{1,20}$")
#: Reddit's limits on a title and on a post or comment body.
MAX_TITLE, MAX_TEXT = 300, 40_000


class RedditSettings(PluginSettings):
    """The Reddit account and endpoints (REDDIT_*); .env.example documents each variable."""

    #: The account; without all four, message_reddit is disabled.
    client_id: str | None = Field(None, validation_alias="REDDIT_CLIENT_ID")
    client_secret: SecretStr | None = Field(None, validation_alias="REDDIT_CLIENT_SECRET")
    username: str | None = Field(None, validation_alias="REDDIT_USERNAME")
    password: SecretStr | None = Field(None, validation_alias="REDDIT_PASSWORD")
    user_agent: str = Field("rekku/0.1", validation_alias="REDDIT_USER_AGENT")
    #: Base URLs of Reddit's OAuth API and website (a local fake in the tests).
    oauth_url: str = Field("https://oauth.reddit.com", validation_alias="REDDIT_OAUTH_URL")
    url: str = Field("https://www.reddit.com", validation_alias="REDDIT_URL")
    #: Celery rate limit of message_reddit per worker node (one account: run one io node for Reddit).
    rate_limit: str = Field("10/m", validation_alias="REDDIT_RATE_LIMIT")


def _secret(value: SecretStr | None) -> str:
    return value.get_secret_value() if value is not None else ""


def subreddit_name(target: str) -> str:
    """``r/name``, ``/r/name`` or ``name`` → ``name`` (only a whole ``r/`` prefix is removed)."""
    name = target.strip()
    name = re.sub(r"^/?r/", "", name, flags=re.IGNORECASE)
    return name.strip("/")


class RedditPlugin(AIPluginBase):
    pool = "io"
    max_retries = 3
    time_limit = 60.0
    settings_class = RedditSettings

    def __init__(self) -> None:
        self.rate_limit = RedditSettings.get().rate_limit
        self._local = threading.local()
        register_plugin("reddit_plugin", self)

    @staticmethod
    def get_supported_action_types() -> list[str]:
        return ["message_reddit"]

    def get_supported_actions(self) -> dict:
        return {"message_reddit": {
            "description": "Post on Reddit: reply to a comment or post (thread_id), or submit a new self post",
            "required_fields": ["text", "target"], "optional_fields": ["title", "thread_id", "flair_id"],
            "aliases": {"reply_message_id": "thread_id"}}}

    def get_prompt_instructions(self, action_name: str) -> dict:
        return {"description": "Reply on Reddit when 'thread_id' (a comment or post id) is given; otherwise "
                               "submit a new self post to 'target' with 'title'.",
                "payload": {"text": {"type": "string", "required": True},
                            "target": {"type": "string", "required": True, "description": "subreddit, r/name"},
                            "title": {"type": "string", "required": False, "description": "needed for a new post"},
                            "thread_id": {"type": "string", "required": False},
                            "flair_id": {"type": "string", "required": False}}}

    def unavailable_reason(self) -> str | None:
        settings = RedditSettings.get()
        missing = [name for name, value in (("REDDIT_CLIENT_ID", settings.client_id),
                                            ("REDDIT_CLIENT_SECRET", _secret(settings.client_secret)),
                                            ("REDDIT_USERNAME", settings.username),
                                            ("REDDIT_PASSWORD", _secret(settings.password))) if not value]
        if missing:
            return f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set"
        try:
            import praw  # noqa: F401
        except ImportError:
            return "praw is not installed (pip install 'rekku-on-celery[reddit]')"
        return None

    def validate_payload(self, action_type: str, payload: dict) -> list[str]:
        errors = []
        for key in ("text", "target", "title", "thread_id", "flair_id"):
            if key in payload and payload[key] is not None and not isinstance(payload[key], str):
                errors.append(f"Field '{key}' must be a string for action '{action_type}'")
        if errors:
            return errors
        if not SUBREDDIT.match(subreddit_name(payload.get("target") or "")):
            user = re.match(r"^/?u(?:ser)?/", (payload.get("target") or "").strip(), flags=re.IGNORECASE)
            errors.append(f"Field 'target' must be a subreddit like r/name for action '{action_type}'"
                          + (" (direct messages to users are not sent here)" if user else ""))
        if (payload.get("thread_id") or "").strip().lower().startswith("t4_"):
            errors.append(f"Field 'thread_id' is a private message (t4_) for action '{action_type}': replies to "
                          "private messages are not sent here; give a comment (t1_) or post (t3_) id")
        if len(payload.get("text") or "") > MAX_TEXT:
            errors.append(f"Field 'text' is longer than {MAX_TEXT} characters for action '{action_type}'")
        if not payload.get("thread_id"):
            title = (payload.get("title") or "").strip()
            if not title:
                errors.append(f"Field 'title' is needed for a new post (no 'thread_id') for action '{action_type}'")
            elif len(title) > MAX_TITLE:
                errors.append(f"Field 'title' is longer than {MAX_TITLE} characters for action '{action_type}'")
        return errors

    # ----------------------------------------------------------------- running
    def reddit(self, settings: RedditSettings) -> Any:
        """One praw client per thread (praw is not thread-safe), reused between actions."""
        client = getattr(self._local, "client", None)
        if client is None:
            import praw

            client = praw.Reddit(
                client_id=settings.client_id, client_secret=_secret(settings.client_secret),
                username=settings.username, password=_secret(settings.password),
                user_agent=settings.user_agent, oauth_url=settings.oauth_url.rstrip("/"),
                reddit_url=settings.url.rstrip("/"), check_for_updates=False, ratelimit_seconds=0,
                timeout=get_settings().interface_timeout)
            self._local.client = client
        return client

    def handle_custom_action(self, action_type: str, payload: dict) -> dict:
        ctx = current_action()
        action_id = ctx.action_id if ctx else ""
        name = subreddit_name(payload["target"])
        thread = (payload.get("thread_id") or "").strip() or None
        key = f"reddit|{name.lower()}|{thread or ''}|0"
        return _once(action_id, key, name, lambda: self._post(name, thread, payload))

    def _post(self, name: str, thread: str | None, payload: dict) -> dict:
        reddit = self.reddit(RedditSettings.get())
        text = payload["text"]
        try:
            if thread:
                thread = re.sub(r"^t[13]_", "", thread)
                try:
                    comment = reddit.comment(thread).reply(text)
                    return {"kind": "reply", "id": comment.id, "parent": f"t1_{thread}", "subreddit": name}
                except _api_errors() as exc:
                    if not _codes(exc) & {"DELETED_COMMENT", "NO_THING_ID", "INVALID_THING_ID"}:
                        raise
                comment = reddit.submission(thread).reply(text)
                return {"kind": "reply", "id": comment.id, "parent": f"t3_{thread}", "subreddit": name}
            kwargs = {"flair_id": payload["flair_id"]} if payload.get("flair_id") else {}
            post = reddit.subreddit(name).submit(payload["title"].strip(), selftext=text, **kwargs)
            return {"kind": "post", "id": post.id, "subreddit": name, "title": payload["title"].strip()}
        except _api_errors() as exc:
            raise PluginError(_explain(exc, name, thread)) from None


def _api_errors() -> tuple[type[BaseException], ...]:
    from praw.exceptions import RedditAPIException

    return (RedditAPIException,)


def _codes(exc: Any) -> set[str]:
    return {item.error_type for item in getattr(exc, "items", [])}


def _explain(exc: Any, name: str, thread: str | None) -> str:
    codes = _codes(exc)
    messages = "; ".join(f"{i.error_type}: {i.message}" for i in getattr(exc, "items", []))
    if "RATELIMIT" in codes:
        return f"Reddit rate limit: {messages}"
    if codes & {"DELETED_COMMENT", "DELETED_LINK", "THREAD_LOCKED", "TOO_OLD"}:
        return f"Reddit thread {thread} is deleted or closed: {messages}"
    return f"Reddit refused the post to r/{name}: {messages}"


def _once(action_id: str, key: str, name: str, post: Any) -> dict:
    """Run ``post`` at most once per action and key, recorded before and after (see the module doc)."""
    import prawcore

    sessions = session_factory()
    where = (Delivery.action_id == action_id, Delivery.part_key == key)
    with sessions.begin() as s:
        row = s.execute(sa.select(Delivery.status, Delivery.remote_id).where(*where)).first()
    if row is not None and row.status == DELIVERY_SENT:
        return {"already_posted": True, "id": row.remote_id, "subreddit": name}
    if row is not None:
        return {"uncertain": True, "subreddit": name,
                "note": "an earlier attempt died while posting; not posted again to avoid a duplicate"}
    now = utcnow()
    try:
        with sessions.begin() as s:
            s.execute(sa.insert(Delivery).values(action_id=action_id, part_key=key, interface="reddit",
                                                 chat_id=name, status=DELIVERY_SENDING, created_at=now, updated_at=now))
    except IntegrityError:
        return {"uncertain": True, "subreddit": name, "note": "another delivery of this action is posting"}
    try:
        result = post()
    except (prawcore.exceptions.RequestException, prawcore.exceptions.ServerError) as exc:
        # the request may or may not have reached Reddit: keep the record, never post twice
        return {"uncertain": True, "subreddit": name, "note": f"no clear answer from Reddit ({type(exc).__name__})"}
    except prawcore.exceptions.Forbidden:
        _forget(sessions, where)
        raise PluginError(f"Reddit refused the post: r/{name} is private, banned or forbids this account") from None
    except prawcore.exceptions.NotFound:
        _forget(sessions, where)
        raise PluginError(f"Reddit: r/{name} or the thread does not exist") from None
    except prawcore.exceptions.TooManyRequests as exc:
        _forget(sessions, where)
        raise TransientError("Reddit: too many requests", retry_after=60.0) from exc
    except BaseException:
        _forget(sessions, where)
        raise
    with sessions.begin() as s:
        s.execute(sa.update(Delivery).where(*where).values(status=DELIVERY_SENT, remote_id=str(result.get("id")),
                                                            updated_at=utcnow()))
    return result


def _forget(sessions: Any, where: tuple) -> None:
    with sessions.begin() as s:
        s.execute(sa.delete(Delivery).where(*where))


PLUGIN_CLASS = RedditPlugin
