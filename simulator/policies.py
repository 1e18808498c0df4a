"""The policy interface: what the simulator (and later the real offloading engine) asks of a policy.

An offloading system is composed of independent parts, each chosen by name from its own registry:

==================  ===============================================  ==================================
part                registry (module)                                 examples
==================  ===============================================  ==================================
expert cache        ``CACHE_POLICIES`` (:mod:`.cache`)                lru, lfu, fifo, static, belady, mrs
prefetcher          ``PREFETCHERS`` (:mod:`.prefetch`)                none, next-layer, first-non-resident,
                                                                      eam, predictive, oracle
execution placement ``PLACEMENTS`` (:mod:`.placement`)                gpu, fiddler, hybrimoe
transfer            ``TRANSFERS`` (:mod:`.transfer`)                  swap, stream, sync, layer
==================  ===============================================  ==================================

Named presets (:mod:`.presets`) compose them the way each published system does.

None of these objects knows about SimPy, time or bytes on a wire: they are plain Python bookkeeping,
so the discrete-event simulator (:mod:`.engine`) and the real engine (which issues torch copies) drive
the *same* objects through the same calls. Experts are addressed as ``(layer, expert)`` with ``layer``
the MoE-layer index (0..L-1); a ``clock`` is any non-decreasing integer the driver advances once per
(forward step, layer) — the simulator uses ``step_index * L + layer``.

Expert cache (:class:`moesim.simulator.cache.ExpertCache`)
    ``contains(layer, expert) -> bool``
        Is the expert's weight resident on the GPU (or reserved for an in-flight load)?
    ``access(layer, experts, clock) -> CacheAccess``
        Demand use of one layer-step's distinct experts, in the order the driver will run them.
        Hits are promoted (per the eviction rule); each miss is admitted, evicting victims as needed.
        ``CacheAccess.misses`` are what the driver must load, ``evicted`` what it may drop (or write
        back), ``bypassed`` the misses that were loaded into a staging buffer but not kept. Experts
        later in ``experts`` are never evicted to make room for earlier ones; earlier ones may be
        (streaming, as when a prefill layer needs more experts than there are slots).
    ``insert(layer, expert, clock) -> Insertion``
        Admit an expert that was not demanded (a prefetch). ``admitted`` False means no room.
    ``observe(layer, experts, weights)``
        Router scores of a layer-step, before ``access`` (only score-based eviction uses them).
    ``reset_request()``
        Called after a batch's prefill and after its decode: per-request statistics restart
        (MoE-Infinity's visit counts).
    ``preload(keys)``
        Initial residency, before the run (not timed).

Prefetcher (:class:`moesim.simulator.prefetch.Prefetcher`)
    ``predict(ctx) -> Sequence[tuple[int, int]]``
        Called once per layer-step when the layer's routing is known; returns ``(layer, expert)`` to
        load ahead, best first. ``ctx`` (:class:`moesim.simulator.prefetch.PrefetchContext`) gives the
        layer, phase, the layer-step's work, and ``resident(layer, expert)``. ``into_buffer`` True
        means the loads go to a side buffer (AdapMoE) and enter the cache only when used.
    ``begin_request(requests)`` / ``end_request(requests)``
        Request boundaries (MoE-Infinity's activation-matrix collection).

Execution placement (:class:`moesim.simulator.placement.Placement`)
    ``place(layer, phase, experts, tokens, resident) -> tuple[bool, ...]``
        For each expert of a layer-step, True to run it on the CPU (weights stay in host memory),
        False to run it on the GPU (loading it first if it is not resident). Costs come from the
        per-run lookup tables the placement was built with (:class:`moesim.simulator.costs.CostTables`),
        never from the profile in the hot loop.

Transfer (:class:`moesim.simulator.transfer.TransferSpec`)
    Data, not behaviour: on which stream loads run (the compute stream, serialized, or a separate
    copy stream that overlaps compute), pinned or pageable host memory, whether an eviction writes
    the expert back (Mixtral-Offloading's swap), whether demand loads overtake queued prefetches,
    and how many staging buffers it needs.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from moesim.errors import MoesimError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> factory for one plugin family; unknown names give a one-line error listing the known ones."""

    def __init__(self, family: str):
        self.family = family
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.family} '{name}' registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str, flag: str | None = None) -> T:
        if name not in self._items:
            where = f"{flag} " if flag else ""
            raise MoesimError(f"{where}{self.family} '{name}': expected one of {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)
