"""The validation report as JSON (everything, for tools) and Markdown (the error table and its context)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from moesim.atomic import write_text_atomic
from moesim.engine.validate import PresetValidation, ValidationReport

SUMMARY_METRICS = ("TTFT mean", "TPOT mean", "TPOT p50", "TPOT p90")


def _num(x, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if unit == "":
        return f"{x:.3f}" if abs(x) < 10 else f"{x:.0f}"
    return f"{x:.2f}" if abs(x) < 1000 else f"{x:.0f}"


def _err(e: Optional[float]) -> str:
    return "-" if e is None else f"{100 * e:+.1f}%"


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def _finite(obj):
    """NaN/inf -> None so the JSON is standard."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def report_json(report: ValidationReport) -> str:
    return json.dumps(_finite(report.to_dict()), indent=1, default=_json_default) + "\n"


def error_table(presets: list[PresetValidation], metrics: tuple[str, ...] = ()) -> str:
    """A Markdown table: one row per (policy, metric)."""
    lines = ["| policy | metric | predicted | measured | error |", "|---|---|---:|---:|---:|"]
    for p in presets:
        if not p.feasible:
            lines.append(f"| {p.policy} | not run | | | {p.reason} |")
            continue
        for r in p.rows:
            if metrics and r.metric not in metrics:
                continue
            unit = f" {r.unit}" if r.unit else ""
            lines.append(f"| {p.policy} | {r.metric}{unit} | {_num(r.predicted, r.unit)} | {_num(r.measured, r.unit)} "
                         f"| {_err(r.error)} |")
    return "\n".join(lines)


def summary_table(presets: list[PresetValidation]) -> str:
    """One row per policy: TPOT and memory errors, hit rates, decisions."""
    lines = ["| policy | TPOT pred ms | TPOT meas ms | TPOT err | TTFT err | memory err | hit rate sim / engine | "
             "decisions |", "|---|---:|---:|---:|---:|---:|---|---|"]
    for p in presets:
        if not p.feasible:
            lines.append(f"| {p.policy} | | | | | | not run: {p.reason} | |")
            continue
        t = p.row("TPOT mean")
        ttft = p.row("TTFT mean")
        mem = next((r for r in p.rows if "memory" in r.metric or "device tensors" in r.metric), None)
        hit = p.row("hit rate (decode)")
        dec = "identical" if p.decisions_identical else f"differ at call {p.first_difference}"
        lines.append(f"| {p.policy} | {_num(t.predicted, 'ms')} | {_num(t.measured, 'ms')} | {_err(t.error)} | "
                     f"{_err(ttft.error)} | {_err(mem.error) if mem else '-'} | "
                     f"{_num(hit.predicted)} / {_num(hit.measured)} | {dec} ({p.decision_calls} calls) |")
    return "\n".join(lines)


def report_markdown(report: ValidationReport, explanation: str = "") -> str:
    env = report.environment
    sw = env.get("software", {})
    facts = env.get("device_facts", {})
    s = report.settings
    lines = [
        f"# moesim validate: {s.get('device')} ({env.get('device')})",
        "",
        f"Created {report.created}. Command: `{s.get('command') or '-'}`",
        "",
        "## Setup",
        "",
        f"- device: {env.get('device')}" + (f", driver {facts['driver_version']}" if facts.get("driver_version") else "")
        + (f", PCIe gen {facts.get('pcie_generation')} x{facts.get('pcie_width')}" if facts.get("pcie_generation") else ""),
        f"- host CPU: {env.get('host_cpu')}; torch threads {env.get('torch_threads')}",
        f"- software: python {sw.get('python')}, torch {sw.get('torch')} (CUDA {sw.get('torch_cuda')}), "
        f"transformers {sw.get('transformers')}, simpy {sw.get('simpy')}, moesim {sw.get('moesim')}",
        f"- profile: {report.profile['name']} ({report.profile['device']}; {report.profile['notes']}; fitted to the "
        f"per-point {report.profile['fit_statistic']})",
        f"- model: {report.model['shape']['model_id']} from {report.model['source']}, "
        f"{len(report.model['shape']['moe_layer_ids'])} MoE layers x {report.model['shape']['num_experts']} experts, "
        f"top-{report.model['shape']['top_k']}; weights {report.model['weights']}",
        f"- experts: {report.expert_format['kernel']} ({report.expert_format['library']}), "
        f"{report.expert_format['expert_bytes'] / 2**20:.1f} MiB each; activations {report.expert_format['activation_dtype']}",
        f"- trace: {report.trace['description']}",
        f"- cache: {s.get('cache_experts')} experts per layer; batch 1; warm-up {s.get('warmup_steps')} decode steps; "
        f"{s.get('repeats')} measured run(s) per policy",
        "",
        "## Summary",
        "",
        summary_table(report.presets),
        "",
        "## Every metric",
        "",
        error_table(report.presets),
        "",
    ]
    diag = [(p.policy, p.diagnostics) for p in report.presets if p.feasible and p.diagnostics]
    if diag:
        lines += ["## Components (measured inside the engine vs the profile)", "",
                  "| policy | component | measured median | profile / prediction | count |", "|---|---|---:|---:|---:|"]
        for policy, d in diag:
            for name, v in d.items():
                if not isinstance(v, dict):
                    lines.append(f"| {policy} | {name} | {v} | | |")
                    continue
                pred = v.get("profile", v.get("predicted_mean"))
                lines.append(f"| {policy} | {name} | {v['measured_median']:.3f} | {pred:.3f} | {v['measured_count']} |")
        lines.append("")
    lines += ["## Notes", ""] + [f"- {n}" for n in report.notes]
    if explanation:
        lines += ["", "## Where the errors come from", "", explanation.strip()]
    return "\n".join(lines) + "\n"


def write_report(report: ValidationReport, out: Path, stem: str, explanation: str = "") -> tuple[Path, Path]:
    j = write_text_atomic(Path(out) / f"{stem}.json", report_json(report))
    m = write_text_atomic(Path(out) / f"{stem}.md", report_markdown(report, explanation))
    return j, m
