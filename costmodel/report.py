"""The search's outputs on disk: plots, a Markdown report with them embedded, CSV and JSON.

``--report DIR`` writes ``report.md``, ``pareto.png`` (latency x peak GPU memory: every screened
configuration as predicted, the confirmed ones as simulated, the simulated front and the chosen point),
``quality.png`` (latency x perplexity, when a quality table was given), ``confirmed.csv`` and
``search.json``. Every file is written atomically; nothing in them depends on the time of day, so the
same search writes the same bytes.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

from moesim.errors import MoesimError
from moesim.atomic import atomic_path, write_text_atomic
from moesim.costmodel.search import (
    GIB,
    SearchResult,
    commands,
    confirmed_table,
    describe_config,
    format_result,
    latency_metric,
)
from moesim.costmodel.space import format_label, quality_caveat, validate_gap

_LAT_LABEL = {"tpot": "time per output token, mean (ms)", "ttft": "time to first token, mean (s)",
              "tokens-per-s": "tokens per second"}


def _lat_values(result: SearchResult) -> tuple[np.ndarray, str, float]:
    metric = latency_metric(result.objective)
    p = result.predictions
    if metric == "tpot":
        return p.tpot_s * 1e3, metric, 1e3
    if metric == "ttft":
        return p.ttft_s, metric, 1.0
    return p.tokens_per_s, metric, 1.0


def _sim_lat(c, metric: str, scale: float) -> float:
    return c.value(metric) * scale


def write_pareto_plot(result: SearchResult, path: Path) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat, metric, scale = _lat_values(result)
    mem = result.predictions.peak_gpu_bytes / GIB
    ok = result.predictions.valid & np.isfinite(lat)
    if not ok.any():
        return None
    fig, ax = plt.subplots(figsize=(8.5, 5.2), dpi=110)
    ax.scatter(mem[ok], lat[ok], s=4, color="0.78", label="screened (cost model)", zorder=1, rasterized=True)
    shown = result.confirmed or result.nearest
    if shown:
        pols = sorted({c.config[0] for c in shown})
        cmap = plt.get_cmap("tab10")
        for i, pol in enumerate(pols):
            pts = [(c.value("memory") / 1024, _sim_lat(c, metric, scale)) for c in shown
                   if c.config[0] == pol and c.simulated.get("feasible")]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=30, color=cmap(i % 10), zorder=3,
                           label=f"{pol} (simulated)")
    if result.front:
        fx = [c.value("memory") / 1024 for c in result.front]
        fy = [_sim_lat(c, metric, scale) for c in result.front]
        ax.step(fx, fy, where="post", color="black", linewidth=1.2, zorder=2, label="Pareto front (simulated)")
    if result.chosen is not None:
        c = result.chosen
        ax.scatter([c.value("memory") / 1024], [_sim_lat(c, metric, scale)], marker="*", s=260, color="gold",
                   edgecolor="black", zorder=4, label="chosen")
    ax.axvline(result.memory_limit / GIB, color="C3", linestyle=":", linewidth=1, label="memory limit")
    ax.set_xlabel("peak GPU memory (GiB)")
    ax.set_ylabel(_LAT_LABEL[metric])
    if metric != "tokens-per-s":
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"{result.trace} on {result.profile}: objective {result.objective}", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return Path(path)


def write_quality_plot(result: SearchResult, path: Path) -> Optional[Path]:
    if result.quality is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat, metric, scale = _lat_values(result)
    ppl = result.quality.per_config
    ok = result.predictions.valid & np.isfinite(lat) & np.isfinite(ppl)
    if not ok.any():
        return None
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    sc = ax.scatter(lat[ok], ppl[ok], c=result.predictions.peak_gpu_bytes[ok] / GIB, s=5, cmap="viridis",
                    rasterized=True)
    fig.colorbar(sc, ax=ax, label="peak GPU memory (GiB)")
    for c in result.front:
        ax.scatter([_sim_lat(c, metric, scale)], [c.perplexity], s=40, facecolor="none", edgecolor="black")
    if result.chosen is not None:
        c = result.chosen
        ax.scatter([_sim_lat(c, metric, scale)], [c.perplexity], marker="*", s=240, color="gold", edgecolor="black")
    if result.constraints.max_ppl is not None:
        ax.axhline(result.constraints.max_ppl, color="C3", linestyle=":", linewidth=1)
    ax.set_xlabel(_LAT_LABEL[metric])
    ax.set_ylabel("perplexity")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{result.trace} on {result.profile}: latency x quality", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return Path(path)


CSV_COLUMNS = ("policy", "cache_experts", "expert_format", "non_expert_format", "batch", "meets", "violations",
               "sim_tpot_s", "sim_ttft_s", "sim_tokens_per_s", "sim_peak_gpu_mib", "pred_tpot_s", "pred_ttft_s",
               "pred_tokens_per_s", "pred_peak_gpu_mib", "perplexity", "on_front", "chosen")


def confirmed_csv(result: SearchResult) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    front = {c.index for c in result.front}
    for c in sorted(result.confirmed + result.nearest, key=lambda x: x.index):
        s = c.simulated
        feas = bool(s.get("feasible"))
        w.writerow([c.config[0], c.config[1], format_label(c.config[2]), format_label(c.config[3]), c.config[4],
                    c.meets, "; ".join(c.violations),
                    _num(s.get("tpot_mean_s") if feas else None), _num(s.get("ttft_mean_s") if feas else None),
                    _num(s.get("tokens_per_s") if feas else None), _num(s.get("peak_gpu_mib")),
                    _num(c.predicted["tpot_s"]), _num(c.predicted["ttft_s"]), _num(c.predicted["tokens_per_s"]),
                    _num(c.predicted["peak_gpu_bytes"] / 2**20), _num(c.perplexity), c.index in front,
                    result.chosen is not None and c.index == result.chosen.index])
    return buf.getvalue()


def _num(v) -> str:
    if v is None:
        return ""
    v = float(v)
    return "" if math.isnan(v) else repr(round(v, 9))


def result_json(result: SearchResult) -> dict:
    def item(c, budget=True):
        sim, val = commands(result, c, with_budget=budget)
        s = c.simulated
        return {"policy": c.config[0], "cache_experts": c.config[1], "expert_bits": c.config[2],
                "non_expert_bits": c.config[3], "batch": c.config[4], "meets": c.meets,
                "violations": list(c.violations),
                "simulated": {k: _clean(s.get(k)) for k in ("feasible", "tpot_mean_s", "ttft_mean_s", "tokens_per_s",
                                                            "peak_gpu_mib", "hit_rate")},
                "predicted": {k: _clean(v) for k, v in c.predicted.items()},
                "perplexity": _clean(c.perplexity), "simulate_command": sim, "validate_command": val}

    return {
        "trace": result.trace, "profile": result.profile, "objective": result.objective,
        "constraints": {"max_gpu_mem_bytes": result.constraints.max_gpu_mem, "max_tpot_s": result.constraints.max_tpot,
                        "max_ttft_s": result.constraints.max_ttft, "max_ppl": result.constraints.max_ppl,
                        "memory_limit_bytes": result.memory_limit},
        "space_size": len(result.space), "predicted_feasible": result.feasible_predicted,
        "simulator_calls": result.simulator_calls,
        "found": result.found, "infeasible_reason": result.infeasible_reason,
        "chosen": item(result.chosen) if result.chosen is not None else None,
        "front": [item(c) for c in result.front],
        "confirmed": [item(c) for c in result.confirmed],
        "nearest": [item(c, budget=False) for c in result.nearest],
        "notes": list(result.notes), "model_stale": list(result.model_stale),
        "caveats": [x for x in (result.chosen is not None and quality_caveat(result.chosen.config,
                                                                               result.quality is not None),
                                result.chosen is not None and validate_gap(result.chosen.config)) if x],
    }


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (np.floating,)):
        return _clean(float(v))
    if isinstance(v, (np.integer,)):
        return int(v)
    return v


def markdown(result: SearchResult, plots: dict[str, Optional[Path]]) -> str:
    q = result.quality is not None
    lines = [f"# Configuration search: {result.trace} on {result.profile}", ""]
    lines.append(f"Objective **{result.objective}**; constraints: {result.constraints.describe(result.device_bytes)}.")
    lines.append("")
    n = len(result.space)
    lines.append(f"- Screened {n:,} configurations with the cost model "
                 f"({result.feasible_predicted:,} predicted to meet the constraints).")
    lines.append(f"- Ran the simulator on {result.simulator_calls} of them "
                 f"({100 * result.simulator_calls / max(n, 1):.2f}% of the space).")
    for s in result.model_stale:
        lines.append(f"- Note: the cost model is stale: {s}.")
    for note in result.notes:
        lines.append(f"- Note: {note}")
    lines.append("")
    if result.chosen is not None:
        c = result.chosen
        s = c.simulated
        sim, val = commands(result, c)
        caveats = [x for x in (quality_caveat(c.config, q), validate_gap(c.config)) if x]
        lines += ["## Chosen configuration", "", describe_config(c.config) + ".", ""]
        lines += [f"**Caveat:** {x}." for x in caveats] + ([""] if caveats else [])
        lines += [
                  "| | TPOT | TTFT | tokens/s | peak GPU memory |" + (" perplexity |" if q else ""),
                  "|---|---:|---:|---:|---:|" + ("---:|" if q else ""),
                  f"| simulated | {s['tpot_mean_s'] * 1e3:.2f} ms | {s['ttft_mean_s']:.3f} s | {s['tokens_per_s']:.2f} | "
                  f"{s['peak_gpu_mib'] / 1024:.2f} GiB |" + (f" {c.perplexity:.3f} |" if q else ""),
                  f"| predicted | {c.predicted['tpot_s'] * 1e3:.2f} ms | {c.predicted['ttft_s']:.3f} s | "
                  f"{c.predicted['tokens_per_s']:.2f} | {c.predicted['peak_gpu_bytes'] / GIB:.2f} GiB |"
                  + (" |" if q else ""),
                  "", "Reproduce:", "", "```bash", sim, val, "```", ""]
    else:
        lines += ["## No configuration meets the constraints", "", result.infeasible_reason + ".", ""]
        if result.nearest:
            lines += ["Nearest points (simulated):", "", "```", confirmed_table(result.nearest, q), "```", ""]
    if plots.get("pareto"):
        lines += ["## Latency x memory", "", f"![Pareto front]({plots['pareto'].name})", ""]
    if result.front:
        lines += ["Pareto front (simulated):", "", "```", confirmed_table(result.front, q, result.chosen), "```", ""]
    if plots.get("quality"):
        lines += ["## Latency x quality", "", f"![latency x perplexity]({plots['quality'].name})", ""]
    if result.confirmed:
        lines += ["## Every confirmed candidate", "", "```", confirmed_table(result.confirmed, q, result.chosen), "```",
                  ""]
    lines += ["## Text output", "", "```", format_result(result).rstrip(), "```", ""]
    return "\n".join(lines)


def write_report(result: SearchResult, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MoesimError(f"--report {out}: cannot create the folder ({exc.strerror or exc})") from None
    plots = {"pareto": write_pareto_plot(result, out / "pareto.png"),
             "quality": write_quality_plot(result, out / "quality.png")}
    write_text_atomic(out / "confirmed.csv", confirmed_csv(result))
    write_text_atomic(out / "search.json", json.dumps(result_json(result), indent=1, sort_keys=False) + "\n")
    write_text_atomic(out / "report.md", markdown(result, plots))
    files = {"report": out / "report.md", "csv": out / "confirmed.csv", "json": out / "search.json"}
    files.update({k: v for k, v in plots.items() if v is not None})
    return files
