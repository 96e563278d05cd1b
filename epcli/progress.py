"""How library code reports progress without printing: a callback the CLI draws."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["ProgressCallback"]

ProgressCallback = Callable[[int, int, str], None]
"""``report(done, total, label)``: lets a caller draw progress; library code itself never prints."""
