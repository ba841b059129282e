"""Turn what an LLM answered into a list of raw actions.

Accepted: ``{"actions": [...]}``, a bare list of actions, one action object, or any of those inside
prose and code fences. A bare array keeps all of its actions (upstream kept only the first), and a
top-level ``system_message`` is never executed: it is an echo of our own messages.
Nothing here raises on bad input: every problem becomes a message in ``ParseResult.errors``.

A reply with no JSON at all (plain prose: no code fence, no bracket that starts a JSON value or looks
like the start of one) is still an error here, and is also returned as ``plain_text``: the ingress may
send it to the requesting chat as a message, as the original Rekku did (REKKU_PLAIN_REPLY_AS_MESSAGE).
Text holding JSON that is not actions, or broken JSON, never counts as prose: it stays a correction.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

#: At most this many ``{``/``[`` positions are tried when looking for JSON inside prose.
MAX_CANDIDATES = 64
#: Message for JSON nested past Python's recursion limit (the C decoder stops there safely).
_TOO_DEEP = "JSON nested too deeply"

_FENCE = re.compile(r"```[ \t]*(?:json|JSON|javascript)?[ \t]*\r?\n?(.*?)```", re.DOTALL)
#: What no plain prose holds: a code fence, or a bracket opening what looks like JSON (``{"``, ``{'``,
#: ``{}``, ``[{``, ``[[``, ``["``, ``[]``), even broken JSON a model meant as actions.
_JSON_SIGNS = re.compile(r"```|\{\s*[\"'}]|\[\s*[\[{\]\"]")


class _DuplicateKey(ValueError):
    pass


@dataclass
class ParseResult:
    """The raw actions found, and why nothing was found when so."""

    actions: list[Any] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    ignored_system_message: bool = False
    #: The reply, stripped, when it holds no JSON at all (plain prose); ``errors`` says so too.
    plain_text: str | None = None


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _pairs(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"duplicate key '{key[:50]}' in a JSON object")
        out[key] = value
    return out


def _finite(text: str) -> float:
    """JSON numbers like ``1e400`` would decode to infinity, which no JSON answer or column can hold."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:30]} is out of range")
    return value


_DECODER = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_no_constants, parse_float=_finite)


def decode_json(text: str) -> Any:
    """Strict JSON: no NaN/Infinity, no duplicate keys; too-deep nesting is a ValueError, not a crash."""
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise ValueError(_TOO_DEEP) from None


def _looks_like_actions(value: Any) -> bool:
    if isinstance(value, dict):
        return "actions" in value or "type" in value or "system_message" in value
    if isinstance(value, list):
        return bool(value) and all(isinstance(v, dict) for v in value)
    return False


def _find_json(text: str) -> tuple[Any, str | None]:
    """The whole text as JSON, else the first JSON value inside it that looks like actions."""
    stripped = text.strip()
    if not stripped:
        return None, "The reply is empty: expected JSON actions"
    try:
        return decode_json(stripped), None
    except ValueError as exc:
        first_error = str(exc)
    blocks = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    tried = 0
    for block in blocks:
        for match in re.finditer(r"[\[{]", block):
            if tried >= MAX_CANDIDATES:
                break
            tried += 1
            try:
                value, _end = _DECODER.raw_decode(block, match.start())
            except RecursionError:
                first_error = _TOO_DEEP
                continue
            except _DuplicateKey as exc:
                first_error = str(exc)
                continue
            except ValueError:
                continue
            if _looks_like_actions(value):
                return value, None
    return None, f"No JSON actions found in the reply ({first_error})"


def is_plain_prose(text: str) -> bool:
    """True when ``text`` holds no JSON at all: not JSON as a whole, no code fence, nothing that looks
    like the start of a JSON object or list, and no bracket where a JSON value decodes."""
    if _JSON_SIGNS.search(text):
        return False
    try:
        decode_json(text.strip())
        return False
    except ValueError:
        pass
    for tried, match in enumerate(re.finditer(r"[\[{]", text)):
        if tried >= MAX_CANDIDATES:
            return False  # too many brackets to be sure: not taken as prose
        try:
            _DECODER.raw_decode(text, match.start())
            return False
        except (ValueError, RecursionError):
            continue
    return True


def extract_actions(value: Any, result: ParseResult) -> None:
    """Flatten one of the three accepted top-level forms into ``result.actions``."""
    if isinstance(value, list):
        result.actions.extend(value)
    elif isinstance(value, dict):
        if "system_message" in value:
            result.ignored_system_message = True
        if "actions" in value:
            actions = value["actions"]
            if isinstance(actions, list):
                result.actions.extend(actions)
            elif isinstance(actions, dict):
                result.actions.append(actions)
            else:
                result.errors.append("'actions' must be a list of action objects")
        elif "type" in value or "payload" in value:
            result.actions.append(value)
        elif not result.ignored_system_message:
            result.errors.append("Expected {\"actions\": [...]}, a list of actions, or one action object")
    else:
        result.errors.append("Expected {\"actions\": [...]}, a list of actions, or one action object; "
                             f"got a JSON {type(value).__name__}")


def parse_text(text: str | bytes) -> ParseResult:
    """Parse raw LLM output (JSON, possibly in fences or prose) into raw actions."""
    result = ParseResult()
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            result.errors.append(f"The reply is not valid UTF-8 ({exc.reason} at byte {exc.start})")
            return result
    value, error = _find_json(text)
    if error:
        result.errors.append(error)
        if text.strip() and is_plain_prose(text):
            result.plain_text = text.strip()
        return result
    extract_actions(value, result)
    return result


def parse_value(value: Any) -> ParseResult:
    """Accept an already-decoded JSON value in any of the three forms."""
    result = ParseResult()
    extract_actions(value, result)
    return result
