"""One HTTP call to a platform, with its failures sorted into: surely not delivered, maybe delivered."""

from __future__ import annotations

from typing import Any

import requests

from rekku.errors import DeliveryError
from rekku.interfaces.base import DeliveryUncertain

#: Signs, in a connection error's text, that nothing was written to the platform.
_BEFORE_SENDING = ("NewConnectionError", "Connection refused", "Name or service not known",
                   "Failed to resolve", "nodename nor servname")


def post(session: requests.Session, url: str, timeout: float, what: str, **kwargs: Any) -> requests.Response:
    """POST once. Raises DeliveryError when the request surely never reached the platform (it will be
    retried) and DeliveryUncertain when it may have (it will not be sent again)."""
    try:
        return session.post(url, timeout=(min(timeout, 5.0), timeout), **kwargs)
    except requests.ConnectTimeout:
        raise DeliveryError(f"{what}: cannot connect (timeout)") from None
    except requests.ReadTimeout:
        raise DeliveryUncertain(f"{what}: no answer within {timeout:g} s") from None
    except requests.ConnectionError as exc:
        if any(sign in str(exc) for sign in _BEFORE_SENDING):
            raise DeliveryError(f"{what}: cannot connect") from None
        raise DeliveryUncertain(f"{what}: the connection broke before the answer ({type(exc).__name__})") from None


def get(session: requests.Session, url: str, timeout: float, what: str, **kwargs: Any) -> requests.Response:
    """GET once. A GET changes nothing on the platform, so every failure is a DeliveryError (retried)."""
    try:
        return session.get(url, timeout=(min(timeout, 5.0), timeout), **kwargs)
    except requests.RequestException as exc:
        raise DeliveryError(f"{what}: {type(exc).__name__}") from None
