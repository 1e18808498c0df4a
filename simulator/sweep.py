"""Grid sweeps: every combination of policies, traces, profiles, cache sizes, expert formats and batch
sizes, run in parallel over cores, resumable, written as Parquet and CSV with a latency-vs-memory plot.

Resuming: each finished configuration is appended to ``<out>/sweep.journal.jsonl`` as it arrives; a
rerun with the same output folder skips every configuration already in the journal (or in an existing
``sweep.parquet``) and runs only the rest. The final tables are sorted in grid order, so they are
byte-identical however the work was split or interrupted.
"""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing as mp
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from moesim.atomic import atomic_path, write_text_atomic
from moesim.errors import MoesimError
from moesim.quant import WeightFormat
from moesim.simulator.results import ROW_COLUMNS

JOURNAL = "sweep.journal.jsonl"
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
        return json.dumps(asdict(self), sort_keys=True)


def build_grid(traces: Sequence[str], profiles: Sequence[str], policies: Sequence[str],
               cache_experts: Sequence[Optional[int]], gpu_mems: Sequence[Optional[int]],
               expert_bits: Sequence[Optional[str]], non_expert_bits: Optional[str], batches: Sequence[int]
               ) -> list[SweepPoint]:
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
    from moesim.simulator.config import SimConfig
    from moesim.simulator.presets import get_preset

    return SimConfig(
        policy=get_preset(point.policy), cache_experts=point.cache_experts, gpu_mem_bytes=point.gpu_mem_bytes,
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


def _warm(points: Sequence[SweepPoint]) -> None:
    """Load and compile what every worker would otherwise redo (forked workers inherit it)."""
    from moesim.simulator.run import get_workload, load_profile_cached, load_trace_cached
    from moesim.traces import resolve_trace

    seen = set()
    for p in points:
        if (p.trace, p.batch, p.policy) in seen:
            continue
        seen.add((p.trace, p.batch, p.policy))
        try:
            trace = load_trace_cached(resolve_trace(p.trace))
            load_profile_cached(p.profile)
            config = point_config(p)
            get_workload(trace, p.batch, config.policy)
        except MoesimError:
            continue  # reported by the point itself
    if any(p.policy == "predictive" for p in points):
        for p in points:
            if p.policy == "predictive":
                try:
                    from moesim.simulator.run import prepare, _predictions  # noqa: F401
                    trace = load_trace_cached(resolve_trace(p.trace))
                    prep = prepare(trace, load_profile_cached(p.profile), point_config(p))
                    _predictions(prep, ())
                except MoesimError:
                    pass


def _read_journal(path: Path) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by an interruption
            if "point_key" in row:
                done[row["point_key"]] = row
    return done


def _read_parquet_rows(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception:
        return {}
    if "point_key" not in table.column_names:
        return {}
    return {r["point_key"]: r for r in table.to_pylist()}


def run_sweep(points: Sequence[SweepPoint], out_dir: Path, jobs: int = 0, progress: bool = True,
              on_row: Optional[Callable[[dict], None]] = None) -> list[dict]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    journal = out_dir / JOURNAL
    done = _read_parquet_rows(out_dir / PARQUET)
    done.update(_read_journal(journal))
    todo = [p for p in points if p.key() not in done]
    jobs = jobs or (os.cpu_count() or 1)
    jobs = max(1, min(jobs, len(todo))) if todo else 1
    if todo:
        _warm(todo)
        pool = None
        if jobs > 1:
            # workers are forked before any progress-bar thread exists, and inherit the warmed memos
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            pool = mp.get_context(method).Pool(jobs)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(points), initial=len(points) - len(todo), desc="sweep", unit="cfg",
                       dynamic_ncols=True)
        try:
            with open(journal, "a", encoding="utf-8") as jf:
                rows = map(run_point, todo) if pool is None else pool.imap_unordered(run_point, todo, chunksize=1)
                for row in rows:
                    done[row["point_key"]] = row
                    jf.write(json.dumps(row, sort_keys=True) + "\n")
                    jf.flush()
                    if bar is not None:
                        bar.update(1)
                    if on_row is not None:
                        on_row(row)
        finally:
            if bar is not None:
                bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()
    return [done[p.key()] for p in points if p.key() in done]


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


def finish(out_dir: Path) -> None:
    """Remove the journal once the tables hold every row."""
    (Path(out_dir) / JOURNAL).unlink(missing_ok=True)


# ---- the readable table and the plot --------------------------------------------------------------
TABLE_COLUMNS = (  # title, row column, format, alignment
    ("policy", "policy", "{}", "l"),
    ("cache", "cache_experts", "{}", "r"),
    ("bits", "expert_format", "{}", "l"),
    ("batch", "batch", "{}", "r"),
    ("peak_gpu_mib", "peak_gpu_mib", "{:.0f}", "r"),
    ("ttft_s", "ttft_mean_s", "{:.3f}", "r"),
    ("tpot_ms", "tpot_mean_s", "ms", "r"),
    ("tok/s", "tokens_per_s", "{:.1f}", "r"),
    ("hit_rate", "hit_rate", "{:.3f}", "r"),
    ("h2d_mib", "h2d_mib", "{:.0f}", "r"),
    ("stall_s", "stall_s", "{:.3f}", "r"),
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


def write_plot(rows: list[dict], path: Path, title: str = "") -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("feasible") and r.get("tpot_mean_s") is not None
          and not math.isnan(r["tpot_mean_s"])]
    if not ok:
        return None
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    policies = sorted({r["policy"] for r in ok})
    cmap = plt.get_cmap("tab20")
    for i, pol in enumerate(policies):
        pts = [(r["peak_gpu_mib"] / 1024, r["tpot_mean_s"] * 1e3) for r in ok if r["policy"] == pol]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=pol, color=cmap(i % 20), s=28, zorder=3)
    front = pareto_front([(r["peak_gpu_mib"] / 1024, r["tpot_mean_s"] * 1e3) for r in ok])
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", linewidth=1.2,
            label="Pareto front", zorder=2)
    ax.set_xlabel("peak GPU memory (GiB)")
    ax.set_ylabel("time per output token, mean (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return Path(path)
