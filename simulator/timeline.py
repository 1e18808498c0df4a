"""Chrome-trace JSON of a simulation: one lane each for the GPU compute stream, PCIe H2D, PCIe D2H and the
CPU expert pool. Open it in Perfetto (https://ui.perfetto.dev) or chrome://tracing."""

from __future__ import annotations

import json
from pathlib import Path

from moesim.atomic import write_text_atomic

LANES = {"gpu": (1, "GPU compute stream"), "PCIe H2D": (2, "PCIe host->device"), "h2d": (2, "PCIe host->device"),
         "PCIe D2H": (3, "PCIe device->host"), "d2h": (3, "PCIe device->host"), "CPU experts": (4, "CPU experts")}


class Timeline:
    """Collects complete ("X") events; times in simulated seconds, written in microseconds."""

    def __init__(self, title: str = "moesim"):
        self.title = title
        self.events: list[tuple[int, str, float, float]] = []  # (tid, name, start_s, dur_s)

    def record(self, lane: str, label: str, start: float, duration: float) -> None:
        if duration > 0.0:
            self.events.append((LANES[lane][0], label, start, duration))

    def gpu_segments(self, start: float, segments: list[tuple[str, str, float]]) -> None:
        """Work the driver serialized on the compute stream, laid end to end from ``start``."""
        t = start
        for lane, label, duration in segments:
            self.record(lane, label, t, duration)
            t += duration

    def to_json(self) -> str:
        meta = [{"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": self.title}}]
        seen = set()
        for tid, name in LANES.values():
            if tid not in seen:
                seen.add(tid)
                meta.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": name}})
                meta.append({"name": "thread_sort_index", "ph": "M", "pid": 1, "tid": tid, "args": {"sort_index": tid}})
        events = [
            {"name": name, "ph": "X", "pid": 1, "tid": tid, "ts": round(start * 1e6, 3), "dur": round(dur * 1e6, 3)}
            for tid, name, start, dur in sorted(self.events, key=lambda e: (e[2], e[0]))
        ]
        return json.dumps({"traceEvents": meta + events, "displayTimeUnit": "ms"}, separators=(",", ":"))

    def write(self, path: str | Path) -> Path:
        return write_text_atomic(path, self.to_json())
