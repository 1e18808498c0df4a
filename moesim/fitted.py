"""Tables of values fitted to published measurements, which say who reads them.

The simulator reads each fitted value (reproduce/fit.py's registry) from a :class:`FittedTable`. While
:func:`reads` is active, a table notes each (table, key) read, so a fit that simulates a catalogue point again
and again can tell which fitted values that point's simulation depends on: a KTransformers point never reads
accelerate's hook cost, and need not be simulated again when only that cost changes. The note is exact, not
declared: a value the simulation does not read cannot change its result.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

_ACTIVE: list[set[tuple[str, str]]] = []  # the open reads() contexts, innermost last


class FittedTable(dict):
    """A dict of fitted values (``name``: where it is defined) whose every read is noted under :func:`reads`."""

    def __init__(self, name: str, values: dict[str, float]):
        super().__init__(values)
        self.name = name

    def _note(self, keys) -> None:
        for seen in _ACTIVE:
            seen.update((self.name, key) for key in keys)

    def __getitem__(self, key):
        if _ACTIVE:
            self._note((key,))
        return super().__getitem__(key)

    def get(self, key, default=None):
        if _ACTIVE:
            self._note((key,))
        return super().get(key, default)

    # reading the whole table (a cache key, a copy) depends on every entry; overriding __iter__ also routes
    # dict(table) and sorted(table) through here rather than through the C fast path
    def __iter__(self):
        if _ACTIVE:
            self._note(super().keys())
        return super().__iter__()

    def items(self):
        if _ACTIVE:
            self._note(super().keys())
        return super().items()

    def values(self):
        if _ACTIVE:
            self._note(super().keys())
        return super().values()

    def copy(self) -> dict:
        if _ACTIVE:
            self._note(super().keys())
        return dict(super().items())


@contextlib.contextmanager
def reads() -> Iterator[set[tuple[str, str]]]:
    """Within: the (table name, key) of every fitted value read is added to the yielded set."""
    seen: set[tuple[str, str]] = set()
    _ACTIVE.append(seen)
    try:
        yield seen
    finally:
        _ACTIVE.pop()  # contexts close innermost first
