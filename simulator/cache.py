"""Expert caches: which experts' weights are resident on the GPU, and which one leaves when a new one comes.

A cache has a *scope* (one pool per MoE layer, as Mixtral-Offloading, AdapMoE and HybriMoE; or one
global pool over all layers, as MoE-Infinity and BigMoeOnEdge) and a *capacity* per pool in experts or
in bytes (an expert costs its layer's expert bytes). The eviction rule is the subclass:

``lru``     least recently used (Mixtral-Offloading ``EvictionGroupInfo``; BigMoeOnEdge's global LRU)
``lfu``     fewest visits in the current request (MoE-Infinity's ``incache_visit_count``: every dispatch
            counts, an evicted expert keeps its count, all counts reset per request); ties go to the
            lowest expert index, then the lowest layer (the released dispatcher's scan order)
``lfu-forget``  textbook LFU: counts forgotten on eviction, a demand admission counts one visit
``fifo``    first in, first out (a hit does not promote)
``static``  a fixed set, the most popular experts by a popularity count; never admits (Fiddler)
``belady``  Belady's MIN with bypass: evict, or do not admit, the expert used farthest in the future.
            An oracle that reads the trace; the bound every other rule is measured against
``mrs``     HybriMoE's Minus Recent Score: per expert ``S <- a*score + (1-a)*S`` for the router's
            top-p, ``S <- (1-a)*S`` otherwise (a=0.5, p=12); evict the lowest ``S``

See :mod:`moesim.simulator.policies` for the calls a driver makes. Keys are ``layer * E + expert``.
"""

from __future__ import annotations

import heapq
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from moesim.errors import MoesimError
from moesim.simulator.policies import Registry

SCOPES = ("layer", "global")
UNITS = ("experts", "bytes")
NEVER = 1 << 62  # "next use" of an expert that is not used again
_NONE_LATER: frozenset[int] = frozenset()  # what the last routed expert of an access protects


@dataclass(frozen=True)
class CacheGeometry:
    """What a cache needs to know about the model: layers, experts per layer, bytes of one expert per layer."""

    num_layers: int
    num_experts: int
    expert_bytes: tuple[int, ...]


@dataclass(frozen=True)
class CacheCapacity:
    """Capacity per pool: ``limits`` has one entry per layer (scope "layer") or one (scope "global")."""

    scope: str
    unit: str
    limits: tuple[int, ...]

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise MoesimError(f"cache scope '{self.scope}': expected one of {', '.join(SCOPES)}")
        if self.unit not in UNITS:
            raise MoesimError(f"cache capacity unit '{self.unit}': expected one of {', '.join(UNITS)}")
        if any(x < 0 for x in self.limits):
            raise MoesimError(f"cache capacity {self.limits}: expected non-negative sizes")


class CacheAccess:
    """Outcome of one layer-step's demand access (expert ids of that layer)."""

    __slots__ = ("hits", "misses", "evicted", "bypassed")

    def __init__(self, hits: list[int], misses: list[int], evicted: list[tuple[int, int]], bypassed: list[int]):
        self.hits = hits
        self.misses = misses
        self.evicted = evicted  # (layer, expert) removed to make room, in eviction order
        self.bypassed = bypassed  # misses loaded for this step only (not kept)


class Insertion:
    __slots__ = ("admitted", "evicted")

    def __init__(self, admitted: bool, evicted: list[tuple[int, int]]):
        self.admitted = admitted
        self.evicted = evicted


class ExpertCache:
    """Shared mechanics: pools, sizes, protection of experts still to be used in the current step."""

    name = "base"
    uses_scores = False  # True when ``observe`` must be called with router scores

    def __init__(self, geometry: CacheGeometry, capacity: CacheCapacity):
        L, E = geometry.num_layers, geometry.num_experts
        if len(geometry.expert_bytes) != L:
            raise MoesimError(f"cache geometry: {len(geometry.expert_bytes)} expert sizes for {L} layers")
        expected = L if capacity.scope == "layer" else 1
        if len(capacity.limits) != expected:
            raise MoesimError(f"cache capacity: {len(capacity.limits)} limits for scope '{capacity.scope}', "
                              f"expected {expected}")
        self.geometry = geometry
        self.capacity = capacity
        self.L, self.E = L, E
        self._pool_of_layer = list(range(L)) if capacity.scope == "layer" else [0] * L
        self._cost_of_layer = [1] * L if capacity.unit == "experts" else [int(b) for b in geometry.expert_bytes]
        self._limit = [int(x) for x in capacity.limits]
        self._used = [0] * len(self._limit)
        self._resident: set[int] = set()
        self.evictions = 0

    # ---- queries
    def contains(self, layer: int, expert: int) -> bool:
        return layer * self.E + expert in self._resident

    def contains_key(self, key: int) -> bool:
        return key in self._resident

    def __len__(self) -> int:
        return len(self._resident)

    def resident_keys(self) -> list[int]:
        return sorted(self._resident)

    def used(self, pool: int = 0) -> int:
        return self._used[pool]

    def pool_layout(self) -> tuple[list[int], list[int], list[int], list[int]]:
        """(pool of each layer, an expert's cost in each layer, each pool's limit, each pool's use), copies:
        what a replay that keeps the cache as arrays (:mod:`moesim.simulator.kernel`) starts from."""
        return list(self._pool_of_layer), list(self._cost_of_layer), list(self._limit), list(self._used)

    def slots_in_experts(self) -> int:
        """How many experts the cache can hold at most (for memory accounting)."""
        if self.capacity.unit == "experts":
            return sum(self._limit)
        if self.capacity.scope == "layer":
            return sum(lim // c for lim, c in zip(self._limit, self._cost_of_layer) if c > 0)
        return self._limit[0] // max(1, min(self._cost_of_layer))

    # ---- driver calls
    def access(self, layer: int, experts: Sequence[int], clock: int) -> CacheAccess:
        base = layer * self.E
        resident = self._resident
        touch = self._touch
        hits: list[int] = []
        misses: list[int] = []
        evicted: list[tuple[int, int]] = []
        bypassed: list[int] = []
        for i, e in enumerate(experts):
            key = base + e
            if key in resident:
                hits.append(e)
                touch(key, clock)
            else:
                misses.append(e)
                # the experts still to be used in this step are protected; the last miss protects none
                rest = experts[i + 1:]
                later = {base + x for x in rest} if rest else _NONE_LATER
                if not self._admit_key(key, layer, clock, later, evicted, used=True):
                    bypassed.append(e)
        return CacheAccess(hits, misses, evicted, bypassed)

    def insert(self, layer: int, expert: int, clock: int, protect: Iterable[int] = ()) -> Insertion:
        key = layer * self.E + expert
        if key in self._resident:
            return Insertion(True, [])
        evicted: list[tuple[int, int]] = []
        ok = self._admit_key(key, layer, clock, set(protect), evicted, used=False)
        return Insertion(ok, evicted)

    def observe(self, layer: int, experts: Sequence[int], weights: Sequence[float]) -> None:
        pass

    def reset_request(self) -> None:
        pass

    def preload(self, keys: Iterable[tuple[int, int]]) -> None:
        """Make experts resident before the run, in the given order, while they fit (no eviction)."""
        for layer, expert in keys:
            key = layer * self.E + expert
            if key in self._resident:
                continue
            pool = self._pool_of_layer[layer]
            cost = self._cost_of_layer[layer]
            if self._used[pool] + cost > self._limit[pool]:
                continue
            self._resident.add(key)
            self._used[pool] += cost
            self._on_admit(key, pool, -1, used=False)

    def evict(self, layer: int, expert: int) -> bool:
        """Drop an expert on the driver's request (e.g. an unused prefetch buffer)."""
        key = layer * self.E + expert
        if key not in self._resident:
            return False
        self._evict_key(key)
        return True

    # ---- mechanics
    def _admit_key(self, key: int, layer: int, clock: int, protect: set[int], evicted: list, used: bool) -> bool:
        pool = self._pool_of_layer[layer]
        cost = self._cost_of_layer[layer]
        limit = self._limit[pool]
        if cost > limit:
            return False
        in_use = self._used  # the list itself: _evict_key lowers its entries while this loop reads them
        if in_use[pool] + cost > limit:
            if self._bypass(key, pool, clock, protect):
                return False
            E = self.E
            victim_of, evict = self._victim, self._evict_key
            while in_use[pool] + cost > limit:
                victim = victim_of(pool, protect, clock)
                if victim is None:
                    return False
                evict(victim)
                evicted.append((victim // E, victim % E))
        self._resident.add(key)
        in_use[pool] += cost
        self._on_admit(key, pool, clock, used)
        return True

    def _evict_key(self, key: int) -> None:
        layer = key // self.E
        pool = self._pool_of_layer[layer]
        self._resident.discard(key)
        self._used[pool] -= self._cost_of_layer[layer]
        self._on_remove(key, pool)
        self.evictions += 1

    # ---- eviction rule (subclasses)
    def _touch(self, key: int, clock: int) -> None:
        raise NotImplementedError

    def _on_admit(self, key: int, pool: int, clock: int, used: bool) -> None:
        raise NotImplementedError

    def _on_remove(self, key: int, pool: int) -> None:
        raise NotImplementedError

    def _victim(self, pool: int, protect: set[int], clock: int) -> int | None:
        raise NotImplementedError

    def _bypass(self, key: int, pool: int, clock: int, protect: set[int]) -> bool:
        return False


CACHE_POLICIES: Registry[type[ExpertCache]] = Registry("cache policy")


@CACHE_POLICIES.register("lru")
class LRUCache(ExpertCache):
    """Least recently used; a hit moves the expert to the most-recent end, a miss is inserted there."""

    name = "lru"

    def __init__(self, geometry: CacheGeometry, capacity: CacheCapacity):
        super().__init__(geometry, capacity)
        self._order: list[OrderedDict[int, None]] = [OrderedDict() for _ in self._limit]

    def _touch(self, key: int, clock: int) -> None:
        self._order[self._pool_of_layer[key // self.E]].move_to_end(key)

    def _on_admit(self, key: int, pool: int, clock: int, used: bool) -> None:
        self._order[pool][key] = None

    def _on_remove(self, key: int, pool: int) -> None:
        del self._order[pool][key]

    def _victim(self, pool: int, protect: set[int], clock: int) -> int | None:
        for key in self._order[pool]:
            if key not in protect:
                return key
        return None

    def recency_order(self, pool: int = 0) -> list[int]:
        """Keys from least to most recently used."""
        return list(self._order[pool])


@CACHE_POLICIES.register("fifo")
class FIFOCache(LRUCache):
    """First in, first out: the oldest admitted expert leaves; hits do not change the order."""

    name = "fifo"

    def _touch(self, key: int, clock: int) -> None:
        pass


@CACHE_POLICIES.register("lfu")
class LFUCache(ExpertCache):
    """Least frequently used within the current request, as MoE-Infinity's released dispatcher counts it.

    The count is ``incache_visit_count``, a field of the expert's ``Node``. ``ExpertDispatcher::
    GPUFetchFunc`` (``core/parallel/expert_dispatcher.cpp``) raises it by one for every expert it
    dispatches, a hit or a demand load alike (a prefetch adds nothing); eviction does not touch it, so an
    expert evicted and fetched again comes back with the visits it had, and ``ClearExpertCacheCounts``
    zeroes every node's count (after prefill and after each request, ``reset_request``). The victim is
    the first resident expert with the smallest count in the dispatcher's scan (it keeps a node only when
    its count is strictly smaller). The TorchMoE-era dispatcher scans ``experts_[expert][layer]``, so ties
    go to the lowest expert index, then the lowest layer; later releases scan ``cached_experts_``, a
    ``std::unordered_set`` of ``layer << 32 | expert`` keys whose order the standard library's hashing
    sets, so the fixed scan order stands in for it. Experts still to be dispatched in the step are
    locked, i.e. protected.

    ``forget=True`` is the textbook LFU (a count lives only while the expert is resident, a demand
    admission counts as one visit, ties go to the least recently used): kept as ``lfu-forget`` for
    comparison.
    """

    name = "lfu"
    forget = False

    def __init__(self, geometry: CacheGeometry, capacity: CacheCapacity):
        super().__init__(geometry, capacity)
        self._count: dict[int, int] = {}  # every expert seen in this request, resident or not
        self._last: dict[int, int] = {}
        self._heaps: list[list[tuple[int, int, int]]] = [[] for _ in self._limit]

    def _tie(self, key: int) -> int:
        if self.forget:
            return self._last[key]
        return (key % self.E) * self.L + key // self.E  # the dispatcher's scan order: expert, then layer

    def _push(self, key: int) -> None:
        heapq.heappush(self._heaps[self._pool_of_layer[key // self.E]], (self._count[key], self._tie(key), key))

    def _touch(self, key: int, clock: int) -> None:
        self._count[key] += 1
        self._last[key] = clock
        self._push(key)

    def _on_admit(self, key: int, pool: int, clock: int, used: bool) -> None:
        if self.forget:
            self._count[key] = 1 if used else 0
        else:
            # the node's count survives its eviction; a demand load is a dispatch, a prefetch is not
            self._count[key] = self._count.get(key, 0) + (1 if used else 0)
        self._last[key] = clock
        self._push(key)

    def _on_remove(self, key: int, pool: int) -> None:
        if self.forget:
            del self._count[key]
            del self._last[key]

    def visit_count(self, layer: int, expert: int) -> int:
        """The expert's count in the current request (0 when never visited, or forgotten)."""
        return self._count.get(layer * self.E + expert, 0)

    def _victim(self, pool: int, protect: set[int], clock: int) -> int | None:
        heap = self._heaps[pool]
        skipped = []
        victim = None
        while heap:
            count, tie, key = heapq.heappop(heap)
            if key not in self._resident or self._count.get(key) != count or self._tie(key) != tie:
                continue  # stale entry
            if key in protect:
                skipped.append((count, tie, key))
                continue
            victim = key
            break
        for item in skipped:
            heapq.heappush(heap, item)
        return victim

    def reset_request(self) -> None:
        for key in self._count:
            self._count[key] = 0
        for heap in self._heaps:
            heap.clear()
        for key in self._resident:
            self._push(key)


@CACHE_POLICIES.register("lfu-forget")
class LFUForgetCache(LFUCache):
    """Textbook LFU: a count lives only while the expert is resident, and a demand admission is one visit.
    Not what MoE-Infinity's released code does (see :class:`LFUCache`); kept to compare against."""

    name = "lfu-forget"
    forget = True


@CACHE_POLICIES.register("static")
class StaticCache(ExpertCache):
    """A fixed resident set chosen before the run (``preload``); misses are loaded into a staging buffer
    and never kept (Fiddler's popularity placement, llama.cpp's ``--n-cpu-moe`` style static placement)."""

    name = "static"

    def _touch(self, key: int, clock: int) -> None:
        pass

    def _on_admit(self, key: int, pool: int, clock: int, used: bool) -> None:
        pass

    def _on_remove(self, key: int, pool: int) -> None:
        pass

    def _victim(self, pool: int, protect: set[int], clock: int) -> int | None:
        return None

    def _bypass(self, key: int, pool: int, clock: int, protect: set[int]) -> bool:
        return True

    def _admit_key(self, key, layer, clock, protect, evicted, used) -> bool:
        return False


class FutureIndex:
    """For every expert key, the sorted clocks at which it is used: what Belady's oracle reads."""

    def __init__(self, uses: Mapping[int, Sequence[int]]):
        self._uses = {k: list(v) for k, v in uses.items()}

    def next_use(self, key: int, clock: int) -> int:
        uses = self._uses.get(key)
        if not uses:
            return NEVER
        i = bisect_right(uses, clock)
        return uses[i] if i < len(uses) else NEVER


@CACHE_POLICIES.register("belady")
class BeladyCache(ExpertCache):
    """Belady's MIN with bypass: on a miss with no room, the candidate used farthest in the future (the
    newcomer included) is the one that goes. Optimal hit count for equal-size experts; needs the future
    (``attach_future``), which the simulator builds from the trace."""

    name = "belady"

    def __init__(self, geometry: CacheGeometry, capacity: CacheCapacity):
        super().__init__(geometry, capacity)
        self._future: FutureIndex | None = None
        self._next: dict[int, int] = {}
        self._heaps: list[list[tuple[int, int]]] = [[] for _ in self._limit]

    def attach_future(self, future: FutureIndex) -> None:
        self._future = future

    def next_uses(self) -> dict[int, int]:
        """Key -> the clock of its next use, for every resident key (what the eviction compares)."""
        return dict(self._next)

    def _next_use(self, key: int, clock: int) -> int:
        if self._future is None:
            raise RuntimeError("cache policy 'belady' needs the future of the trace (attach_future was not called)")
        return self._future.next_use(key, clock)

    def _set(self, key: int, clock: int) -> None:
        nu = self._next_use(key, clock)
        self._next[key] = nu
        heapq.heappush(self._heaps[self._pool_of_layer[key // self.E]], (-nu, key))

    def _touch(self, key: int, clock: int) -> None:
        self._set(key, clock)

    def _on_admit(self, key: int, pool: int, clock: int, used: bool) -> None:
        self._set(key, clock)

    def _on_remove(self, key: int, pool: int) -> None:
        del self._next[key]

    def _peek(self, pool: int, protect: set[int]) -> tuple[int, int] | None:
        heap = self._heaps[pool]
        skipped = []
        found = None
        while heap:
            neg, key = heap[0]
            if self._next.get(key) != -neg:
                heapq.heappop(heap)
                continue
            if key in protect:
                skipped.append(heapq.heappop(heap))
                continue
            found = (key, -neg)
            break
        for item in skipped:
            heapq.heappush(heap, item)
        return found

    def _victim(self, pool: int, protect: set[int], clock: int) -> int | None:
        found = self._peek(pool, protect)
        # the heap entry goes stale once the key is evicted and is dropped lazily
        return None if found is None else found[0]

    def _bypass(self, key: int, pool: int, clock: int, protect: set[int]) -> bool:
        found = self._peek(pool, protect)
        if found is None:
            return True
        return self._next_use(key, clock) >= found[1]


@CACHE_POLICIES.register("mrs")
class MRSCache(ExpertCache):
    """HybriMoE's score-aware cache (``KScoreAwareCache``): exponentially decayed router scores.

    The trace keeps only the top-k router weights, so experts outside the top-k decay as if their score
    were 0; with top-k <= p (all bundled traces) that is exact for the top-k and an approximation for the
    rest of HybriMoE's top-p. Ties go to the lower expert id.
    """

    name = "mrs"
    uses_scores = True

    def __init__(self, geometry: CacheGeometry, capacity: CacheCapacity, alpha: float = 0.5, top_p: int = 12):
        super().__init__(geometry, capacity)
        if not 0.0 < alpha <= 1.0:
            raise MoesimError(f"mrs alpha {alpha}: expected 0 < alpha <= 1")
        self.alpha = alpha
        self.top_p = top_p
        self.scores = np.zeros((self.L, self.E), dtype=np.float64)
        self._members: list[set[int]] = [set() for _ in self._limit]

    def observe(self, layer: int, experts: Sequence[int], weights: Sequence[float]) -> None:
        row = self.scores[layer]
        row *= 1.0 - self.alpha
        chosen = range(len(experts))
        if len(experts) > self.top_p:
            chosen = sorted(chosen, key=lambda i: -weights[i])[: self.top_p]
        a = self.alpha
        for i in chosen:
            row[experts[i]] += a * weights[i]

    def _touch(self, key: int, clock: int) -> None:
        pass

    def _on_admit(self, key: int, pool: int, clock: int, used: bool) -> None:
        self._members[pool].add(key)

    def _on_remove(self, key: int, pool: int) -> None:
        self._members[pool].discard(key)

    def _victim(self, pool: int, protect: set[int], clock: int) -> int | None:
        members = self._members[pool]
        if len(members) > 64:  # a global pool: let numpy scan it
            keys = np.fromiter((k for k in members if k not in protect), dtype=np.int64)
            if keys.size == 0:
                return None
            s = self.scores.reshape(-1)[keys]
            return int(keys[s == s.min()].min())
        E = self.E
        scores = self.scores
        best = None
        best_score = 0.0
        for key in members:
            if key in protect:
                continue
            s = scores[key // E, key % E]
            if best is None or s < best_score or (s == best_score and key < best):
                best, best_score = key, s
        return best


def make_cache(policy: str, geometry: CacheGeometry, capacity: CacheCapacity, **params) -> ExpertCache:
    cls = CACHE_POLICIES.get(policy, "--cache")
    return cls(geometry, capacity, **params)


def popularity_order(counts: np.ndarray, capacity: CacheCapacity, geometry: CacheGeometry) -> list[tuple[int, int]]:
    """(layer, expert) by descending use count: per layer for a per-layer cache, over all for a global one.

    Ties go to the lower layer, then the lower expert id, so the order is deterministic.
    """
    L, E = counts.shape
    if capacity.scope == "layer":
        out = []
        for layer in range(L):
            order = np.lexsort((np.arange(E), -counts[layer]))
            out.extend((layer, int(e)) for e in order)
        return out
    flat = counts.reshape(-1)
    order = np.lexsort((np.arange(L * E), -flat))
    return [(int(k) // E, int(k) % E) for k in order]
