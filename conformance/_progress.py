"""A small progress bar on stderr (no dependency), drawn only on a terminal."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

from typing_extensions import Self

__all__ = ["Progress"]


class Progress:
    """``[#####-----]  12/128   9%  label``, redrawn in place.

    Parameters
    ----------
    total
        The number of units of work.
    stream
        Where to draw (default ``sys.stderr``).
    enabled
        Draw at all; default: only when ``stream`` is a terminal, so logs and
        pipes stay clean.
    width
        Characters of the bar itself.
    """

    #: Seconds between redraws (the last state is always drawn on close).
    interval = 0.1

    def __init__(
        self,
        total: int,
        *,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        width: int = 28,
    ) -> None:
        self.total = max(total, 1)
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(isatty and isatty()) if enabled is None else enabled
        self.width = width
        self.done = 0
        self.label = ""
        self._drawn = 0.0
        self._length = 0

    def __enter__(self) -> Self:
        self.draw(force=True)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def advance(self, n: int = 1, label: str | None = None) -> None:
        """Count ``n`` more units done (and show ``label`` for the next ones)."""
        self.done = min(self.done + n, self.total)
        if label is not None:
            self.label = label
        self.draw()

    def show(self, label: str) -> None:
        """Show what is running now."""
        self.label = label
        self.draw()

    def line(self) -> str:
        """The bar as text."""
        filled = self.width * self.done // self.total
        bar = "#" * filled + "-" * (self.width - filled)
        percent = 100 * self.done // self.total
        digits = len(str(self.total))
        return f"[{bar}] {self.done:>{digits}}/{self.total} {percent:3d}%  {self.label}"

    def draw(self, *, force: bool = False) -> None:
        """Redraw, at most every :attr:`interval` seconds unless ``force``."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._drawn < self.interval and self.done < self.total:
            return
        self._drawn = now
        text = self.line()
        pad = max(self._length - len(text), 0)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self._length = len(text)

    def close(self) -> None:
        """Erase the bar, leaving the cursor at the start of a clean line."""
        if self.enabled and self._length:
            self.stream.write("\r" + " " * self._length + "\r")
            self.stream.flush()
            self._length = 0
