"""Quoting content from files in messages: a bounded prefix, control characters escaped.

A hostile file can hold a 99 MB string, a tuple nested and shared until its
``str()`` takes minutes, or terminal escape sequences (``\\x1b]0;owned\\x07``).
Every message that echoes something read from a file goes through :func:`quote`,
which costs time and space bounded by its limits, whatever the value.
"""

from __future__ import annotations

import reprlib
from typing import Any

__all__ = ["MAX_QUOTED_CHARS", "clip", "plural", "quote"]

MAX_QUOTED_CHARS = 120
"""The most characters of one string from a file a message shows."""

_SHORT = reprlib.Repr()
_SHORT.maxlevel = 2  # nested containers show as [...]: a shared nest costs nothing
_SHORT.maxstring = MAX_QUOTED_CHARS
_SHORT.maxother = MAX_QUOTED_CHARS
_SHORT.maxlong = 40
for _name in ("maxlist", "maxtuple", "maxdict", "maxset", "maxfrozenset", "maxdeque", "maxarray"):
    setattr(_SHORT, _name, 8)


def quote(value: Any, limit: int = MAX_QUOTED_CHARS) -> str:
    """``repr`` of ``value`` cut to about ``limit`` characters; non-printable characters come out escaped.

    Strings longer than ``limit`` end in ``...`` and their length, so a reader
    knows something was cut. Python's ``repr`` escapes every character that is not
    printable (C0/C1 controls, bidi overrides), so nothing raw reaches a terminal.
    """
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value)} characters)"
    try:
        text = _SHORT.repr(value)
    except Exception:  # e.g. an int too long for str(); say what it is instead
        text = f"<a {type(value).__name__}>"
    return text if len(text) <= 2 * limit else text[: 2 * limit] + "..."


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``count`` and ``noun`` in the number it takes: ``1 comparison``, ``3 comparisons`` (``many``: an irregular
    plural)."""
    return f"{count} {noun if count == 1 else many or noun + 's'}"


def clip(text: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """``text`` cut to ``limit`` characters (ending in ``...`` when cut): a value from a file kept for messages
    that quote it themselves."""
    return text if len(text) <= limit else text[:limit] + "..."
