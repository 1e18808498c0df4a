"""Grid sweeps: every combination of policies, traces, profiles, cache sizes, expert formats and batch
sizes, run in parallel over cores, resumable, written as Parquet and CSV with a latency-vs-memory plot.

The output folder is a results store that only grows:

- ``store/rows-<writer>.jsonl``: every finished configuration, appended as it arrives, one journal per
  writer process (so concurrent sweeps into one folder never write the same file). A configuration's key
  holds the SHA-256 of the trace and profile *contents* and the simulator's version, so a rerun reuses a
  row only when nothing it depends on changed; a recalibrated profile or a replaced trace is recomputed.
- ``runs/<grid>/``: each grid's own ``grid.json`` (its command and size) and tables, kept when a later run
  sweeps another grid into the same folder (``moesim sweep --list`` / ``--all``).
- ``sweep.{parquet,csv,png}``: the latest run's grid.

Tables are sorted in grid order, so they are byte-identical however the work was split or interrupted.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import secrets
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from moesim.atomic import atomic_path, write_text_atomic
from moesim.content import simulator_version
from moesim.simulator.identity import profile_sha256, trace_sha256
from moesim.errors import MoesimError
from moesim.quant import WeightFormat
from moesim.simulator.results import ROW_COLUMNS

STORE = "store"
RUNS = "runs"
GRID = "grid.json"
PARQUET = "sweep.parquet"
CSV = "sweep.csv"
PLOT = "sweep.png"


@dataclass(frozen=True)
class SweepPoint:
    """One configuration of the grid (plain data: it crosses process boundaries)."""

    trace: str  # bundled name or path
    profile: str
    policy: str
    cache_experts: Optional[int]
    gpu_mem_bytes: Optional[int]
    expert_bits: Optional[str]
    non_expert_bits: Optional[str]
    batch: int

    def key(self) -> str:
        """The point's settings plus the content hashes of what its result depends on."""
        return self.key_with(_content(trace_sha256, self.trace), _content(profile_sha256, self.profile))

    def key_with(self, trace_hash: str, profile_hash: str) -> str:
        """:meth:`key` from its trace's and profile's hashes, already computed."""
        d = asdict(self)
        d["trace_sha256"], d["profile_sha256"] = trace_hash, profile_hash
        d["simulator"] = simulator_version()
        return json.dumps(d, sort_keys=True, default=str)


def point_keys(points: Sequence[SweepPoint]) -> list[str]:
    """Each point's :meth:`SweepPoint.key`, each trace and profile hashed once: resolving a name and checking
    its file for each of a grid's points cost a millisecond a point, before any ran."""
    hashes: dict[tuple, str] = {}

    def content(digest: Callable[[str], str], spec: str) -> str:
        if (digest, spec) not in hashes:
            hashes[digest, spec] = _content(digest, spec)
        return hashes[digest, spec]

    return [p.key_with(content(trace_sha256, p.trace), content(profile_sha256, p.profile)) for p in points]


def _content(digest: Callable[[str], str], spec: str) -> str:
    try:
        return digest(spec)
    except MoesimError:
        return "unreadable"  # the point itself reports why; a later readable file gets its own key


def build_grid(traces: Sequence[str], profiles: Sequence[str], policies: Sequence[str],
               cache_experts: Sequence[Optional[int]], gpu_mems: Sequence[Optional[int]],
               expert_bits: Sequence[Optional[str]], non_expert_bits: Optional[str], batches: Sequence[int]
               ) -> list[SweepPoint]:
    """Every combination, in grid order. A policy is named canonically (sorted parts), so a rerun that spells a
    composed policy another way resumes the same configurations."""
    from moesim.simulator.compose import policy_names

    policies = policy_names(policies)
    sizes: list[tuple[Optional[int], Optional[int]]]
    if gpu_mems and any(m is not None for m in gpu_mems):
        sizes = [(None, m) for m in gpu_mems]
    else:
        sizes = [(c, None) for c in (cache_experts or [None])]
    points = []
    for trace in traces:
        for profile in profiles:
            for policy in policies:
                for c, m in sizes:
                    for bits in expert_bits or [None]:
                        for batch in batches:
                            points.append(SweepPoint(trace, profile, policy, c, m, bits, non_expert_bits, batch))
    return points


def point_config(point: SweepPoint):
    from moesim.simulator.compose import policy_spec
    from moesim.simulator.config import SimConfig

    return SimConfig(
        policy=policy_spec(point.policy), cache_experts=point.cache_experts, gpu_mem_bytes=point.gpu_mem_bytes,
        expert_format=WeightFormat.parse(point.expert_bits) if point.expert_bits else None,
        non_expert_format=WeightFormat.parse(point.non_expert_bits) if point.non_expert_bits else None,
        batch=point.batch,
    )


def trace_label(spec: str) -> str:
    from moesim.traces import bundled_traces

    return spec if spec in bundled_traces() else Path(spec).stem


def run_point(point: SweepPoint, key: Optional[str] = None) -> dict:
    """Simulate one point; a user error becomes a row that says why (the sweep goes on). ``key``: the point's
    key if the caller has it already."""
    from moesim.simulator.run import simulate

    try:
        result = simulate(point.trace, point.profile, point_config(point), trace_name=trace_label(point.trace),
                          profile_name=point.profile)
        row = result.to_row()
    except MoesimError as exc:
        row = {c: None for c in ROW_COLUMNS}
        row.update(trace=trace_label(point.trace), profile=point.profile, policy=point.policy,
                   cache_experts=-1 if point.cache_experts is None else point.cache_experts,
                   batch=point.batch, feasible=False, reason=f"error: {exc.message}")
    row["point_key"] = point.key() if key is None else key
    return row


@dataclass(frozen=True)
class _SetupUnit:
    """A piece of set-up that several points share, done once ahead of them: the compiled workload of
    (trace, batch, gating, guess) (``fit`` False), or the learned predictor of a (workload, preset) (True)."""

    point: SweepPoint  # a point that needs it
    fit: bool

    def run(self) -> None:
        """Do it in this process (kept in this process's memos and in the on-disk cache)."""
        from moesim.simulator.run import prefetch_predictions, prepare
        from moesim.simulator.session import ReplaySession, load_profile_cached, load_trace_cached
        from moesim.traces import resolve_trace

        p = self.point
        try:
            trace = load_trace_cached(resolve_trace(p.trace))
            profile = load_profile_cached(p.profile)
            config = point_config(p)
            if self.fit:
                prefetch_predictions(prepare(trace, profile, config), config.policy.prefetch.train)
            else:
                ReplaySession.of(trace, profile).workload(p.batch, config.policy)
        except MoesimError:
            pass  # reported by the point itself


def _run_setup_unit(unit: _SetupUnit) -> None:
    unit.run()


def _setup_units(points: Sequence[SweepPoint]) -> tuple[list[_SetupUnit], list[list[int]]]:
    """The set-up ``points`` share, and for each point the indices of the units it waits for.

    Workload compiles come first, the longest traces first (each lets many points start; a pool should not end
    on a long compile with its other workers idle), then the predictor fits, the costliest, which only the
    ``predictive`` points wait for."""
    from moesim.simulator.compose import policy_spec

    compiles: dict[tuple, SweepPoint] = {}
    fits: dict[tuple, SweepPoint] = {}
    keys: list[tuple[Optional[tuple], Optional[tuple]]] = []
    for p in points:
        try:
            policy = policy_spec(p.policy)
        except MoesimError:
            keys.append((None, None))  # reported by the point itself
            continue
        workload = (p.trace, p.batch, policy.gating, policy.prefetch.guess)
        compiles.setdefault(workload, p)
        fit = (workload, p.policy) if policy.prefetch.policy == "predictive" else None
        if fit is not None:
            fits.setdefault(fit, p)
        keys.append((workload, fit))
    order = sorted(compiles, key=lambda w: -_trace_bytes(compiles[w].trace))
    units = [_SetupUnit(compiles[w], fit=False) for w in order] + [_SetupUnit(p, fit=True) for p in fits.values()]
    index = {w: i for i, w in enumerate(order)}
    index.update({f: len(order) + i for i, f in enumerate(fits)})
    needs = [[index[k] for k in pair if k is not None] for pair in keys]
    return units, needs


def _trace_bytes(spec: str) -> int:
    from moesim.traces import resolve_trace

    try:
        return Path(resolve_trace(spec)).stat().st_size
    except (MoesimError, OSError):
        return 0


def _read_journal(path: Path) -> dict[str, dict]:
    done: dict[str, dict] = {}
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        return done
    with f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by an interruption
            if isinstance(row, dict) and "point_key" in row:
                done[row["point_key"]] = row
    return done


def read_store(out_dir: Path) -> dict[str, dict]:
    """Every row any writer has finished in ``out_dir``, by point key (journals read in name order)."""
    done: dict[str, dict] = {}
    for journal in sorted((Path(out_dir) / STORE).glob("rows-*.jsonl")):
        done.update(_read_journal(journal))
    return done


def check_writable(out_dir: Path) -> Path:
    """Create ``out_dir`` and prove a file can be written there, before any long work (one-line error)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MoesimError(f"--out {out_dir}: is a file, expected a folder")
    try:
        (out_dir / STORE).mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=out_dir / STORE)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise MoesimError(f"--out {out_dir}: cannot write there ({exc.strerror or exc})") from None
    return out_dir


class _Journal:
    """This process's own append-only journal in the store (created on the first row)."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / STORE / f"rows-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
        self.file = None

    def append(self, row: dict) -> None:
        try:
            if self.file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.file = open(self.path, "a", encoding="utf-8")
            self.file.write(json.dumps(row, sort_keys=True) + "\n")
            self.file.flush()
        except OSError as exc:
            raise MoesimError(f"{self.path}: cannot record a finished configuration ({exc.strerror or exc})") from None

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass  # every row was flushed as it came; nothing is lost here


EXECUTORS = ("local", "ray")


def run_sweep(points: Sequence[SweepPoint], out_dir: Path, jobs: int = 0, progress: bool = True,
              on_row: Optional[Callable[[dict], None]] = None,
              log: Optional[Callable[[str], None]] = None, executor: str = "local",
              address: Optional[str] = None, label: str = "sweep") -> list[dict]:
    """Rows for ``points`` in grid order: stored ones whose inputs are unchanged are reused, the rest run.

    ``executor`` "local" runs them on ``jobs`` processes of this machine (0: one per core); "ray" on a Ray
    cluster (``address``; none: a local Ray instance of ``jobs`` CPUs). Either way the rows arrive here and go
    into the same journal, so a sweep can be stopped on one executor and resumed on the other.
    """
    if executor not in EXECUTORS:
        raise MoesimError(f"--executor {executor}: expected one of {', '.join(EXECUTORS)}")
    if address is not None and executor != "ray":
        raise MoesimError("--address is the Ray cluster to run on: it needs --executor ray")
    out_dir = check_writable(out_dir)
    done = read_store(out_dir)
    keys = point_keys(points)
    todo = [p for p, k in zip(points, keys) if k not in done]
    todo_keys = [k for k in keys if k not in done]
    if log is not None:
        log(f"{len(points) - len(todo)} of {len(points)} configurations reused from earlier runs with the same "
            f"trace, profile and simulator; {len(todo)} to simulate")
    if todo:
        if executor == "ray":
            from moesim.simulator.sweep_ray import ray_rows

            rows, stop = ray_rows(todo, jobs, address)
        else:
            rows, stop = _local_rows(todo, jobs, todo_keys)
        bar = None
        if progress:
            from moesim.progress import Progress

            bar = Progress(len(points), label, "cfg", initial=len(points) - len(todo))
        journal = _Journal(out_dir)
        term = _TermAsInterrupt().__enter__()
        try:
            for row in rows:
                done[row["point_key"]] = row
                journal.append(row)
                if bar is not None:
                    bar.update(1)
                if on_row is not None:
                    on_row(row)
        finally:
            journal.close()
            if bar is not None:
                bar.close()
            stop()
            term.__exit__(None, None, None)
    return [done[k] for k in keys if k in done]


def _local_rows(todo: Sequence[SweepPoint], jobs: int,
                keys: Sequence[str]) -> tuple[Iterable[dict], Callable[[], None]]:
    """The rows of ``todo`` (whose keys are ``keys``) from ``jobs`` processes of this machine, as they finish,
    and how to stop them.

    With several workers nothing waits for the whole set-up (issue #14). Set-up processes, forked first, compile
    the shared workloads and fit the learned predictors into the on-disk cache and say when each is done. This
    process meanwhile imports the compiled replay (numba and its registries, most of a second), takes the
    smallest compile and one of its points, which loads the replay (or, on an install whose numba cache is cold,
    compiles it once, here, rather than once per worker), and then forks the point workers, which inherit all
    of it. A point goes to them as soon as the set-up it needs is done: most points run while the predictors,
    which only the ``predictive`` points need, are still being fitted."""
    jobs = jobs or (os.cpu_count() or 1)
    jobs = max(1, min(jobs, len(todo)))
    units, needs = _setup_units(todo)
    if jobs == 1:
        for unit in units:
            unit.run()
        return map(run_point, todo, keys), lambda: None
    # forked before any thread exists in this process (the pool's and the progress bar's come later)
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    own = next((i for i in reversed(range(len(units))) if not units[i].fit and [i] in needs), None)
    own_at = needs.index([own]) if own is not None else None
    shared = [i for i in range(len(units)) if i != own]
    setups: dict = {}  # receiving end of each set-up process's pipe -> (process, its unit indices)
    n_setup = min(max(1, jobs - 1), len(shared))
    with _frozen_heap():
        for s in range(n_setup):
            mine = shared[s::n_setup]
            receive, send = context.Pipe(duplex=False)
            proc = context.Process(target=_setup_worker, args=([units[i] for i in mine], mine, send), daemon=True)
            proc.start()
            send.close()
            setups[receive] = (proc, mine)
    first_rows: list[dict] = []
    done_units: set[int] = set()
    try:
        from moesim.simulator.kernel import preload

        preload()
        if own is not None:
            units[own].run()
            done_units.add(own)
            first_rows.append(run_point(todo[own_at], keys[own_at]))
        _collect_done(setups, done_units)
        for i in sorted(done_units - {own}):
            units[i].run()  # loaded back from the disk cache, for every point worker to inherit
        with _frozen_heap():
            pool = context.Pool(jobs, initializer=_quiet_worker)
    except BaseException:
        _stop_setups(setups)
        raise

    def stop() -> None:
        pool.terminate()
        pool.join()
        _stop_setups(setups)

    rest = [(p, k, need) for i, (p, k, need) in enumerate(zip(todo, keys, needs)) if i != own_at]
    return _dispatch(pool, jobs, first_rows, _chunks(rest, jobs), done_units, setups), stop


@contextlib.contextmanager
def _frozen_heap():
    """Fork with this process's objects in the collector's permanent generation: a child's collections then
    never walk them, and so never write to (and copy) the pages it shares with this process. Without it each
    point worker walked the inherited heap (numba's, the workloads') and a 200-point sweep on two workers took
    0.9 CPU s more (median 7.3 vs 6.4 s, wall 3.4 vs 3.0 s).

    The children are also forked ignoring Ctrl-C: a terminal's SIGINT reaches the whole process group, and one
    that came before a child's own set-up (``_quiet_worker``) ran printed "Process ForkPoolWorker-N:" from the
    child (seen on a loaded machine). This process keeps its own handler and stops the children itself."""
    import gc
    import signal
    import threading

    # None: not the main thread, or a handler not set from Python (which signal.signal could not put back)
    old = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if old is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        if old is not None:
            signal.signal(signal.SIGINT, old)


def _chunks(points: Sequence[tuple[SweepPoint, str, list[int]]],
            jobs: int) -> list[tuple[list[tuple[SweepPoint, str]], set[int]]]:
    """The (point, key, needs) in chunks of (point, key) for the workers, each with the set-up units it waits for.

    A chunk keeps the points of one (trace, batch, policy) together, up to a sixteenth of a worker's share
    (fewer round trips, balanced ends): what a policy derives from a trace on its first run (stack distances,
    next uses, guess unions; a few tenths of a second per trace) is then derived by one worker, not by each."""
    most = max(1, len(points) // (16 * jobs))
    groups: dict[tuple, list] = {}
    for p, k, need in points:
        groups.setdefault((p.trace, p.batch, p.policy), []).append((p, k, need))
    out = []
    for members in groups.values():
        for i in range(0, len(members), most):
            part = members[i:i + most]
            out.append(([(p, k) for p, k, _ in part], set().union(*(set(n) for _, _, n in part))))
    return out


def _dispatch(pool, jobs: int, first_rows: list[dict], chunks: list[tuple[list[tuple[SweepPoint, str]], set[int]]],
              done_units: set[int], setups: dict) -> Iterable[dict]:
    """Rows as they finish: each chunk is sent to ``pool`` once the set-up units it needs are done."""
    import queue
    from multiprocessing.connection import wait

    yield from first_rows
    results: queue.SimpleQueue = queue.SimpleQueue()
    waiting, outstanding = list(chunks), 0
    while waiting or outstanding:
        _collect_done(setups, done_units)
        # a live set-up process holds a core: no more chunks in flight than the cores left (more would make
        # every process slower, the set-up included, for no gain)
        room = max(1, jobs - len(setups)) - outstanding if setups else len(waiting)
        # with no set-up process left, nothing more will be set up here: every point sets itself up
        ready = [i for i, (_, need) in enumerate(waiting) if not setups or need <= done_units][: max(room, 0)]
        for i in ready:
            pool.apply_async(_run_points, (waiting[i][0],), callback=results.put, error_callback=results.put)
        outstanding += len(ready)
        taken = set(ready)
        waiting = [c for i, c in enumerate(waiting) if i not in taken]
        if not outstanding:
            wait(list(setups))  # nothing running: the next chunk waits for a set-up unit
            continue
        try:
            got = results.get(timeout=0.02 if setups else None)
        except queue.Empty:
            continue
        outstanding -= 1
        if isinstance(got, BaseException):
            raise got
        yield from got


def _collect_done(setups: dict, done_units: set[int]) -> None:
    """Add to ``done_units`` what the set-up processes finished since last asked (without waiting)."""
    from multiprocessing.connection import wait

    for conn in wait(list(setups), timeout=0) if setups else ():
        try:
            while conn.poll():
                done_units.add(conn.recv())
        except EOFError:  # its units are all done, or it died and the points set themselves up
            proc, mine = setups.pop(conn)
            proc.join()
            done_units.update(mine)


def _run_points(points: Sequence[tuple[SweepPoint, str]]) -> list[dict]:
    return [run_point(p, k) for p, k in points]


def _setup_worker(units: Sequence[_SetupUnit], indices: Sequence[int], done) -> None:
    """Run ``units`` in order, sending each one's index down ``done`` when it is in the on-disk cache."""
    _quiet_worker()
    for unit, i in zip(units, indices):
        unit.run()
        done.send(i)
    done.close()


def _stop_setups(setups: dict) -> None:
    for proc, _ in setups.values():
        proc.terminate()
    for proc, _ in setups.values():
        proc.join()


def _quiet_worker() -> None:
    """Workers leave Ctrl-C to the parent, which terminates them, and die with it if it is killed (instead of
    printing a BrokenPipe traceback when they find it gone)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()
    _one_thread_each()


def _one_thread_each() -> None:
    """A worker owns one core: numpy's BLAS and OpenMP pools keep to it. (The set-up's fits and predictions
    otherwise ran two BLAS threads beside a point worker on two cores, and its points ran ~23% slower.)"""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)


def _die_with_parent() -> None:
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _TermAsInterrupt:
    """While the pool runs, SIGTERM stops the sweep like Ctrl-C: the pool is terminated and finished rows kept."""

    def __enter__(self):
        import signal
        import threading

        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        import signal

        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)
        return False


COLUMNS = ROW_COLUMNS + ("point_key",)


def write_tables(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    cols = {c: [r.get(c) for r in rows] for c in COLUMNS}
    table = pa.table({c: pa.array(v, type=_arrow_type(c, v)) for c, v in cols.items()})
    with atomic_path(out_dir / PARQUET) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([c for c in COLUMNS if c != "point_key"])
    for r in rows:
        w.writerow([_csv_value(r.get(c)) for c in COLUMNS if c != "point_key"])
    write_text_atomic(out_dir / CSV, buf.getvalue())
    return out_dir / PARQUET, out_dir / CSV


def _arrow_type(column: str, values: list):
    import pyarrow as pa

    sample = next((v for v in values if v is not None), None)
    if isinstance(sample, bool):
        return pa.bool_()
    if isinstance(sample, int):
        return pa.int64()
    if isinstance(sample, float):
        return pa.float64()
    return pa.string()


def _csv_value(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return str(v)


def grid_id(points: Sequence[SweepPoint]) -> str:
    """A grid's name: the hash of its points' keys in order (the same grid on the same inputs, the same id)."""
    h = hashlib.sha256()
    for k in point_keys(points):
        h.update(k.encode())
        h.update(b"\n")
    return h.hexdigest()[:12]


@dataclass(frozen=True)
class GridRecord:
    """One grid swept into a folder: what ran, when, and where its tables are."""

    grid: str
    created: str  # UTC, ISO 8601
    points: int
    command: str
    finished: bool

    @property
    def folder(self) -> str:
        return f"{RUNS}/{self.grid}"


def start_grid(points: Sequence[SweepPoint], out_dir: Path, command: str) -> GridRecord:
    """Record a grid before it runs (so an interrupted one is still listed)."""
    import datetime

    gid = grid_id(points)
    path = Path(out_dir) / RUNS / gid / GRID
    old = _read_grid(path)
    record = GridRecord(gid, old.created if old else
                        datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                        len(points), command, bool(old and old.finished))
    write_text_atomic(path, json.dumps(asdict(record), indent=1, sort_keys=True) + "\n")
    return record


def finish_grid(record: GridRecord, rows: list[dict], out_dir: Path) -> GridRecord:
    """Write the grid's own tables under ``runs/<grid>/`` and mark it finished."""
    folder = Path(out_dir) / record.folder
    write_tables(rows, folder)
    done = GridRecord(**{**asdict(record), "finished": True})
    write_text_atomic(folder / GRID, json.dumps(asdict(done), indent=1, sort_keys=True) + "\n")
    return done


def _read_grid(path: Path) -> Optional[GridRecord]:
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        return GridRecord(**{f: d[f] for f in ("grid", "created", "points", "command", "finished")})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_grids(out_dir: Path) -> list[GridRecord]:
    """Every grid recorded in ``out_dir``, oldest first."""
    records = [r for r in (_read_grid(p) for p in (Path(out_dir) / RUNS).glob(f"*/{GRID}")) if r is not None]
    return sorted(records, key=lambda r: (r.created, r.grid))


def grid_rows(record: GridRecord, out_dir: Path) -> list[dict]:
    """A grid's rows, from its own tables (none until it finishes)."""
    import pyarrow.parquet as pq

    path = Path(out_dir) / record.folder / PARQUET
    try:
        return pq.read_table(path).to_pylist()
    except Exception:
        return []


def format_grid_list(records: list[GridRecord], out_dir: Path) -> str:
    if not records:
        return f"no sweeps recorded in {out_dir}"
    lines = [f"{'grid':<12}  {'created':<27}  {'points':>6}  {'state':<11}  command"]
    for r in records:
        lines.append(f"{r.grid:<12}  {r.created:<27}  {r.points:>6}  {'finished' if r.finished else 'interrupted':<11}"
                     f"  {r.command}")
    return "\n".join(lines)


# ---- the readable table and the plot --------------------------------------------------------------
TABLE_COLUMNS = (  # title, row column, format, alignment
    ("policy", "policy", "{}", "l"),
    ("cache", "cache_experts", "{}", "r"),
    ("bits", "expert_format", "{}", "l"),
    ("batch", "batch", "{}", "r"),
    ("peak_gpu_mib", "peak_gpu_mib", "{:.0f}", "r"),
    ("ttft_ms", "ttft_mean_s", "ms", "r"),  # one unit per quantity: times in ms, memory in MiB
    ("tpot_ms", "tpot_mean_s", "ms", "r"),
    ("tok/s", "tokens_per_s", "{:.1f}", "r"),
    ("hit_rate", "hit_rate", "{:.3f}", "r"),
    ("h2d_mib", "h2d_mib", "{:.0f}", "r"),
    ("stall_ms", "stall_s", "ms", "r"),
)
ALWAYS_SHOWN = ("policy", "cache_experts", "expert_format", "batch", "peak_gpu_mib")


def _cell(r: dict, col: str, fmt: str) -> str:
    v = r.get(col)
    if col == "cache_experts":
        return "auto" if v in (None, -1) else str(v)
    if not r.get("feasible") and col not in ALWAYS_SHOWN:
        return "-"
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if fmt == "ms":
        return f"{v * 1e3:.2f}"
    return fmt.format(v)


def format_table(rows: Iterable[dict]) -> str:
    """A fixed-width table of the headline columns; rows that do not fit say why."""
    rows = list(rows)
    specs = [(c, c, "{}", "l") for c in ("trace", "profile") if len({r.get(c) for r in rows}) > 1]
    specs += list(TABLE_COLUMNS)
    body = [[_cell(r, col, fmt) for _, col, fmt, _ in specs] for r in rows]
    widths = [max([len(title)] + [len(b[i]) for b in body]) for i, (title, _, _, _) in enumerate(specs)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, (_, _, _, a) in zip(cells, widths, specs))

    out = [line([t for t, _, _, _ in specs]).rstrip()]
    for r, cells in zip(rows, body):
        text = line(cells)
        if not r.get("feasible"):
            text += "  " + _short_reason(r.get("reason") or "does not fit")
        out.append(text.rstrip())
    return "\n".join(out)


def _short_reason(reason: str) -> str:
    if reason.startswith("error: "):
        return reason
    return "does not fit: " + reason.split(" (")[0]


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both memory and latency (lower is better), by memory."""
    front = []
    best = math.inf
    for mem, lat in sorted(points):
        if lat < best:
            front.append((mem, lat))
            best = lat
    return front


ORACLE_NOTE = "oracle (knows the future; not realisable)"
MARKERS = "os^Dv<>pP*hX"


def is_oracle(row: dict) -> bool:
    """A configuration that reads the future (Belady eviction, oracle prefetch): a bound, not a policy."""
    return row.get("cache_policy") == "belady" or row.get("prefetch") == "oracle"


@dataclass(frozen=True)
class PlotSeries:
    """One set of plotted points: a policy at one expert format and batch size."""

    policy: str
    expert_format: str
    batch: int
    oracle: bool
    points: tuple[tuple[float, float], ...]  # (peak GPU GiB, TPOT ms)


def plot_series(rows: list[dict]) -> list[PlotSeries]:
    ok = [r for r in rows if r.get("feasible") and r.get("tpot_mean_s") is not None
          and not math.isnan(r["tpot_mean_s"])]
    groups: dict[tuple, list] = {}
    for r in ok:
        key = (r["policy"], str(r.get("expert_format")), int(r.get("batch") or 1), is_oracle(r))
        groups.setdefault(key, []).append((r["peak_gpu_mib"] / 1024, r["tpot_mean_s"] * 1e3))
    return [PlotSeries(p, f, b, o, tuple(pts)) for (p, f, b, o), pts in sorted(groups.items())]


def realisable_front(series: list[PlotSeries]) -> list[tuple[float, float]]:
    """The Pareto front of the policies one could run: oracles are drawn but never on it."""
    return pareto_front([pt for s in series if not s.oracle for pt in s.points])


def write_plot(rows: list[dict], path: Path, title: str = "") -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    series = plot_series(rows)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    policies = sorted({s.policy for s in series})
    formats = sorted({s.expert_format for s in series})
    batches = sorted({s.batch for s in series})
    cmap = plt.get_cmap("tab20")
    color = {p: cmap(i % 20) for i, p in enumerate(policies)}
    marker = {f: MARKERS[i % len(MARKERS)] for i, f in enumerate(formats)}
    size = {b: 22 + 40 * i for i, b in enumerate(batches)}  # a larger batch, a larger marker
    for s in series:
        ax.scatter([p[0] for p in s.points], [p[1] for p in s.points], marker=marker[s.expert_format],
                   s=size[s.batch], zorder=3, linewidths=1.2,
                   facecolors="none" if s.oracle else color[s.policy], edgecolors=color[s.policy])
    front = realisable_front(series)
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", linewidth=1.2, zorder=2)
    oracles = {s.policy for s in series if s.oracle}
    handles = [Line2D([], [], linestyle="", marker="o", color=color[p], label=p + (" (oracle)" if p in oracles else ""),
                      markerfacecolor="none" if p in oracles else color[p]) for p in policies]
    if len(formats) > 1:
        handles += [Line2D([], [], linestyle="", marker=marker[f], color="grey", label=f"experts {f}") for f in formats]
    if len(batches) > 1:
        handles += [Line2D([], [], linestyle="", marker="o", color="grey", markersize=(size[b] ** 0.5),
                           label=f"batch {b}") for b in batches]
    handles.append(Line2D([], [], color="black", label="Pareto front (realisable policies)"))
    if any(s.oracle for s in series):
        handles.append(Line2D([], [], linestyle="", marker="o", markerfacecolor="none", color="grey",
                              label=f"hollow: {ORACLE_NOTE}"))
    ax.set_xlabel("peak GPU memory (GiB)")
    ax.set_ylabel("time per output token, mean (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return Path(path)
