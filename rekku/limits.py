"""Bounds on what a request may carry, checked before anything is validated further, stored or echoed.

Payloads and reply text are written by the model, which users steer (SECURITY.md), so their
shape is untrusted:

* a string that is not valid UTF-8 (a lone surrogate, which JSON's ``"\\ud800"`` escape produces)
  cannot be stored on MariaDB (utf8mb4) nor encoded in an answer, so one stored value would break
  every read route that shows it;
* deep nesting makes each recursive reader downstream (JSON encoders, kombu, the database driver)
  raise ``RecursionError``, which used to surface as "the broker is unreachable" or a 500;
* context values longer than the indexed columns (VARCHAR(191) on MariaDB) fail at insert.

Every walk here is iterative, so no input can overflow it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

#: Deepest nesting of an action payload, in levels as MariaDB's JSON_DEPTH counts them: the payload
#: object is level 1, and each value inside an object or array one level below it (so ``{"a": 1}``
#: has two). MariaDB refuses to store JSON deeper than 32.
MAX_PAYLOAD_DEPTH = 32
#: Longest value of a request context (ids, interface, username), in characters: the indexed
#: columns that hold them are VARCHAR(191) on MariaDB with utf8mb4.
MAX_CONTEXT_CHARS = 191
#: Longest field name in a payload, in characters.
MAX_KEY_CHARS = 256
#: At most this many shape errors are reported per action (one broken field is usually many).
MAX_REPORTED = 10


def is_valid_text(value: str) -> bool:
    """True when ``value`` can be written as UTF-8 (no lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(value: str) -> str:
    """``value`` with anything that is not valid UTF-8 written as an escape (``\\ud800``), safe to echo."""
    return value if is_valid_text(value) else value.encode("utf-8", "backslashreplace").decode("utf-8")


def printable_value(value: Any) -> Any:
    """``value`` with every string (and key) made :func:`printable`, to echo a refused request back; only
    for values within the depth limit (it recurses)."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no infinity: echoed as the text "inf"
    if isinstance(value, dict):
        return {printable(k) if isinstance(k, str) else k: printable_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [printable_value(v) for v in value]
    return value


def depth_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` nests objects/lists deeper than ``limit`` levels (a scalar is level 0)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


#: A place in a payload, built lazily: ``(parent, key or index)``; its text is made only for an error,
#: so a wide payload with long keys costs no copies of its paths.
Path = tuple[Any, Any] | None


def path_text(path: Path) -> str:
    """``a.b[2].c`` for a :data:`Path`, shortened and safe to echo."""
    parts: list[str] = []
    while path is not None:
        path, step = path
        parts.append(f"[{step}]" if isinstance(step, int) else f".{printable(str(step)[:60])}")
    text = "".join(reversed(parts)).lstrip(".")
    return text if len(text) <= 200 else text[:97] + "…" + text[-100:]


def _walk(payload: dict) -> Iterator[tuple[Path, Any, int, bool]]:
    """Every (path, value, depth, is_key) below ``payload``, depth first, without recursion; a value
    deeper than :data:`MAX_PAYLOAD_DEPTH` is yielded but not entered."""
    stack: list[tuple[Path, Any, int]] = [(None, payload, 1)]
    while stack:
        path, value, depth = stack.pop()
        if depth > 1:
            yield path, value, depth, False
        if depth > MAX_PAYLOAD_DEPTH:
            continue
        if isinstance(value, dict):
            for key in value:
                yield (path, key), key, depth, True
            # pushed last first, so values come out in the payload's own order (errors read top-down)
            stack.extend(((path, key), value[key], depth + 1) for key in reversed(value))
        elif isinstance(value, list):
            stack.extend(((path, i), value[i], depth + 1) for i in range(len(value) - 1, -1, -1))


def payload_errors(action_type: str, payload: dict, max_chars: int) -> list[str]:
    """Why this payload's shape is refused: too deep, a string or a field name too long, text that is
    not UTF-8, a number that is not finite (``1e400`` decodes to infinity, which JSON cannot hold)."""
    errors: list[str] = []
    too_deep = False
    for path, value, depth, is_key in _walk(payload):
        if is_key:
            if isinstance(value, str) and len(value) > MAX_KEY_CHARS:
                where = f"in '{path_text(path[0])}'" if path[0] is not None else "at the payload's top level"
                errors.append(f"A field name {where} is too long for action '{action_type}' "
                              f"({len(value)} characters; at most {MAX_KEY_CHARS})")
            elif isinstance(value, str) and not is_valid_text(value):
                errors.append(f"A field name at '{path_text(path)}' is not valid UTF-8 (it holds a lone surrogate "
                              f"such as \\ud800) for action '{action_type}'; write the text itself")
        elif depth > MAX_PAYLOAD_DEPTH:
            if not too_deep:  # once: every value below the limit would repeat it
                errors.append(f"Field '{path_text(path)}' is nested too deeply for action '{action_type}' "
                              f"(a payload may nest at most {MAX_PAYLOAD_DEPTH} levels)")
            too_deep = True
        elif isinstance(value, str):
            if len(value) > max_chars:
                errors.append(f"Field '{path_text(path)}' is too long for action '{action_type}' "
                              f"({len(value)} characters; at most {max_chars})")
            elif not is_valid_text(value):
                errors.append(f"Field '{path_text(path)}' is not valid UTF-8 text for action '{action_type}' (it "
                              "holds a lone surrogate such as \\ud800); write the character itself or drop it")
        elif isinstance(value, float) and not math.isfinite(value):
            errors.append(f"Field '{path_text(path)}' is not a finite number for action '{action_type}'")
        if len(errors) >= MAX_REPORTED:
            break
    return errors


def over_limit(value: Any, max_bytes: int, max_depth: int) -> str | None:
    """Which bound ``value`` breaks, in one walk that stops as soon as it knows: "size" when written as
    JSON it would take more than about ``max_bytes`` (strings by length, other values a few bytes
    each; nothing is written), "depth" when containers nest deeper than ``max_depth``; else None."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    total = 0
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            total += len(item) + 3
        elif isinstance(item, (dict, list)):
            if depth + 1 > max_depth:
                return "depth"
            if isinstance(item, dict):
                total += 2 + sum(len(k) + 4 for k in item if isinstance(k, str))
                stack.extend((child, depth + 1) for child in item.values())
            else:
                total += 2 + len(item)
                stack.extend((child, depth + 1) for child in item)
        else:
            total += 8
        if total > max_bytes:
            return "size"
    return None


def context_errors(context: dict[str, str]) -> list[str]:
    """Why a request context is refused: a value too long for its column, or not UTF-8."""
    errors = []
    for key, value in context.items():
        if len(value) > MAX_CONTEXT_CHARS:
            errors.append(f"Context field '{key}' is too long ({len(value)} characters; at most "
                          f"{MAX_CONTEXT_CHARS})")
        elif not is_valid_text(value):
            errors.append(f"Context field '{key}' is not valid UTF-8 text (it holds a lone surrogate)")
    return errors
