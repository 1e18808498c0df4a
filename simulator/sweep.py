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

import csv
import hashlib
import io
import itertools
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
        d = asdict(self)
        d["trace_sha256"] = _content(trace_sha256, self.trace)
        d["profile_sha256"] = _content(profile_sha256, self.profile)
        d["simulator"] = simulator_version()
        return json.dumps(d, sort_keys=True, default=str)


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


def run_point(point: SweepPoint) -> dict:
    """Simulate one point; a user error becomes a row that says why (the sweep goes on)."""
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
    row["point_key"] = point.key()
    return row


def _warm_units(points: Sequence[SweepPoint]) -> tuple[list[SweepPoint], list[SweepPoint]]:
    """One point per piece of set-up the grid shares: (the learned predictor of each (trace, batch, preset)
    that prefetches with it, the costliest; each compiled workload the fits do not cover, longest trace first)."""
    from moesim.simulator.compose import policy_spec

    predictive, plain, covered = [], [], set()
    for p in points:
        try:
            policy = policy_spec(p.policy)
        except MoesimError:
            continue  # reported by the point itself
        workload = (p.trace, p.batch, policy.gating, policy.prefetch.guess)
        if policy.prefetch.policy == "predictive":
            if (workload, p.policy) not in covered:
                covered.update({(workload, p.policy), workload})
                predictive.append(p)
        else:
            plain.append((workload, p))
    compiles = []
    for workload, p in plain:
        if workload not in covered:  # a predictive unit compiles the same workload
            covered.add(workload)
            compiles.append(p)
    # the longest traces first, so that a pool does not end on a long compile with its other workers idle
    return predictive, sorted(compiles, key=lambda p: -_trace_bytes(p.trace))


def _trace_bytes(spec: str) -> int:
    from moesim.traces import resolve_trace

    try:
        return Path(resolve_trace(spec)).stat().st_size
    except (MoesimError, OSError):
        return 0


def _warm_unit(p: SweepPoint) -> None:
    """Load and compile what the points like ``p`` share (kept in this process's memos and on disk)."""
    from moesim.simulator.run import prefetch_predictions, prepare
    from moesim.simulator.session import ReplaySession, load_profile_cached, load_trace_cached
    from moesim.traces import resolve_trace

    try:
        trace = load_trace_cached(resolve_trace(p.trace))
        profile = load_profile_cached(p.profile)
        config = point_config(p)
        ReplaySession.of(trace, profile).workload(p.batch, config.policy)
        if config.policy.prefetch.policy == "predictive":
            prefetch_predictions(prepare(trace, profile, config), config.policy.prefetch.train)
    except MoesimError:
        pass  # reported by the point itself


def _warm(points: Sequence[SweepPoint]) -> None:
    """Prepare, in this process, what every point would otherwise redo (kept in memos and on disk)."""
    fits, compiles = _warm_units(points)
    for p in fits + compiles:
        _warm_unit(p)


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
    keys = [p.key() for p in points]
    todo = [p for p, k in zip(points, keys) if k not in done]
    if log is not None:
        log(f"{len(points) - len(todo)} of {len(points)} configurations reused from earlier runs with the same "
            f"trace, profile and simulator; {len(todo)} to simulate")
    if todo:
        if executor == "ray":
            from moesim.simulator.sweep_ray import ray_rows

            rows, stop = ray_rows(todo, jobs, address)
        else:
            rows, stop = _local_rows(todo, jobs)
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


def _local_rows(todo: Sequence[SweepPoint], jobs: int) -> tuple[Iterable[dict], Callable[[], None]]:
    """The rows of ``todo`` from ``jobs`` processes of this machine, as they finish, and how to stop them.

    With several workers the shared set-up comes first, in parallel (issue #14): a pool fits the learned
    predictors and compiles the workloads into the on-disk cache, while this process imports the compiled replay
    (numba and its registries, most of a second) and takes the smallest compile and its point, which loads the
    replay (or, on an install whose numba cache is cold, compiles it once, here, rather than once per worker).
    The point workers are forked after that and inherit all of it, the set-up loaded back from the disk cache."""
    jobs = jobs or (os.cpu_count() or 1)
    jobs = max(1, min(jobs, len(todo)))
    if jobs == 1:
        _warm(todo)
        return map(run_point, todo), lambda: None
    # workers are forked before any progress-bar thread exists
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    fits, compiles = _warm_units(todo)
    own, pooled = compiles[-1:], fits + compiles[:-1]
    warm_pool = context.Pool(min(jobs, len(pooled)), initializer=_quiet_worker) if pooled else None
    first_rows: list[dict] = []
    try:
        pending = warm_pool.map_async(_warm_unit, pooled, chunksize=1) if warm_pool is not None else None
        from moesim.simulator.kernel import preload

        preload()
        for p in own:
            _warm_unit(p)
            first_rows.append(run_point(p))
        if pending is not None:
            pending.get()
    finally:
        if warm_pool is not None:
            warm_pool.terminate()
            warm_pool.join()
    _warm(todo)  # loads what the pool put in the disk cache, for the point workers to inherit
    rest = [p for p in todo if p not in own]
    if not rest:
        return iter(first_rows), lambda: None
    pool = context.Pool(min(jobs, len(rest)), initializer=_quiet_worker)

    def stop() -> None:
        pool.terminate()
        pool.join()

    chunk = max(1, len(rest) // (16 * jobs))  # sixteen chunks per worker: fewer round trips, balanced ends
    return itertools.chain(first_rows, pool.imap_unordered(run_point, rest, chunksize=chunk)), stop


def _quiet_worker() -> None:
    """Workers leave Ctrl-C to the parent, which terminates them, and die with it if it is killed (instead of
    printing a BrokenPipe traceback when they find it gone)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()


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
    for p in points:
        h.update(p.key().encode())
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
