"""One trace replayed on one profile: what every configuration of the pair shares, computed once.

A sweep, the cost model and validate each run many configurations of the same (trace, profile). What those
share is deterministic and costly: the compiled workload (per batch size, gating and next-layer guess), the
LRU miss curves AdapMoE's DP sizes from, the learned predictor's guesses, and the profile's cost tables
(per workload, formats and CPU use). A :class:`ReplaySession` owns them for one pair; the trace-level part
(:class:`TraceReplay`: workloads, curves, predictions, which no profile changes) is shared by every session
of the same trace. ``ReplaySession.of(trace, profile)`` returns the process's session for the pair, so a
sweep worker, the cost model's context and validate's validator hold the same one.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from moesim.simulator.config import PolicySpec
from moesim.simulator.costs import CostTables, build_cost_tables
from moesim.simulator.memory import lru_miss_curves
from moesim.simulator.workload import Workload, compile_workload
from moesim.tracer import Trace, read_trace


class LruMemo(OrderedDict):
    """A small least-recently-used memo (a sweep worker needs a handful of entries)."""

    def __init__(self, size: int = 32):
        super().__init__()
        self.size = size

    def get_or(self, key, make: Callable):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = make()
        self[key] = value
        while len(self) > self.size:
            self.popitem(last=False)
        return value


def file_memo_key(path: str | Path) -> tuple:
    """A file's identity for in-process memos: its path, and its size and time so a rewritten file is read again
    (the on-disk cache and the sweep's store key by content instead, :mod:`moesim.simulator.identity`)."""
    p = Path(path).resolve()
    try:
        st = p.stat()
        return (str(p), st.st_size, st.st_mtime_ns)
    except OSError:
        return (str(p), -1, -1)


def trace_memo_key(trace: Trace) -> tuple:
    # the trace object itself is part of the key, so an in-memory trace is never confused with another
    return (trace.path and file_memo_key(trace.path), id(trace))


_TRACES = LruMemo(8)  # read trace files
_PROFILES = LruMemo(16)  # loaded profiles


def load_trace_cached(path: str | Path) -> Trace:
    """A trace file, read once per process while it is unchanged."""
    return _TRACES.get_or(file_memo_key(path), lambda: read_trace(path))


def load_profile_cached(spec: str):
    """A profile (bundled name or file), loaded once per process while it is unchanged."""
    from moesim.calib.profile import bundled_profiles, load_profile

    key = spec if spec in bundled_profiles() else file_memo_key(spec)
    return _PROFILES.get_or(key, lambda: load_profile(spec))


class TraceReplay:
    """The trace-level part of a replay: workloads, miss curves and the predictor's guesses."""

    def __init__(self, trace: Trace):
        self.trace = trace
        self._workloads = LruMemo(16)
        self._curves: Optional[np.ndarray] = None
        self._predictions = LruMemo(8)

    def workload(self, batch: int, policy: PolicySpec) -> Workload:
        guess = policy.prefetch.guess
        return self._workloads.get_or((batch, policy.gating, guess),
                                      lambda: _compile_cached(self.trace, batch, policy.gating, guess))

    def miss_curves(self) -> np.ndarray:
        if self._curves is None:
            self._curves = lru_miss_curves(self.trace)
        return self._curves

    def predictions(self, workload: Workload, train: tuple[str, ...]) -> dict:
        """The learned next-layer predictor's guesses for this trace (fitted on ``train``, else on the other
        bundled traces)."""
        from moesim.simulator.predictor import fit_predictor, predict_rows
        from moesim.traces import bundled_traces, verified_bundled_trace

        own = self.trace.path.resolve() if self.trace.path is not None else None
        if train:
            paths = [Path(p) for p in train]
        else:  # the fixed, checksummed bundled set; a user's file in traces/ never joins it
            paths = [verified_bundled_trace(name) for name, p in bundled_traces().items()
                     if own is None or p.resolve() != own]
        weights = fit_predictor(paths)
        return self._predictions.get_or((weights, workload.top_k),
                                        lambda: predict_rows(self.trace, weights, workload.top_k))


def _compile_cached(trace: Trace, batch: int, gating, guess: str) -> Workload:
    """A compiled workload, kept on disk by the trace file's content (a sweep's workers and later runs load it
    instead of compiling it again); an in-memory trace is compiled every time."""
    make = lambda: compile_workload(trace, batch=batch, gating=gating, guess=guess)  # noqa: E731
    if trace.path is None:
        return make()
    from moesim.content import file_sha256
    from moesim.diskcache import cached, code_version
    from moesim.errors import MoesimError

    try:
        digest = file_sha256(trace.path)
    except MoesimError:  # the file went away after it was read: nothing to key the entry by
        return make()
    parts = (code_version("moesim.simulator.workload", "moesim.simulator.gating", "moesim.tracer"), digest, batch,
             repr(gating), guess)
    return cached("workload", parts, make)


_REPLAYS = LruMemo(8)  # trace key -> (trace, TraceReplay); holding the trace keeps its id from being reused


def trace_replay(trace: Trace) -> TraceReplay:
    """This process's :class:`TraceReplay` of ``trace``."""
    return _REPLAYS.get_or(trace_memo_key(trace), lambda: (trace, TraceReplay(trace)))[1]


class ReplaySession:
    """One trace on one profile: the trace's :class:`TraceReplay` plus the profile's cost tables."""

    _sessions = LruMemo(32)  # (trace key, profile) -> ReplaySession

    def __init__(self, replay: TraceReplay, profile):
        self.replay = replay
        self.trace = replay.trace
        self.profile = profile
        self._costs = LruMemo(64)

    @classmethod
    def of(cls, trace: Trace, profile) -> "ReplaySession":
        """This process's session for (``trace``, ``profile``): made once, then shared by every caller."""
        replay = trace_replay(trace)
        # the session holds the trace and the profile, so their ids are not reused while the entry lives
        key = (trace_memo_key(trace), id(profile), profile.name)
        return cls._sessions.get_or(key, lambda: cls(replay, profile))

    def workload(self, batch: int, policy: PolicySpec) -> Workload:
        return self.replay.workload(batch, policy)

    def miss_curves(self) -> np.ndarray:
        return self.replay.miss_curves()

    def predictions(self, workload: Workload, train: tuple[str, ...]) -> dict:
        return self.replay.predictions(workload, train)

    def cost_tables(self, workload: Workload, expert_bytes: list[int], expert_kernel: str, non_expert_kernel: str,
                    needs_cpu: bool) -> CostTables:
        """The profile's costs at every shape ``workload`` runs (per formats and whether experts run on the CPU)."""
        key = (workload.batch, workload.gating, tuple(expert_bytes), expert_kernel, non_expert_kernel, needs_cpu)

        def make() -> CostTables:
            wl = workload
            prompt_lengths = {s.tokens for b in wl.batches for s in b.prefill}
            decode_batches = {s.tokens for b in wl.batches for s in b.decode}
            max_tokens = max([wl.max_tokens_per_expert] + [s.tokens for s in wl.steps()])
            return build_cost_tables(self.profile, self.trace.meta.model, expert_bytes, expert_kernel,
                                     non_expert_kernel, max_tokens, prompt_lengths, decode_batches, wl.max_context,
                                     needs_cpu)

        return self._costs.get_or(key, make)


def forget_replays() -> None:
    """Drop every session and trace replay of this process: the next run recomputes (or reloads from the on-disk
    cache) what it needs."""
    _REPLAYS.clear()
    ReplaySession._sessions.clear()
