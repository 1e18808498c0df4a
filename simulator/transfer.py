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
``TransferSpec.default_stream`` is the limit of that rule where a system copies with synchronous
``cudaMemcpy`` on the legacy default stream (MoE-Infinity 2024): an infinite slowdown, so a copy and
compute take turns, each starting when the other's work in progress ends.
"""

from __future__ import annotations

import math
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
    # the copies are synchronous cudaMemcpy on the legacy default stream (MoE-Infinity 2024): a copy and
    # the compute stream's kernels never overlap, each waits for the other's work in progress
    default_stream: bool = False

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


class LaneWork(QueuedJob):
    """What both lanes' jobs carry: their service times, bytes, label and the stages chained after them."""

    __slots__ = ("duration", "concurrent_duration", "nbytes", "label", "then")

    def __init__(self, duration: float, concurrent_duration: float, nbytes: int, label: str, seq: int,
                 background: bool, then: tuple):
        QueuedJob.__init__(self, seq, background)
        self.duration = duration
        self.concurrent_duration = concurrent_duration
        self.nbytes = nbytes
        self.label = label
        self.then = then  # stages to submit when this one is served: (lane, duration, concurrent, bytes, label)


class Job(LaneWork):
    """One unit of work on a lane; ``done`` fires when it (and the stages chained after it) have been served."""

    __slots__ = ("done",)

    def __init__(self, done: simpy.Event, duration: float, concurrent_duration: float, nbytes: int, label: str,
                 seq: int, background: bool, then: tuple = ()):
        LaneWork.__init__(self, duration, concurrent_duration, nbytes, label, seq, background, then)
        self.done = done

    def landed(self) -> bool:
        return self.done.triggered


class _LaneState:
    """What both lane kinds keep: the demand-first queue, the counters a run reports, and the contention rule
    (work on another resource stretches the job in service)."""

    def __init__(self, name: str, record: Optional[Callable[[str, str, float, float], None]]):
        self.name = name
        self._queue = DemandFirstQueue()
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

    def promote(self, job: QueuedJob) -> None:
        """A queued background job becomes demand (someone now waits on it)."""
        self._queue.promote(job)

    def withdraw(self, job: QueuedJob) -> bool:
        """Take a queued background job off the lane before it starts (False if it has started)."""
        return self._queue.withdraw(job)

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


class Lane(_LaneState):
    """A FIFO server (copy engine or CPU pool) running as its own SimPy process.

    A job may carry further stages on other lanes (``then``): each is queued on its lane when the previous
    one is served, and the job's ``done`` fires after the last, so a CPU expert's activations-down, FFN
    and outputs-up run in order without a process of their own.
    """

    def __init__(self, env: simpy.Environment, name: str,
                 record: Optional[Callable[[str, str, float, float], None]] = None):
        super().__init__(name, record)
        self.env = env
        self.peer: Optional[Lane] = None  # the other copy direction, for contention
        self._wake: Optional[simpy.Event] = None
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


# ---- the event-free copy path ---------------------------------------------------------------------------
# The lanes above are SimPy processes: every copy is a queued job, a timeout and a process switch. The lanes
# below compute the same schedule without SimPy events. Only the driver submits work, at its own (monotonic)
# time, so a lane's future is fixed by its queue: it is advanced lazily, when the driver next looks.
#
# Ties decide answers (a lane that finishes a copy at the instant the driver submits a demand load picks its
# next job with or without that load), so the clocked lanes keep SimPy's order of simultaneous events: each
# thing SimPy would schedule (a copy's timeout, the extra timeout of a stretched copy, a lane's wake-up, a
# job's ``done``, the driver's sleep) takes the next number of one counter, and events are processed in
# (time, number) order, as SimPy's queue does. The exactness test (tests/test_sim_fastpath.py) compares
# both paths on every preset.

_IDLE, _WAKING, _BUSY = 0, 1, 2


class ClockedJob(LaneWork):
    """One unit of work on a clocked lane. ``root`` is the first stage of its chain: the chain is done (the
    driver may read its result) when its last stage is served; ``done_at``/``done_order`` say when, as SimPy
    would have fired the job's ``done`` event."""

    __slots__ = ("root", "finished", "done_at", "done_order")

    def __init__(self, duration: float, concurrent_duration: float, nbytes: int, label: str, seq: int,
                 background: bool, then: tuple, root: Optional["ClockedJob"]):
        LaneWork.__init__(self, duration, concurrent_duration, nbytes, label, seq, background, then)
        self.root = self if root is None else root
        self.finished = False
        self.done_at = 0.0
        self.done_order = 0

    def landed(self) -> bool:
        return self.finished


class LaneClock:
    """The shared order of a set of clocked lanes and the driver: SimPy's (time, event number) order."""

    __slots__ = ("lanes", "order", "now")

    def __init__(self):
        self.lanes: list[ClockedLane] = []  # those that have had work: a GPU-only run advances one lane
        self.order = 0  # the number of the last event scheduled
        self.now = 0.0  # the driver's time

    def next_order(self) -> int:
        self.order += 1
        return self.order

    def advance(self, until: float, order: int) -> None:
        """Process every lane event that SimPy would process before the event (``until``, ``order``)."""
        lanes = self.lanes
        if len(lanes) == 1:  # one lane (until a job chains onto another): its events in turn
            lane = lanes[0]
            while lane.state != _IDLE and (lane.event_at < until or (
                    lane.event_at == until and lane.event_order < order)):
                lane.fire()
                if len(lanes) != 1:
                    break
            else:
                return
        while True:
            first = None
            for lane in lanes:
                if lane.state != _IDLE and (first is None or lane.event_at < first.event_at or (
                        lane.event_at == first.event_at and lane.event_order < first.event_order)):
                    first = lane
            if first is None or first.event_at > until or (first.event_at == until and first.event_order >= order):
                return
            first.fire()

    def run_until_done(self, job: ClockedJob) -> None:
        """Process lane events in order until ``job``'s chain is done (the driver waits for it)."""
        root = job.root
        lanes = self.lanes
        while not root.finished:
            first = None
            for lane in lanes:
                if lane.state != _IDLE and (first is None or lane.event_at < first.event_at or (
                        lane.event_at == first.event_at and lane.event_order < first.event_order)):
                    first = lane
            if first is None:
                raise RuntimeError(f"{job.label}: no lane will serve it")  # a driver bug, not bad input
            first.fire()

    def drain(self) -> float:
        """Serve everything still queued (prefetches issued at the end); returns the last event's time, the
        end of the run as SimPy's ``env.run()`` would leave ``now``."""
        self.advance(float("inf"), 0)
        return max([self.now] + [lane.last_event for lane in self.lanes])


class ClockedLane(_LaneState):
    """A FIFO server (copy engine or CPU pool) with the rules of :class:`Lane`, computed without SimPy: one
    pending event at most (a wake-up or the end of the job in service), fired by :class:`LaneClock`."""

    def __init__(self, clock: LaneClock, name: str, record: Optional[Callable[[str, str, float, float], None]] = None):
        super().__init__(name, record)
        self.clock = clock
        self._joined = False  # in clock.lanes, from the first job on
        self.peer: Optional[ClockedLane] = None
        self.state = _IDLE
        self.event_at = 0.0
        self.event_order = 0
        self.last_event = 0.0
        self._current: Optional[ClockedJob] = None
        self._start = 0.0
        self._duration = 0.0

    def submit(self, duration: float, nbytes: int = 0, label: str = "", background: bool = False,
               concurrent_duration: Optional[float] = None, then: tuple = (),
               root: Optional[ClockedJob] = None, now: Optional[float] = None) -> ClockedJob:
        self._seq += 1
        job = ClockedJob(duration, duration if concurrent_duration is None else concurrent_duration, nbytes, label,
                         self._seq, background, then, root)
        self._queue.push(job)
        if self.state == _IDLE:  # SimPy: the waiting lane's wake-up event is scheduled now
            clock = self.clock
            if not self._joined:
                self._joined = True
                clock.lanes.append(self)
            self.state = _WAKING
            self.event_at = clock.now if now is None else now
            clock.order += 1
            self.event_order = clock.order
        return job

    def fire(self) -> None:
        """Process this lane's pending event (the clock calls it in SimPy's order)."""
        at = self.event_at
        self.last_event = at
        if self.state == _BUSY:
            if self._extra > 0.0:  # work that ran beside the copy stretched it: serve the rest
                extra, self._extra = self._extra, 0.0
                self._duration += extra
                self.event_at = at + extra
                self.clock.order += 1
                self.event_order = self.clock.order
                return
            self._finish(at)
        self._start_next(at)

    def _finish(self, at: float) -> None:
        job = self._current
        self._current = None
        self.busy_s += self._duration
        self.bytes += job.nbytes
        self.jobs += 1
        if self._record is not None:
            self._record(self.name, job.label, self._start, self._duration)
        if job.then:
            lane, d, conc, nbytes, label = job.then[0]
            lane.submit(d, nbytes, label, concurrent_duration=conc, then=job.then[1:], root=job.root, now=at)
        else:
            root = job.root
            root.finished = True
            root.done_at = at
            self.clock.order += 1
            root.done_order = self.clock.order

    def _start_next(self, now: float) -> None:
        while True:
            job = self._queue.pop()
            if job is None:
                self.state = _IDLE
                return
            job.started = True
            peer = self.peer
            duration = job.concurrent_duration if (peer is not None and peer.busy_until > now) else job.duration
            if self.contended_by is not None:
                duration = stretched(duration, now, self.contended_by(), self.slowdown)
            self.busy_until = now + duration
            self._current = job
            self._start = now
            self._duration = duration
            if duration > 0:
                self.state = _BUSY
                self.event_at = now + duration
                self.clock.order += 1
                self.event_order = self.clock.order
                return
            self._finish(now)  # nothing to wait for: served at once, as SimPy's lane does
