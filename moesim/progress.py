"""Progress of long commands, one helper for all: on a terminal a tqdm bar with rate and ETA; otherwise (a
log file, CI) plain lines, one per tenth of the work and one at the end, so logs stay short and readable."""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """Counts finished units of ``total``; ``initial`` of them were done before (reused), not timed."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, stream: Optional[TextIO] = None,
                 terminal: Optional[bool] = None, log: Optional[Callable[[str], None]] = None):
        """``log``: where the plain lines go instead of ``stream`` (a command's own log, which --quiet silences);
        it implies no bar."""
        self.stream = stream or sys.stderr
        self.log = log
        self.total, self.desc, self.unit = total, desc, unit
        self.initial = self.done = initial
        self.start = time.monotonic()
        self.next_line = initial * 10 // total + 1 if total else 11  # the next tenth to report
        if log is not None:
            terminal = False
        elif terminal is None:
            terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = None
        if terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=self.stream)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        # one plain line each time the count crosses a tenth of the total (the last tenth is the end)
        if self.next_line <= 10 and self.done * 10 >= self.next_line * self.total:
            while self.next_line <= 10 and self.done * 10 >= self.next_line * self.total:
                self.next_line += 1
            self._line()

    def reused(self, n: int = 1) -> None:
        """``n`` units done before (kept from an interrupted run): counted, but not in the rate."""
        self.initial += n
        self.update(n)

    def write(self, message: str) -> None:
        """A message line that does not break the bar."""
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        ran = self.done - self.initial
        rate = ran / elapsed if elapsed > 0 else 0.0
        text = f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done / max(self.total, 1):.0f}%)"
        if ran > 0 and rate > 0:
            text += f", {rate:.2f} {self.unit}/s"
            if self.done < self.total:
                text += f", ETA {_duration((self.total - self.done) / rate)}"
        return text + f", {_duration(elapsed)} elapsed"

    def _line(self) -> None:
        if self.log is not None:
            self.log(self.line())
        else:
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
