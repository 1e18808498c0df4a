"""How expert weights cross PCIe, and the SimPy processes that model the contended resources.

Transfer modes (``TRANSFERS``):

``swap``    Mixtral-Offloading's released ``ExpertCache._swap``: a miss copies the expert host->device
            and the evicted expert device->host (the host keeps only ``offload_size`` pinned slots), both
            ``non_blocking`` on the *compute* stream, so copies and expert GEMMs are serialized.
``stream``  a dedicated copy stream (AdapMoE's ``copy_stream``, MoE-Infinity's fetch stream): loads from
            pinned host memory overlap compute; an expert's GEMM waits only for its own copy.
            No write-back (the host keeps every expert).
``sync``    Fiddler's GPU path for a non-resident expert: ``load_state_dict`` from pageable host tensors
            into one placeholder, synchronous on the compute stream, never cached.
``layer``   accelerate's naive offload: a layer that does not fit is copied whole (all experts),
            synchronously from pageable memory, every forward pass.

A :class:`Lane` is one FIFO server with its own SimPy process: the host->device copy engine, the
device->host copy engine, and the host CPU pool that runs CPU experts. A job is served whole (no
preemption); queued demand jobs go before queued background (prefetch) jobs when the policy says demand
loads have priority. When both copy directions are busy at once a copy takes the profile's
``concurrent=True`` time. Where the profile measured that copies and compute share hardware (a CPU
standing in for the device), the part of a copy that overlaps compute is stretched by the profile's
``copy_slowdown_with_compute`` (``contended_by``/``slowdown``; the driver stretches compute likewise).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import simpy

from moesim.errors import MoesimError
from moesim.simulator.decide import DemandFirstQueue, QueuedJob
from moesim.simulator.policies import Registry

TRANSFER_MODES = ("swap", "stream", "sync", "layer")


@dataclass(frozen=True)
class TransferSpec:
    mode: str = "stream"
    pinned: bool = True  # host copies live in pinned memory
    write_back: bool = False  # an eviction copies the evicted expert device->host (swap)
    demand_priority: bool = False  # queued demand loads overtake queued prefetches
    staging_experts: int = 0  # device buffers for experts in flight or streamed through
    prefetch_buffer_experts: int = 0  # device buffers that hold prefetches outside the cache (AdapMoE)

    def __post_init__(self):
        if self.mode not in TRANSFER_MODES:
            raise MoesimError(f"transfer mode '{self.mode}': expected one of {', '.join(TRANSFER_MODES)}")

    @property
    def on_compute_stream(self) -> bool:
        return self.mode in ("swap", "sync", "layer")


TRANSFERS: Registry[TransferSpec] = Registry("transfer")
TRANSFERS.register("swap")(TransferSpec("swap", pinned=True, write_back=True, staging_experts=4))
TRANSFERS.register("stream")(TransferSpec("stream", pinned=True))
TRANSFERS.register("sync")(TransferSpec("sync", pinned=False, staging_experts=1))
TRANSFERS.register("layer")(TransferSpec("layer", pinned=False))


def stretched(duration: float, start: float, other_busy_until: float, slowdown: float) -> float:
    """``duration`` of work started at ``start`` whose overlap with another resource, busy until
    ``other_busy_until``, runs ``slowdown`` times slower (the rest at full speed)."""
    overlap = min(duration * slowdown, other_busy_until - start)
    if overlap <= 0.0 or slowdown == 1.0:
        return duration
    return overlap + (duration - overlap / slowdown)


def transfer_spec(name: str, **changes) -> TransferSpec:
    return replace(TRANSFERS.get(name, "--transfer"), **changes)


class Job(QueuedJob):
    """One unit of work on a lane; ``done`` fires when it (and the stages chained after it) have been served."""

    __slots__ = ("done", "duration", "concurrent_duration", "nbytes", "label", "then")

    def __init__(self, done: simpy.Event, duration: float, concurrent_duration: float, nbytes: int, label: str,
                 seq: int, background: bool, then: tuple = ()):
        self.seq = seq
        self.background = background
        self.started = False
        self.done = done
        self.duration = duration
        self.concurrent_duration = concurrent_duration
        self.nbytes = nbytes
        self.label = label
        self.then = then  # stages to submit when this one is served: (lane, duration, concurrent, bytes, label)

    def landed(self) -> bool:
        return self.done.triggered


class Lane:
    """A FIFO server (copy engine or CPU pool) running as its own SimPy process.

    A job may carry further stages on other lanes (``then``): each is queued on its lane when the previous
    one is served, and the job's ``done`` fires after the last, so a CPU expert's activations-down, FFN
    and outputs-up run in order without a process of their own.
    """

    def __init__(self, env: simpy.Environment, name: str,
                 record: Optional[Callable[[str, str, float, float], None]] = None):
        self.env = env
        self.name = name
        self.peer: Optional[Lane] = None  # the other copy direction, for contention
        self._queue = DemandFirstQueue()
        self._wake: Optional[simpy.Event] = None
        self._record = record
        self._seq = 0
        self.busy_s = 0.0
        self.bytes = 0
        self.jobs = 0
        self.busy_until = 0.0
        # another resource whose busy time slows this lane's jobs, and by what factor (1.0: independent)
        self.contended_by: Optional[Callable[[], float]] = None  # returns that resource's busy-until time
        self.slowdown = 1.0
        self._extra = 0.0  # time added to the job in service by work that started beside it
        env.process(self._serve())

    def submit(self, duration: float, nbytes: int = 0, label: str = "", background: bool = False,
               concurrent_duration: Optional[float] = None, then: tuple = (),
               done: Optional[simpy.Event] = None) -> Job:
        self._seq += 1
        job = Job(self.env.event() if done is None else done, duration,
                  duration if concurrent_duration is None else concurrent_duration, nbytes, label, self._seq,
                  background, then)
        self._queue.push(job)
        wake = self._wake
        if wake is not None and not wake.triggered:
            wake.succeed()
        return job

    def promote(self, job: Job) -> None:
        """A queued background job becomes demand (someone now waits on it)."""
        self._queue.promote(job)

    def slow_down_current(self, now: float, until: float) -> None:
        """Work on the contending resource runs from ``now`` to ``until``: the job in service (if any)
        progresses at 1/``slowdown`` of its speed over the overlap, so it ends later by the work it missed."""
        overlap = min(self.busy_until, until) - now
        if overlap > 0.0 and self.slowdown != 1.0:
            extra = overlap * (1.0 - 1.0 / self.slowdown)
            self._extra += extra
            self.busy_until += extra

    def account(self, start: float, duration: float, nbytes: int, label: str) -> None:
        """Busy time spent outside the lane's own process (copies issued on the compute stream)."""
        self.busy_s += duration
        self.bytes += nbytes
        self.jobs += 1
        if self._record is not None:
            self._record(self.name, label, start, duration)

    def _serve(self):
        env = self.env
        queue = self._queue
        while True:
            job = queue.pop()
            if job is None:
                self._wake = env.event()
                yield self._wake
                self._wake = None
                continue
            job.started = True
            start = env.now
            peer = self.peer
            duration = job.concurrent_duration if (peer is not None and peer.busy_until > start) else job.duration
            if self.contended_by is not None:
                duration = stretched(duration, start, self.contended_by(), self.slowdown)
            self.busy_until = start + duration
            if duration > 0:
                yield env.timeout(duration)
            while self._extra > 0.0:
                extra, self._extra = self._extra, 0.0
                duration += extra
                yield env.timeout(extra)
            self.busy_s += duration
            self.bytes += job.nbytes
            self.jobs += 1
            if self._record is not None:
                self._record(self.name, job.label, start, duration)
            if job.then:
                lane, d, conc, nbytes, label = job.then[0]
                lane.submit(d, nbytes, label, concurrent_duration=conc, then=job.then[1:], done=job.done)
            else:
                job.done.succeed()
