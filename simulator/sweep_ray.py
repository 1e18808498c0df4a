"""The sweep's Ray executor (``moesim sweep --executor ray [--address ADDR]``), an optional extra:
``pip install -e ".[ray]"``.

Only the simulation of each point runs on Ray; its row comes back to the calling process, which writes the
results store's journal exactly as the local executor does. So the tables are byte-identical to a local
run, and a sweep interrupted on a laptop resumes on a cluster (or back) from the same ``--out`` folder.

On a cluster every node needs moesim installed and the traces and profiles at the same paths (bundled ones
always are). A worker process keeps its memos between tasks, and the shared set-up (predictor fits,
compiled workloads) is run as tasks first so that it lands in each node's on-disk cache before the points.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Iterator, Optional, Sequence

from moesim.errors import MoesimError


def _import_ray():
    try:
        import ray
    except ImportError:
        raise MoesimError('--executor ray: ray is not installed (pip install -e ".[ray]")') from None
    return ray


def ray_rows(todo: Sequence, jobs: int, address: Optional[str]) -> tuple[Iterable[dict], Callable[[], None]]:
    """The rows of ``todo`` from Ray tasks, in the order they finish, and how to stop (cancel) the rest.

    Connects to ``address`` (``auto``: the cluster this machine belongs to); without one, uses the Ray
    instance this process already started, else starts a local one of ``jobs`` CPUs (0: every core)."""
    from moesim.simulator.sweep import _run_setup_unit, _setup_units, run_point

    ray = _import_ray()
    started = False
    if not ray.is_initialized():
        try:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=jobs or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise MoesimError(f"--executor ray: cannot start or reach Ray{f' at {address}' if address else ''} "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        started = True
    warm = ray.remote(num_cpus=1)(_run_setup_unit)
    point = ray.remote(num_cpus=1, max_retries=2)(run_point)
    pending: list = []

    def rows() -> Iterator[dict]:
        ray.get([warm.remote(u) for u in _setup_units(todo)[0]])
        pending.extend(point.remote(p) for p in todo)
        while pending:
            ready, rest = ray.wait(pending, num_returns=1)
            pending[:] = rest
            yield ray.get(ready[0])

    def stop() -> None:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()

    return rows(), stop
