"""The error hierarchy: each kind is mapped once to an HTTP status and to an action state."""

from __future__ import annotations


class RekkuError(Exception):
    """Base of every error this project raises on purpose."""

    #: HTTP status the ingress answers with when this error reaches it.
    http_status: int = 500


class ValidationError(RekkuError):
    """An action or request is malformed; the caller must change it."""

    http_status = 422

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or [message]


class NotAuthorized(RekkuError):
    """The caller may not run this action (not a trainer, restricted, blocked)."""

    http_status = 403


class NotFound(RekkuError):
    """No such action or batch."""

    http_status = 404


class Conflict(RekkuError):
    """The request clashes with the current state (e.g. cancelling a finished action)."""

    http_status = 409


class TooLarge(RekkuError):
    """A request is larger than a documented limit (REKKU_MAX_BODY_BYTES, REKKU_MAX_ACTIONS_PER_REQUEST)."""

    http_status = 413


class TooManyActions(TooLarge):
    """A request holds more actions than REKKU_MAX_ACTIONS_PER_REQUEST allows."""


class PluginError(RekkuError):
    """A plugin failed while handling an action; the action fails, the worker goes on."""


class TransientError(PluginError):
    """A failure worth retrying (network hiccup, rate limit); the action is retried with backoff."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeliveryError(TransientError):
    """An interface could not deliver a message; retried, and failed visibly when retries run out."""


class ServiceUnavailable(RekkuError):
    """The broker or the database cannot be reached."""

    http_status = 503
