"""Where expert weights live: every expert in host memory, a fixed set of expert buffers on the device.

:class:`HostStore` holds each (layer, expert)'s packed tensors in host memory, pinned when the policy's
transfer uses pinned memory (CUDA ``pin_memory``; on the CPU-as-device path "pinned" means a direct
memcpy). :class:`BufferPool` is the device side: as many expert-sized buffers as the simulator's memory
plan has cache slots, staging buffers and prefetch buffers, allocated once. Which expert a buffer holds
is decided by the policy objects; the pool only tracks ownership and, per buffer, the marker of the last
compute that reads it (a copy into the buffer waits for that marker, so a buffer is never overwritten
while an expert still to be computed in this step sits in it).

Copies: :func:`copy_expert` copies tensor by tensor. From pageable host memory on the CPU-as-device path
it goes through a 4 MiB bounce buffer in chunks, the way a CUDA driver stages pageable copies and the
way calibration measured the "pageable" copy model.
"""

from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from moesim.engine.kernels import ExpertFormat, ExpertTensors, pack_expert
from moesim.engine.lanes import Job, Marker
from moesim.errors import MoesimError

BOUNCE_BYTES = 4 * 2**20
SYNTHETIC_DISTINCT = 4  # random experts generated; every expert still gets its own copy in memory


class HostStore:
    """All experts of all layers in host memory; ``key = layer * num_experts + expert``."""

    def __init__(self, experts: dict[int, ExpertTensors], pinned: bool, num_experts: int, source: str):
        self.slab: Optional["HostSlab"] = None  # the allocation behind the tensors, when there is one
        self.experts = experts
        self.pinned = pinned
        self.num_experts = num_experts
        self.source = source  # "synthetic" or the checkpoint path

    def __getitem__(self, key: int) -> ExpertTensors:
        return self.experts[key]

    @property
    def expert_bytes(self) -> int:
        return next(iter(self.experts.values())).nbytes

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.experts.values())

    def template(self) -> ExpertTensors:
        return next(iter(self.experts.values()))

    def with_pinning(self, pinned: bool, cuda: bool) -> "HostStore":
        """The same weights in pinned or pageable host memory (a new copy when that differs on CUDA; on the
        CPU-as-device path pinning only changes how copies are made, so the tensors are shared)."""
        if pinned == self.pinned:
            return self
        if not cuda:
            return HostStore(self.experts, pinned, self.num_experts, self.source)
        cuda_pin = pinned
        moved = {k: e.to(torch.device("cpu"), pin_memory=cuda_pin) for k, e in self.experts.items()}
        return HostStore(moved, pinned, self.num_experts, self.source)


def _random_expert(hidden: int, intermediate: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    gate_up = torch.randn(2 * intermediate, hidden, generator=g, device=device) * hidden ** -0.5
    down = torch.randn(hidden, intermediate, generator=g, device=device) * intermediate ** -0.5
    return gate_up, down


class HostSlab:
    """One host allocation holding every expert, page-locked with ``cudaHostRegister`` on CUDA.

    Pinning tensor by tensor goes through PyTorch's caching host allocator, which rounds each block up
    to a power of two (a 470 MB Mixtral matrix takes 512 MB, the whole model twice its size); one slab
    registered with the driver pins exactly the bytes needed. If registration fails, the slab is pinned
    by ``Tensor.pin_memory`` instead (rounded), and ``how`` says so.
    """

    ALIGN = 4096

    def __init__(self, nbytes: int, pin: bool):
        self.tensor = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        self.how = "pageable"
        self._registered = False
        if pin:
            try:
                # as torch.cuda._pin_memory_utils does it (flag 1: cudaHostRegisterPortable)
                rc = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), self.tensor.numel(), 1)
                ok = int(rc) == 0
            except Exception:  # an older torch without the binding, or a driver that refuses
                ok = False
            if ok:
                self._registered = True
                self.how = "pinned (cudaHostRegister)"
                weakref.finalize(self, HostSlab._unregister, self.tensor)
            else:
                self.tensor = self.tensor.pin_memory()
                self.how = "pinned (pin_memory)"
        self.offset = 0

    @staticmethod
    def _unregister(tensor: torch.Tensor) -> None:
        try:
            int(torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr()))
        except Exception:
            pass

    def carve(self, like: torch.Tensor) -> torch.Tensor:
        n = like.numel() * like.element_size()
        start = -(-self.offset // self.ALIGN) * self.ALIGN
        view = self.tensor[start:start + n].view(like.dtype).view(like.shape)
        self.offset = start + n
        return view

    @classmethod
    def size_for(cls, tensors: list[torch.Tensor], copies: int) -> int:
        one = sum(-(-(t.numel() * t.element_size()) // cls.ALIGN) * cls.ALIGN for t in tensors)
        return one * copies + cls.ALIGN


def _into_slab(slab: HostSlab, src: ExpertTensors) -> ExpertTensors:
    ts = tuple(slab.carve(t) for t in src.tensors)
    for d, s in zip(ts, src.tensors):
        d.copy_(s)
    return ExpertTensors(src.fmt, ts, src.intermediate, src.act_fn, src.act_dtype)


def build_host_store(num_layers: int, num_experts: int, hidden: int, intermediate: int, fmt: ExpertFormat,
                     device: torch.device, act_dtype: torch.dtype, pinned: bool, seed: int = 0,
                     act_fn: Callable = F.silu,
                     weights: Optional[Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]] = None,
                     source: str = "synthetic") -> HostStore:
    """Pack every expert on ``device`` (int4 packing is device specific) and keep it in host memory.

    ``weights(layer, expert)`` gives a checkpoint's (gate_up, down); without it the weights are random
    (latency depends on shapes, not values): ``SYNTHETIC_DISTINCT`` random experts are packed and every
    (layer, expert) gets its own host copy of one of them. All host copies live in one :class:`HostSlab`.
    """
    count = num_layers * num_experts
    distinct: list[ExpertTensors] = []

    def packed(layer: int, e: int) -> ExpertTensors:
        if weights is not None:
            gate_up, down = weights(layer, e)
            return pack_expert(gate_up.to(device), down.to(device), fmt, act_dtype, act_fn)
        i = (layer * num_experts + e) % SYNTHETIC_DISTINCT
        while len(distinct) <= i:
            gate_up, down = _random_expert(hidden, intermediate, device, seed * 1000 + len(distinct))
            distinct.append(pack_expert(gate_up, down, fmt, act_dtype, act_fn))
            del gate_up, down
        return distinct[i]

    first = packed(0, 0)
    slab = HostSlab(HostSlab.size_for(list(first.tensors), count), pinned and device.type == "cuda")
    experts: dict[int, ExpertTensors] = {0: _into_slab(slab, first)}
    for layer in range(num_layers):
        for e in range(num_experts):
            key = layer * num_experts + e
            if key:
                experts[key] = _into_slab(slab, packed(layer, e))
    distinct.clear()  # the packed originals (on the device when packing there) are not needed any more
    del first
    store = HostStore(experts, pinned, num_experts, source)
    store.slab = slab
    return store


def copy_expert(dst: ExpertTensors, src: ExpertTensors, pinned: bool, bounce: Optional[torch.Tensor] = None) -> int:
    """Copy one expert's tensors; returns the bytes moved. Asynchronous on CUDA from pinned memory."""
    moved = 0
    cuda = dst.device.type == "cuda" or src.device.type == "cuda"
    for d, s in zip(dst.tensors, src.tensors):
        n = s.numel() * s.element_size()
        if not cuda and not pinned and bounce is not None:
            _bounce_copy(d, s, bounce)
        else:
            d.copy_(s, non_blocking=cuda and pinned)
        moved += n
    return moved


def _bounce_copy(dst: torch.Tensor, src: torch.Tensor, bounce: torch.Tensor) -> None:
    d = dst.view(torch.uint8).reshape(-1)
    s = src.view(torch.uint8).reshape(-1)
    n = s.numel()
    step = bounce.numel()
    for off in range(0, n, step):
        m = min(step, n - off)
        bounce[:m].copy_(s[off:off + m])
        d[off:off + m].copy_(bounce[:m])


def new_bounce() -> torch.Tensor:
    return torch.empty(BOUNCE_BYTES, dtype=torch.uint8)


@dataclass(eq=False)
class DeviceBuffer:
    index: int
    expert: ExpertTensors
    key: int = -1  # the expert it holds (or is being loaded with); -1 when none
    last_use: Marker = None  # the last compute that reads it (a copy into it waits for this)
    job: Optional[Job] = None  # the copy that fills it, while that copy may not have started


class BufferPool:
    """The device's expert buffers: cache slots + staging + prefetch buffers, allocated once."""

    def __init__(self, template: ExpertTensors, count: int, device: torch.device):
        if count < 0:
            raise ValueError(f"BufferPool: {count} buffers")
        self.device = device
        self.template = template
        self.buffers = [DeviceBuffer(i, template.empty_like(device)) for i in range(count)]
        self.planned = count
        self.owner: dict[int, DeviceBuffer] = {}
        self.free: deque[DeviceBuffer] = deque()
        self.reset()

    @property
    def count(self) -> int:
        return len(self.buffers)

    @property
    def extra(self) -> int:
        """Buffers added beyond the memory plan (see :meth:`take`)."""
        return len(self.buffers) - self.planned

    @property
    def total_bytes(self) -> int:
        return sum(b.expert.nbytes for b in self.buffers)

    def reset(self) -> None:
        del self.buffers[self.planned:]  # extra buffers of an earlier run are given back
        self.owner.clear()
        self.free = deque(self.buffers)
        done = Marker.done()
        for b in self.buffers:
            b.key = -1
            b.last_use = done
            b.job = None

    def take(self, release_next: Callable[[], bool], grow: bool = False) -> DeviceBuffer:
        """A free buffer (oldest released first); ``release_next()`` frees one more when none is free.

        ``grow``: when nothing can be freed, allocate one more buffer instead of failing. The simulator
        loads a bypassed miss "into a staging buffer" even for presets whose memory plan has none; the
        engine needs real memory for it, and the extra buffers show in the measured memory.
        """
        while not self.free:
            if not release_next():
                if grow:
                    buf = DeviceBuffer(len(self.buffers), self.template.empty_like(self.device))
                    self.buffers.append(buf)
                    buf.last_use = Marker.done()
                    return buf
                raise RuntimeError(f"engine: no free device buffer among {self.count} (owners "
                                   f"{sorted(self.owner)[:8]}...): the memory plan and the policy disagree")
        return self.free.popleft()

    def bind(self, key: int, buf: DeviceBuffer) -> None:
        buf.key = key
        self.owner[key] = buf

    def release(self, buf: DeviceBuffer) -> None:
        if buf.key >= 0 and self.owner.get(buf.key) is buf:
            del self.owner[buf.key]
        buf.key = -1
        self.free.append(buf)

    def release_key(self, key: int) -> Optional[DeviceBuffer]:
        buf = self.owner.get(key)
        if buf is not None:
            self.release(buf)
        return buf

    def resident(self) -> Iterable[int]:
        return self.owner.keys()
