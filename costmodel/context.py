"""One trace on one hardware profile: the feature tables every prediction for that pair reads.

Built once per (trace, profile) and reused for any number of configurations:

* workload features per (batch size, gating rule): cells, miss tables, histograms
  (:mod:`moesim.costmodel.features`);
* op costs per (batch, gating, expert format) from the simulator's own cost tables;
* the analytic backbone of every (policy, batch, expert format) at every cache size 0..E
  (:mod:`moesim.costmodel.backbone`), plus the non-expert format's additive effect;
* memory parts per (batch, formats).

:meth:`TraceProfileContext.evaluate` turns a :class:`~moesim.costmodel.space.ConfigSet` into per-config
arrays by gathering from these tables — one numpy gather per table group, no per-configuration Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from moesim.costmodel.backbone import Backbone, OpCosts, analytic_gap, backbone, op_costs
from moesim.costmodel.features import WorkloadFeatures, build_features
from moesim.costmodel.memory import MemoryParts, memory_parts, peak_bytes
from moesim.costmodel.space import ConfigSet
from moesim.errors import MoesimError
from moesim.quant import WeightFormat
from moesim.simulator.memory import dp_sizes_every_budget


@dataclass(frozen=True)
class Evaluated:
    """Per-configuration backbone outputs and the inputs of the fitted correction."""

    valid: np.ndarray  # bool: the configuration can run (its kernels exist on the profile)
    reason: list[str]  # why not, per invalid configuration ("" when valid)
    ttft_s: np.ndarray
    tpot_s: np.ndarray
    makespan_s: np.ndarray
    prefill_total_s: np.ndarray
    decode_total_s: np.ndarray
    output_tokens: np.ndarray
    peak_gpu_bytes: np.ndarray
    hit_rate: np.ndarray
    features: np.ndarray  # [n, len(FEATURE_NAMES)]


CACHE_RULES = ("lru", "lfu", "fifo", "static", "belady", "mrs")
PREFETCHES = ("none", "next-layer", "first-non-resident", "predictive", "eam", "oracle")
PLACEMENTS = ("gpu", "fiddler", "hybrimoe", "cpu")
TRANSFERS = ("stream", "swap", "sync", "layer")
INITIALS = ("empty", "last-experts", "popular", "all", "first-layers", "last-layers")

FEATURE_NAMES: tuple[str, ...] = (
    "log_bb_tpot", "log_bb_ttft", "cache_frac", "log1p_cache", "cache_over_k", "bb_hit_rate", "lru_hit_rate",
    "static_hit_rate", "global_lru_hit_rate", "copy_share", "cpu_share", "log_copy_over_gpu",
    "log_cpu_over_copy", "log_pageable_over_copy", "log_decode_fixed_share", "expert_bits_per_param",
    "log_batch", "log_top_k", "log_experts", "log_layers", "reuse_prev", "guess_overlap", "entropy",
    "hot_k_share", "log_prompt_tokens", "log_decode_steps", "scope_global", "sizing_dp", "gating",
    *(f"cache_{r}" for r in CACHE_RULES), *(f"prefetch_{p}" for p in PREFETCHES),
    *(f"placement_{p}" for p in PLACEMENTS), *(f"transfer_{t}" for t in TRANSFERS),
    *(f"initial_{i}" for i in INITIALS),
)


def _onehot(value: str, choices: tuple[str, ...]) -> list[float]:
    return [1.0 if value == c else 0.0 for c in choices]


def policy_flags(spec) -> list[float]:
    return ([1.0 if spec.cache.scope == "global" else 0.0, 1.0 if spec.cache.sizing == "dp" else 0.0,
             1.0 if spec.gating.enabled else 0.0]
            + _onehot(spec.cache.policy, CACHE_RULES) + _onehot(spec.prefetch.policy, PREFETCHES)
            + _onehot(spec.placement.policy, PLACEMENTS) + _onehot(spec.transfer.mode, TRANSFERS)
            + _onehot(spec.cache.initial, INITIALS))


@dataclass
class _Table:
    """Backbone arrays over cache sizes for one (policy, batch, expert format), or why it cannot run."""

    bb: Optional[Backbone]
    oc: Optional[OpCosts]
    reason: str


class TraceProfileContext:
    def __init__(self, trace: str, profile: str):
        from moesim.simulator.session import ReplaySession, load_profile_cached, load_trace_cached
        from moesim.simulator.sweep import trace_label
        from moesim.traces import resolve_trace

        self.trace_spec = trace
        self.profile_spec = profile
        self.trace_path = resolve_trace(trace)
        self.trace = load_trace_cached(self.trace_path)
        self.profile = load_profile_cached(profile)
        self.label = trace_label(trace)
        # the simulator's session for the pair: the workloads the features are built from are the ones the
        # confirming simulations replay
        self.session = ReplaySession.of(self.trace, self.profile)
        self.meta = self.trace.meta
        self.shape = self.meta.model
        self.L, self.E, self.k = self.meta.num_layers, self.meta.num_experts, self.meta.top_k
        self._features: dict = {}
        self._tables: dict = {}
        self._ne_delta: dict = {}
        self._parts: dict = {}
        self._dp: Optional[np.ndarray] = None
        self._load_cached()

    # ---- on-disk cache -----------------------------------------------------------------------------
    # The tables are deterministic in the trace's and profile's contents and the code, and rebuilding them
    # is most of a search's time (issue #14), so evaluate() keeps them on disk under that key.
    def cache_parts(self) -> Optional[tuple]:
        from moesim.content import file_sha256
        from moesim.simulator.identity import profile_sha256
        from moesim.diskcache import code_version

        if self._cache_key is None:
            try:
                self._cache_key = (code_version("moesim.costmodel", "moesim.simulator", "moesim.tracer",
                                                "moesim.quant", "moesim.modelspec", "moesim.calib.profile"),
                                   file_sha256(self.trace_path), profile_sha256(self.profile_spec))
            except MoesimError:
                self._cache_key = ()  # an unreadable file: no caching
        return self._cache_key or None

    def _state(self) -> dict:
        return {"features": self._features, "tables": self._tables, "ne_delta": self._ne_delta,
                "parts": self._parts, "dp": self._dp}

    def _size(self) -> int:
        return (len(self._features) + len(self._tables) + len(self._ne_delta) + len(self._parts)
                + (self._dp is not None))

    def _load_cached(self) -> None:
        from moesim.diskcache import entry_key, load

        self._cache_key = None
        self._saved_size = 0
        parts = self.cache_parts()
        if not parts:
            return
        # contexts of one key in one process share their tables (a search builds more than one)
        state = _STATES.get(parts) or load("costmodel-context", entry_key(parts))
        if isinstance(state, dict) and set(state) == set(self._state()):
            self._features, self._tables = state["features"], state["tables"]
            self._ne_delta, self._parts, self._dp = state["ne_delta"], state["parts"], state["dp"]
            self._saved_size = self._size()
        _STATES[parts] = self._state()

    def save_cached(self) -> None:
        """Store the tables built so far, when this context built any the cache lacks."""
        from moesim.diskcache import entry_key, store

        parts = self.cache_parts()
        if parts and self._size() > self._saved_size:
            store("costmodel-context", entry_key(parts), self._state())
            self._saved_size = self._size()

    # ---- formats -----------------------------------------------------------------------------------
    def expert_bytes(self, fmt: Optional[str]) -> list[int]:
        if fmt is None:
            return [int(b) for b in self.meta.expert_bytes]
        return [WeightFormat.parse(fmt).bytes_for(self.shape.expert_params)] * self.L

    def expert_kernel(self, fmt: Optional[str]) -> str:
        from moesim.simulator.run import trace_format

        return (trace_format(self.meta.dtype) if fmt is None else WeightFormat.parse(fmt)).kernel

    def non_expert_bytes(self, fmt: Optional[str]) -> int:
        if fmt is None:
            return int(self.meta.non_expert_bytes)
        return WeightFormat.parse(fmt).bytes_for(self.shape.non_expert_params)

    # ---- tables ------------------------------------------------------------------------------------
    def features(self, batch: int, gating) -> WorkloadFeatures:
        key = (batch, gating)
        if key not in self._features:
            self._features[key] = workload_features(self.trace, self.trace_path, batch, gating, self.label)
        return self._features[key][0]

    def workload(self, batch: int, gating):
        self.features(batch, gating)
        return self._features[(batch, gating)][1]

    def dp_sizes(self) -> np.ndarray:
        if self._dp is None:
            fe = self.features(1, _off())
            self._dp = dp_sizes_every_budget(fe.dp_curves)
        return self._dp

    def table(self, policy: str, batch: int, efmt: Optional[str]) -> _Table:
        key = (policy, batch, efmt)
        if key not in self._tables:
            from moesim.simulator.compose import policy_spec

            spec = policy_spec(policy)
            gap = analytic_gap(spec)
            if gap:
                self._tables[key] = _Table(None, None, gap)
                return self._tables[key]
            fe = self.features(batch, spec.gating)
            if spec.cache.sizing == "dp":
                fe._tables.setdefault("dp-sizes", self.dp_sizes())
            eb = self.expert_bytes(efmt)
            own = self.expert_kernel(None)
            try:
                quantized = efmt is not None and WeightFormat.parse(efmt).is_quantized
                oc = op_costs(fe, self.profile, self.shape, eb, self.expert_kernel(efmt), own, spec.runtime,
                              quantized)
            except MoesimError as exc:
                self._tables[key] = _Table(None, None, exc.message)
                return self._tables[key]
            if spec.placement.policy != "gpu" and not oc.cpu_available:
                self._tables[key] = _Table(None, oc, f"profile {self.profile.name} has no CPU expert model")
                return self._tables[key]
            self._tables[key] = _Table(backbone(fe, spec, oc, eb), oc, "")
        return self._tables[key]

    def non_expert_delta(self, batch: int, gating, nfmt: Optional[str]) -> tuple[float, float, float]:
        """(TTFT, TPOT, makespan) change from running the non-expert weights in ``nfmt``'s kernel."""
        key = (batch, gating, nfmt)
        if key not in self._ne_delta:
            if nfmt is None:
                self._ne_delta[key] = (0.0, 0.0, 0.0)
            else:
                fe = self.features(batch, gating)
                eb = self.expert_bytes(None)
                own = self.expert_kernel(None)
                base = op_costs(fe, self.profile, self.shape, eb, own, own)
                other = op_costs(fe, self.profile, self.shape, eb, own, WeightFormat.parse(nfmt).kernel)
                dd = other.decode_fixed - base.decode_fixed
                dp = other.prefill_fixed - base.prefill_fixed
                w = fe.steps.tokens.astype(np.float64)
                intervals = max(fe.decode_intervals, 1)
                self._ne_delta[key] = (
                    float((fe.prefills.ttft_weight * dp).sum()),
                    float(((dd * w).sum() + (fe.prefills.interval_weight * dp).sum()) / intervals),
                    float(dd.sum() + dp.sum()),
                )
        return self._ne_delta[key]

    def memory_parts(self, batch: int, gating, nfmt: Optional[str]) -> MemoryParts:
        key = (batch, gating, nfmt)
        if key not in self._parts:
            self._parts[key] = memory_parts(self.shape, self.workload(batch, gating), self.non_expert_bytes(nfmt),
                                            self.profile)
        return self._parts[key]

    # ---- per-configuration -------------------------------------------------------------------------
    def evaluate(self, configs: ConfigSet) -> Evaluated:
        from moesim.simulator.compose import policy_spec

        n = len(configs)
        F = len(FEATURE_NAMES)
        out = {name: np.full(n, np.nan) for name in ("ttft", "tpot", "makespan", "pre", "dec", "tokens", "hit")}
        mem = np.zeros(n, dtype=np.int64)
        X = np.full((n, F), np.nan)
        valid = np.zeros(n, dtype=bool)
        reason = [""] * n
        group = ((configs.policy.astype(np.int64) * len(configs.expert_formats) + configs.expert_format)
                 * len(configs.non_expert_formats) + configs.non_expert_format)
        keys = np.stack([group, configs.batch])
        uniq, inverse = np.unique(keys, axis=1, return_inverse=True)
        inverse = inverse.reshape(-1)
        col = {name: i for i, name in enumerate(FEATURE_NAMES)}
        for gi in range(uniq.shape[1]):
            idx = np.flatnonzero(inverse == gi)
            first = int(idx[0])
            policy, _, efmt, nfmt, batch = configs.row(first)
            spec = policy_spec(policy)
            c = np.clip(configs.cache_experts[idx], 0, self.E)
            eb = self.expert_bytes(efmt)
            parts = self.memory_parts(batch, spec.gating, nfmt)
            dp = self.dp_sizes() if spec.cache.sizing == "dp" and spec.cache.scope == "layer" else None
            mem[idx] = peak_bytes(spec, parts, eb, self.E, configs.cache_experts[idx], dp)
            tab = self.table(policy, batch, efmt)
            if tab.bb is None:
                for i in idx:
                    reason[i] = tab.reason
                continue
            d_ttft, d_tpot, d_mk = self.non_expert_delta(batch, spec.gating, nfmt)
            bb, oc = tab.bb, tab.oc
            valid[idx] = True
            out["ttft"][idx] = bb.ttft_s[c] + d_ttft
            out["tpot"][idx] = bb.tpot_s[c] + d_tpot
            out["makespan"][idx] = bb.makespan_s[c] + d_mk
            out["pre"][idx] = bb.prefill_total_s[c]
            out["dec"][idx] = bb.decode_total_s[c] + d_mk
            out["hit"][idx] = bb.hit_rate[c]
            fe = self.features(batch, spec.gating)
            out["tokens"][idx] = fe.output_tokens
            rows = np.zeros((len(idx), F))
            rows[:, col["log_bb_tpot"]] = np.log(np.maximum(out["tpot"][idx], 1e-9))
            rows[:, col["log_bb_ttft"]] = np.log(np.maximum(out["ttft"][idx], 1e-9))
            rows[:, col["cache_frac"]] = c / self.E
            rows[:, col["log1p_cache"]] = np.log1p(c)
            rows[:, col["cache_over_k"]] = c / self.k
            rows[:, col["bb_hit_rate"]] = bb.hit_rate[c]
            rows[:, col["lru_hit_rate"]] = _hit_curve(fe, "lru")[c]
            rows[:, col["static_hit_rate"]] = _hit_curve(fe, "static")[c]
            rows[:, col["global_lru_hit_rate"]] = _hit_curve(fe, "lru-global")[c]
            rows[:, col["copy_share"]] = bb.copy_share[c]
            rows[:, col["cpu_share"]] = bb.cpu_share[c]
            g1 = float(np.interp(oc.decode_tokens_per_expert, np.arange(len(oc.gpu)), oc.gpu))
            cpu1 = float(np.interp(oc.decode_tokens_per_expert, np.arange(len(oc.cpu)), oc.cpu)) \
                if oc.cpu_available else math.inf
            copy1 = float(np.mean(oc.copy))
            rows[:, col["log_copy_over_gpu"]] = math.log(copy1 / g1)
            rows[:, col["log_cpu_over_copy"]] = math.log(min(cpu1 / copy1, 1e6))
            rows[:, col["log_pageable_over_copy"]] = math.log(float(np.mean(oc.copy_pageable)) / copy1)
            fixed = float((oc.decode_fixed * fe.steps.tokens).sum() / max(fe.decode_intervals, 1))
            rows[:, col["log_decode_fixed_share"]] = np.log(np.clip(fixed / out["tpot"][idx], 1e-6, 1.0))
            rows[:, col["expert_bits_per_param"]] = 8.0 * float(np.mean(eb)) / self.shape.expert_params
            rows[:, col["log_batch"]] = math.log(batch)
            rows[:, col["log_top_k"]] = math.log(self.k)
            rows[:, col["log_experts"]] = math.log(self.E)
            rows[:, col["log_layers"]] = math.log(self.L)
            rows[:, col["reuse_prev"]] = fe.reuse_prev
            rows[:, col["guess_overlap"]] = fe.guess_overlap
            rows[:, col["entropy"]] = fe.entropy
            rows[:, col["hot_k_share"]] = fe.hot_k_share
            rows[:, col["log_prompt_tokens"]] = math.log(max(float(fe.prefills.tokens.mean()), 1.0))
            rows[:, col["log_decode_steps"]] = math.log(max(len(fe.steps.tokens), 1))
            rows[:, col["scope_global"]:] = np.asarray(policy_flags(spec))[None, :]
            X[idx] = rows
        self.save_cached()
        return Evaluated(valid, reason, out["ttft"], out["tpot"], out["makespan"], out["pre"], out["dec"],
                         out["tokens"], mem, out["hit"], X)

    def output_tokens(self, batch: int) -> int:
        return self.features(batch, _off()).output_tokens


_FEATURES: dict = {}
_FEATURES_KEEP = 12
_STATES: dict = {}  # cache key -> a context's tables, shared by the contexts of one process


def workload_features(trace, path, batch: int, gating, label: str) -> tuple[WorkloadFeatures, object]:
    """Features of a trace for a batch size and gating, memoized per process (they do not depend on the
    profile, so every profile of a search or a fit reuses them)."""
    from moesim.simulator.compose import policy_spec
    from moesim.simulator.session import file_memo_key, trace_replay

    key = (file_memo_key(path), id(trace), batch, gating)
    if key not in _FEATURES:
        policy = policy_spec("lru").with_parts(gating=gating)
        wl = trace_replay(trace).workload(batch, policy)
        _FEATURES[key] = (build_features(trace, wl, label), wl, trace)
        while len(_FEATURES) > _FEATURES_KEEP:
            _FEATURES.pop(next(iter(_FEATURES)))
    fe, wl, _ = _FEATURES[key]
    return fe, wl


def _off():
    from moesim.simulator.gating import GatingSpec

    return GatingSpec()


def _hit_curve(fe: WorkloadFeatures, rule: str) -> np.ndarray:
    key = ("hit-curve", rule)
    if key not in fe._tables:
        t = fe.misses(rule)
        fe._tables[key] = 1.0 - t.decode.sum(axis=0) / max(int(fe.decode.experts.sum()), 1)
    return fe._tables[key]
