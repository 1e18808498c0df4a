"""The engine's concurrent resources: a copy engine and a CPU expert pool, each a worker thread.

A :class:`Lane` mirrors the simulator's :class:`moesim.simulator.transfer.Lane`: one FIFO server with the
same queue (:class:`moesim.simulator.decide.DemandFirstQueue`: queued demand jobs before queued background
prefetches), serving one job at a time. On CUDA a lane owns a CUDA stream: its worker issues the job's copies on that stream and records
an event, so the compute stream waits for exactly the copy it needs (``Marker.make_stream_wait``). At
most two jobs are issued ahead on the stream (the next copy is queued while the previous one runs, so
the link never idles between jobs), and queue priority applies to everything not yet issued. On the
CPU (the host playing the device) the worker thread does the copy itself with ``Tensor.copy_``, which
releases the GIL, so copies really overlap the compute of the main thread.

A :class:`Marker` is a point in some stream's work that others wait for: set on the host once the work
is issued (on the CPU, once it is done, since CPU work is synchronous), with a CUDA event recorded after
it on CUDA.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, Optional

import torch

from moesim.simulator.decide import DemandFirstQueue, QueuedJob

STALL_TIMEOUT_S = 300.0  # a wait this long means a bug in the engine's ordering, never a slow copy


class EngineStall(RuntimeError):
    """A wait that can never end (an ordering bug): raised instead of hanging."""


class Marker:
    __slots__ = ("issued", "event", "label")

    def __init__(self, cuda: bool, label: str = ""):
        self.issued = threading.Event()
        self.event = torch.cuda.Event() if cuda else None
        self.label = label

    @classmethod
    def done(cls) -> "Marker":
        m = cls(False, "done")
        m.issued.set()
        return m

    def record(self, stream: Optional["torch.cuda.Stream"] = None) -> None:
        """The work before this point has been issued (CUDA) or done (CPU)."""
        if self.event is not None:
            self.event.record(stream)
        self.issued.set()

    def is_done(self) -> bool:
        if not self.issued.is_set():
            return False
        return self.event is None or self.event.query()

    def wait_issued(self) -> None:
        if not self.issued.wait(STALL_TIMEOUT_S):
            raise EngineStall(f"engine stalled {STALL_TIMEOUT_S:.0f} s waiting for '{self.label}'")

    def make_stream_wait(self, stream: Optional["torch.cuda.Stream"]) -> None:
        """Block until the work is issued; on CUDA make ``stream`` wait for it on the GPU (host moves on)."""
        self.wait_issued()
        if self.event is not None and stream is not None:
            stream.wait_event(self.event)

    def wait_done(self) -> None:
        self.wait_issued()
        if self.event is not None:
            self.event.synchronize()


class Job(QueuedJob):
    """One unit of work on a lane. ``run(job, stream)`` does it; ``done`` is recorded after it."""

    __slots__ = ("run", "done", "nbytes", "label", "cancelled", "key")

    def __init__(self, run: Callable[[Optional["torch.cuda.Stream"]], None], done: Marker, nbytes: int, label: str,
                 background: bool, seq: int, key: int = -1):
        QueuedJob.__init__(self, seq, background)
        self.run = run
        self.done = done
        self.nbytes = nbytes
        self.label = label
        self.cancelled = False  # set before it starts: the work is redirected (see Lane.cancel)
        self.key = key

    def landed(self) -> bool:
        return self.done.is_done()


class Lane:
    """A FIFO server on its own thread (demand before background when ``demand_priority``)."""

    def __init__(self, name: str, device: torch.device, depth: int = 2):
        self.name = name
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.depth = max(1, depth) if self.cuda else 1
        self._queue = DemandFirstQueue()
        self._cond = threading.Condition()
        self._stop = False
        self._seq = 0
        self._error: Optional[BaseException] = None
        self.bytes = 0
        self.jobs = 0
        self.busy_s = 0.0  # wall time of served jobs (CPU lanes; on CUDA the issue time only)
        self._thread = threading.Thread(target=self._serve, name=f"moesim-{name}", daemon=True)
        self._thread.start()

    # ---- main-thread side
    def submit(self, run, nbytes: int, label: str, background: bool = False, key: int = -1) -> Job:
        self.check()
        with self._cond:
            self._seq += 1
            job = Job(run, Marker(self.cuda, label), nbytes, label, background, self._seq, key)
            self._queue.push(job)
            self._cond.notify()
        return job

    def promote(self, job: Job) -> None:
        """A queued background job becomes demand (someone now waits on it)."""
        with self._cond:
            self._queue.promote(job)

    def cancel(self, job: Job) -> bool:
        """Mark a job that has not started yet as cancelled (its ``run`` sees it). False if it started."""
        with self._cond:
            if job.started:
                return False
            job.cancelled = True
            return True

    def reset_counters(self) -> None:
        self.bytes = 0
        self.jobs = 0
        self.busy_s = 0.0

    def check(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def drain(self) -> None:
        """Wait until every submitted job is done."""
        while True:
            with self._cond:
                idle = not self._queue and self._busy is None
            if idle:
                break
            time.sleep(0.0005)
        if self.stream is not None:
            self.stream.synchronize()
        self.check()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # ---- worker
    _busy: Optional[Job] = None

    def _serve(self) -> None:
        if self.cuda:
            torch.cuda.set_device(self.device)
        issued: deque[Job] = deque()
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    if issued:
                        break
                    self._cond.wait()
                if self._stop and not self._queue:
                    return
                job = self._queue.pop()
                if job is not None:
                    job.started = True
                    self._busy = job
            if job is None:  # nothing queued: retire what is in flight
                while issued:
                    issued.popleft().done.wait_done()
                continue
            t0 = time.perf_counter()
            try:
                if self.cuda:
                    with torch.cuda.stream(self.stream):
                        job.run(job, self.stream)
                else:
                    job.run(job, None)
            except BaseException as exc:  # surfaced on the main thread by check()
                self._error = exc
            finally:
                job.done.record(self.stream)
                self.busy_s += time.perf_counter() - t0
                self.bytes += job.nbytes
                self.jobs += 1
            if self.cuda:
                issued.append(job)
                while len(issued) >= self.depth:
                    issued.popleft().done.wait_done()
            with self._cond:
                self._busy = None
