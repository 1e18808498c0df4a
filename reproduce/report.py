"""``validation/published.md`` and its plot: every catalogue point, published vs predicted, and the scores."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from moesim.reproduce.catalogue import CATALOGUE, METRICS
from moesim.reproduce.fit import REGISTRY, FitResult
from moesim.reproduce.run import Outcome, Scores


def _num(x: float) -> str:
    if x != x:
        return "-"
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 1:
        return f"{x:.3g}" if x < 10 else f"{x:.1f}"
    return f"{x:.3g}"


def table_rows(outcomes: list[Outcome]) -> list[list[str]]:
    rows = []
    for o in outcomes:
        p = o.point
        unit = METRICS[p.metric]
        routing = p.routing + (" (synthetic)" if o.synthetic else "") if p.routing else "-"
        why = o.reason or "; ".join(x for x in (p.assumed, o.notes) if x)
        rows.append([p.id, p.source, p.system, f"{p.gpu} / {p.host} / {p.link}", f"{p.metric} ({unit})",
                     _num(p.value), _num(o.predicted), f"{o.ratio:.2f}" if o.simulated else "-", routing,
                     why.replace("|", "/")])
    return rows


def format_console(outcomes: list[Outcome]) -> str:
    lines = [f"{'point':<24} {'metric':<20} {'published':>10} {'predicted':>10} {'ratio':>6}  note"]
    for o in outcomes:
        p = o.point
        note = o.reason if o.reason else ("synthetic routing" if o.synthetic else "")
        lines.append(f"{p.id:<24} {p.metric:<20} {_num(p.value):>10} {_num(o.predicted):>10} "
                     f"{(f'{o.ratio:.2f}' if o.simulated else '-'):>6}  {note}")
    return "\n".join(lines)


def format_scores(s: Scores, held_out: dict[str, float]) -> list[str]:
    # a filtered run may hold no point of a kind: its count alone, not "nan%"
    lines = [
        f"speed points (TPOT, tokens/s) simulated: {s.speed_points}; median |error| {s.median_abs_error:.1%}; "
        f"within 30%: {s.within_30:.0%}; worst factor {s.max_factor:.2f}x ({s.worst})" if s.speed_points else
        "speed points (TPOT, tokens/s) simulated: 0",
        f"peak memory points: {s.memory_points}; median |error| {s.memory_median_abs_error:.1%}; max "
        f"{s.memory_max_abs_error:.1%}; within 10%: {s.memory_within_10:.0%}" if s.memory_points else
        "peak memory points: 0",
        f"TTFT points: {s.ttft_points}; median |error| {s.ttft_median_abs_error:.1%}" if s.ttft_points else
        "TTFT points: 0",
    ]
    for k, v in s.kendall.items():
        lines.append(f"Kendall tau, {k}: {v:.2f}")
    for k, v in s.kendall_systems.items():
        lines.append(f"Kendall tau between systems (same model and machine), {k}: {v:.2f}")
    for label, v in held_out.items():
        lines.append(f"{label}: {v:.1%}")
    return lines


def _floor_breaches(outcomes: list[Outcome], floors: dict[str, float]) -> list[tuple[Outcome, float]]:
    from moesim.reproduce.bounds import beats_floor

    return [(o, floors[o.point.id]) for o in outcomes
            if o.point.id in floors and beats_floor(o.point, floors[o.point.id])]


def _floor_breach(o: Outcome, best: float) -> str:
    p = o.point
    limit = "at least" if p.metric == "tpot_s" else "at most"
    return (f"published {_num(p.value)} {METRICS[p.metric]}, the stated setup allows {limit} {_num(best)} "
            f"({abs(p.value / best - 1):.1%} beyond it)")


def _floor_summary(floors: dict[str, float], breaches: list) -> str:
    return (f"link floor (every expert on the GPU, the whole card as its cache, pinned copies and nothing else; "
            f"reproduce/bounds.py): {len(floors)} points have one; published faster than it: {len(breaches)}")


def format_floors(outcomes: list[Outcome], floors: dict[str, float]) -> list[str]:
    """The link floor's summary line, then one line per point whose published value beats it."""
    breaches = _floor_breaches(outcomes, floors)
    return [_floor_summary(floors, breaches)] + [f"  {o.point.id}: {_floor_breach(o, best)}" for o, best in breaches]


def format_fits(fits: dict[str, FitResult]) -> list[str]:
    """One line per fitted parameter: value, unit, where it is used, the points behind it, and whether the
    value committed in the code (what `moesim simulate` uses) is stale."""
    lines = []
    for name, r in fits.items():
        param = REGISTRY.get(name)
        unit = f" {param.unit}" if param else ""
        where = f" ({param.used_in})" if param else ""
        if not r.points:
            lines.append(f"fitted {name} = {r.value:.4g}{unit}{where}: committed value, none of its points in this run")
            continue
        stale = f"; STALE: the code commits {r.committed:.4g}, update it" if r.stale else ""
        lines.append(f"fitted {name} = {r.value:.4g}{unit}{where}, rms log error {r.rms_log_error:.3f} on "
                     f"{len(r.points)} points: {', '.join(r.points) or '-'}{stale}")
    return lines


def write_markdown(path: Path, outcomes: list[Outcome], s: Scores, held_out: dict[str, float],
                   fitted: dict[str, FitResult], plot_name: str, catalogue: str | Path = CATALOGUE,
                   floors: Optional[dict[str, float]] = None) -> None:
    from moesim.atomic import write_text_atomic

    head = ["point", "source", "system", "GPU / host / link", "metric", "published", "predicted", "ratio",
            "routing", "assumed / why not simulated"]
    # the bundled catalogue keeps its repository path wherever the command runs; another is named as given
    named = "reproduce/catalogue.csv" if Path(catalogue).resolve() == CATALOGUE else str(catalogue)
    out = [
        "# moesim against published measurements",
        "",
        f"Written by `moesim reproduce` from `{named}` (one row per published number; schema in",
        "`reproduce/catalogue.py`). Each simulable point is simulated with its preset, the system's own knobs, a",
        "profile composed from its GPU, host CPU and link (`calib/hosts.py`), and its routing: a real bundled trace,",
        "or a named routing model marked *synthetic* (`reproduce/routing.py`; no Mixtral trace exists here). No",
        "constant is set per point. Ratio = predicted / published.",
        "",
        "## Scores",
        "",
    ]
    out += [f"- {line}" for line in format_scores(s, held_out)]
    out += ["", "## Parameters fitted to published numbers", ""]
    if fitted:
        out.append("Each is the unit cost of a modelled mechanism that no source gives, fitted by "
                   "`reproduce/fit.py` (bounded least squares on log ratio); leave-one-source-out "
                   "(leave-one-model-out) refits it without the held-out source's (model's) points.")
        out.append("")
        for name, r in fitted.items():
            param = REGISTRY.get(name)
            meaning = f": {param.meaning}; used in {param.used_in}; bounds {param.bounds}" if param else ""
            out.append(f"- `{name}` = {r.value:.4g} {param.unit if param else ''}{meaning}. Fitted on: "
                       f"{', '.join(r.points) or '-'} (rms log error {r.rms_log_error:.3f})"
                       + (f". STALE: the code commits {r.committed:.4g}" if r.stale else ""))
    else:
        out.append("None: every cost comes from a specification, a cited measurement or a stated assumption "
                   "(see the profile's `sources` and the presets' docstrings), so leave-one-source-out equals "
                   "each source's plain error.")
    if floors is not None:
        out += ["", "## Published faster than the link allows", "",
                "Whatever a system caches or prefetches, an expert a decode step routes that is not on the card must",
                "cross the link during the step, and no cache is larger than the card. The least number of such",
                "copies (Belady's MIN over the point's routing, from the best starting cache, with the whole card",
                "beside the dense weights as the cache) at the profile's pinned copy time, with compute and every",
                "other cost left out, is a floor under any system that runs its experts on the GPU. A published",
                "figure beyond it needs a link faster than the profile's pinned rate (a measurement on another host),",
                "or a setup other than the one stated for it (smaller experts, another batch, another metric); the",
                "margin says how much faster. Such a point keeps its prediction and ratio.",
                ""]
        breaches = _floor_breaches(outcomes, floors)
        out += [f"- {_floor_summary(floors, breaches)}"]
        out += [f"- `{o.point.id}`: {_floor_breach(o, best)}" for o, best in breaches]
    off = sorted((o for o in outcomes if o.simulated and o.abs_error > 0.30), key=lambda o: -o.factor)
    out += ["", "## Points off by more than 30%", ""]
    out += [f"- `{o.point.id}` ({o.point.system}, {o.point.metric}): ratio {o.ratio:.2f}"
            + (f"; assumed: {o.point.assumed}" if o.point.assumed else "") for o in off] or ["None."]
    out += ["", f"![predicted vs published]({plot_name})", "", "## Points", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in table_rows(outcomes)]
    write_text_atomic(path, "\n".join(out) + "\n")


def write_plot(path: Path, outcomes: list[Outcome]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [o for o in outcomes if o.simulated and o.point.is_speed and o.predicted > 0]
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    markers = "o s ^ D v P X * < > h".split()
    systems = sorted({o.point.preset for o in pts})
    for i, system in enumerate(systems):
        group = [o for o in pts if o.point.preset == system]
        # tokens/s points are drawn as seconds per token so every marker reads "time, lower is faster"
        xs = [o.point.value if o.point.metric == "tpot_s" else 1.0 / o.point.value for o in group]
        ys = [o.predicted if o.point.metric == "tpot_s" else 1.0 / o.predicted for o in group]
        ax.scatter(xs, ys, marker=markers[i % len(markers)], label=system, alpha=0.8)
    lo = min([0.01] + [o.point.value for o in pts if o.point.metric == "tpot_s"])
    hi = 20.0
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
    for f in (0.7, 1.3):
        ax.plot([lo, hi], [lo * f, hi * f], "k:", lw=0.6)
    for f in (0.5, 2.0):
        ax.plot([lo, hi], [lo * f, hi * f], color="0.6", ls="--", lw=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("published seconds per token (TPOT, or 1 / tokens per s)")
    ax.set_ylabel("moesim predicted seconds per token")
    ax.set_title("moesim vs published measurements (dotted: ±30%, dashed: 2x)")
    if pts:
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
