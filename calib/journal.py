"""A journal of finished calibration units beside the profile being written, so a killed `moesim calib`
resumes with at most the unit in flight lost.

A unit is one measurement that stands alone: a kernel's expert timing group, the CPU experts at one
thread count, one copy size, the non-expert layer per phase, the head, the overheads. Each is stored
under the SHA-256 of everything its numbers depend on (the device and host, threads, torch, the model
shape, the grid and repeat policy, the calibration code), so a rerun on another device, another model or
another grid measures afresh instead of reusing stale numbers. The journal is rewritten atomically after
each unit (temp file, then rename), so a kill leaves the previous journal or the new one, never half of
one; it is removed once the profile is written.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from moesim.atomic import remove_stale_temps, write_text_atomic
from moesim.calib.profile import MeasuredSeries, _Fields
from moesim.errors import MoesimError

JOURNAL_VERSION = 1
_CODE_FILES = ("calibrate.py", "measure.py", "timing.py", "kernels.py", "layers.py", "workload.py")


def journal_path_for(out_path: str | Path) -> Path:
    out = Path(out_path)
    return out.parent / f".{out.name}.calib-journal.json"


def calibration_code_version() -> str:
    """moesim's version and the sources that produce the measured numbers (not the fitting or the CLI)."""
    from moesim import __version__

    h = hashlib.sha256(__version__.encode())
    here = Path(__file__).resolve().parent
    for name in _CODE_FILES:
        h.update(name.encode())
        h.update((here / name).read_bytes())
    return h.hexdigest()


def unit_key(context: dict[str, Any], unit: str, params: dict[str, Any]) -> str:
    """The content key of one unit: its name, its own settings and the run's shared context."""
    text = json.dumps({"unit": unit, "params": params, "context": context}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def series_to_json(series: list[MeasuredSeries]) -> list[dict[str, Any]]:
    return [s.to_dict() for s in series]


def series_from_json(data: list[dict[str, Any]], where: str) -> list[MeasuredSeries]:
    return [MeasuredSeries.from_fields(_Fields(s, f"{where}[{i}]", where)) for i, s in enumerate(data)]


class CalibJournal:
    """Finished units by content key. ``path=None`` keeps them in memory only (nothing to resume)."""

    def __init__(self, path: Path | None, log: Callable[[str], None] = lambda msg: None):
        self.path = path
        self.units: dict[str, dict[str, Any]] = {}
        self.reused = 0
        if path is None:
            return
        remove_stale_temps(path)
        if not path.is_file():
            return
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("version") != JOURNAL_VERSION or not isinstance(data.get("units"), dict):
                raise ValueError(f"expected version {JOURNAL_VERSION} with a 'units' object")
            self.units = {str(k): v for k, v in data["units"].items() if isinstance(v, dict) and "payload" in v}
        except (OSError, ValueError, AttributeError) as exc:
            log(f"ignoring the unreadable calibration journal {path} ({exc}); measuring afresh")
            self.units = {}

    def __contains__(self, key: str) -> bool:
        return key in self.units

    def get(self, key: str) -> dict[str, Any]:
        self.reused += 1
        return self.units[key]["payload"]

    def store(self, key: str, unit: str, payload: dict[str, Any]) -> None:
        """Keep a finished unit; on disk before this returns."""
        self.units[key] = {"unit": unit, "payload": payload}
        if self.path is not None:
            # insertion order kept: the order of kernels and series is part of the result
            text = json.dumps({"version": JOURNAL_VERSION, "units": self.units})
            write_text_atomic(self.path, text + "\n")

    def run(self, key: str, unit: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The unit's payload: from the journal when it was finished before, else measured and stored."""
        if key in self.units:
            return self.get(key)
        payload = measure()
        self.store(key, unit, payload)
        return payload

    def finish(self) -> None:
        """The profile is written: the journal has served its purpose."""
        if self.path is not None:
            try:
                self.path.unlink(missing_ok=True)
            except OSError as exc:
                raise MoesimError(f"{self.path}: cannot remove the finished calibration journal ({exc})") from None
