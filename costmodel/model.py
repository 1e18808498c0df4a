"""The cost model: the analytic backbone times a fitted correction, loaded from a versioned artifact.

``CostModel.predict(context, configs)`` returns TTFT, TPOT, tokens/s and peak GPU memory for every
configuration of a :class:`~moesim.costmodel.space.ConfigSet` on one (trace, profile)
(:class:`~moesim.costmodel.context.TraceProfileContext`). Memory is the simulator's arithmetic
(:mod:`moesim.costmodel.memory`), not fitted.

The artifact (``costmodel/artifacts/costmodel.json``) records what it was fitted on: the sha256 of
every trace and profile file, the moesim version and the hash of the simulator's sources
(:func:`moesim.costmodel.dataset.moesim_hash`), the sampling plan, and the held-out comparison that
chose each target's correction. :meth:`CostModel.stale_reasons` says what changed since.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from moesim.costmodel.context import FEATURE_NAMES, TraceProfileContext
from moesim.costmodel.correction import KINDS, Correction, NoCorrection, correction_from_dict
from moesim.costmodel.space import ConfigSet
from moesim.errors import MoesimError

ARTIFACT_FORMAT = "moesim.costmodel"
ARTIFACT_VERSION = 1
TARGETS = ("tpot", "ttft")
# the corrections a fit compares ("direct" is reported, never stored)
CANDIDATES = (*KINDS, "direct")


def default_artifact_path() -> Path:
    return Path(__file__).resolve().parent / "artifacts" / "costmodel.json"


@dataclass(frozen=True)
class Predictions:
    """Per configuration; NaN where ``valid`` is False."""

    valid: np.ndarray
    reason: list[str]
    ttft_s: np.ndarray
    tpot_s: np.ndarray
    tokens_per_s: np.ndarray
    peak_gpu_bytes: np.ndarray
    hit_rate: np.ndarray
    backbone_ttft_s: np.ndarray
    backbone_tpot_s: np.ndarray

    def objective(self, name: str) -> np.ndarray:
        """Lower is better: tpot, ttft, memory; tokens-per-s is negated."""
        if name == "tpot":
            return self.tpot_s
        if name == "ttft":
            return self.ttft_s
        if name == "memory":
            return self.peak_gpu_bytes.astype(np.float64)
        if name == "tokens-per-s":
            return -self.tokens_per_s
        raise MoesimError(f"--objective {name}: expected one of {', '.join(OBJECTIVES)}")


OBJECTIVES = ("tpot", "ttft", "tokens-per-s", "memory")


@dataclass(frozen=True)
class CostModel:
    corrections: dict[str, Correction]
    feature_names: tuple[str, ...] = FEATURE_NAMES
    meta: dict[str, Any] = field(default_factory=dict)
    path: str = ""

    @classmethod
    def backbone_only(cls) -> "CostModel":
        return cls({t: NoCorrection() for t in TARGETS}, meta={"note": "analytic backbone, no correction"})

    # ---- prediction --------------------------------------------------------------------------------
    def predict(self, ctx: TraceProfileContext, configs: ConfigSet) -> Predictions:
        """Predictions for ``configs``, kept on disk by the context's contents, this model and the configs
        (the fitted correction over a search's ~40k configurations is most of a warm search)."""
        parts = ctx.cache_parts()
        if parts is None:
            return self._predict(ctx, configs)
        import hashlib

        from moesim.diskcache import cached

        h = hashlib.sha256(self.to_json().encode())
        h.update(repr((configs.policies, configs.expert_formats, configs.non_expert_formats)).encode())
        for col in (configs.policy, configs.cache_experts, configs.expert_format, configs.non_expert_format,
                    configs.batch):
            h.update(str(col.dtype).encode())
            h.update(np.ascontiguousarray(col).tobytes())
        return cached("costmodel-predictions", (*parts, h.hexdigest()), lambda: self._predict(ctx, configs))

    def _predict(self, ctx: TraceProfileContext, configs: ConfigSet) -> Predictions:
        ev = ctx.evaluate(configs)
        X = np.nan_to_num(ev.features, nan=0.0, posinf=0.0, neginf=0.0)
        valid = ev.valid
        ratio = {t: np.ones(len(configs)) for t in TARGETS}
        if valid.any():
            for t in TARGETS:
                r = np.exp(self.corrections[t].predict(X[valid]))
                ratio[t][valid] = r
        ttft = ev.ttft_s * ratio["ttft"]
        tpot = ev.tpot_s * ratio["tpot"]
        # the prefill steps scale like TTFT and the decode steps like TPOT
        makespan = ev.prefill_total_s * ratio["ttft"] + ev.decode_total_s * ratio["tpot"]
        with np.errstate(invalid="ignore", divide="ignore"):
            tokens = np.where(valid & (makespan > 0), ev.output_tokens / makespan, np.nan)
        return Predictions(valid, ev.reason, np.where(valid, ttft, np.nan), np.where(valid, tpot, np.nan), tokens,
                           ev.peak_gpu_bytes, ev.hit_rate, ev.ttft_s, ev.tpot_s)

    # ---- artifact ----------------------------------------------------------------------------------
    def to_json(self) -> str:
        doc = {
            "format": ARTIFACT_FORMAT,
            "format_version": ARTIFACT_VERSION,
            **self.meta,
            "feature_names": list(self.feature_names),
            "corrections": {t: self.corrections[t].to_dict() for t in TARGETS},
        }
        return json.dumps(doc, indent=None, separators=(",", ":"), sort_keys=False) + "\n"

    @classmethod
    def load(cls, path: Optional[str | Path] = None) -> "CostModel":
        path = Path(path) if path is not None else default_artifact_path()
        if not path.is_file():
            raise MoesimError(f"{path}: no cost model artifact (fit one with `moesim costmodel fit`)")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MoesimError(f"{path}: not a JSON cost model artifact ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != ARTIFACT_FORMAT:
            raise MoesimError(f"{path}: not a cost model artifact (expected \"format\": \"{ARTIFACT_FORMAT}\")")
        version = doc.get("format_version")
        if not isinstance(version, int) or version > ARTIFACT_VERSION:
            raise MoesimError(f"{path}: artifact version {version!r}; this moesim reads up to {ARTIFACT_VERSION}")
        names = tuple(doc.get("feature_names") or ())
        if names != FEATURE_NAMES:
            raise MoesimError(f"{path}: fitted on other features than this moesim computes; refit with "
                              "`moesim costmodel fit`")
        corr = doc.get("corrections")
        if not isinstance(corr, dict) or any(t not in corr for t in TARGETS):
            raise MoesimError(f"{path}: field 'corrections' must hold {', '.join(TARGETS)}")
        corrections = {t: correction_from_dict(corr[t], f"{path}: corrections.{t}", len(FEATURE_NAMES))
                       for t in TARGETS}
        _check_fit_record(doc, path)
        meta = {k: v for k, v in doc.items() if k not in ("format", "format_version", "feature_names",
                                                          "corrections")}
        return cls(corrections, names, meta, str(path))

    def stale_reasons(self) -> list[str]:
        """What changed since the fit: the simulator's sources, or a trace or profile file it was fitted on."""
        from moesim.costmodel.dataset import moesim_hash, profile_hash, trace_hash

        out = []
        if self.meta.get("moesim_sha256") and self.meta["moesim_sha256"] != moesim_hash():
            out.append("the simulator changed since the fit (moesim hash "
                       f"{self.meta['moesim_sha256'][:12]} -> {moesim_hash()[:12]})")
        fitted = self.meta.get("fitted_on", {})
        for kind, hasher in (("traces", trace_hash), ("profiles", profile_hash)):
            for name, sha in sorted(fitted.get(kind, {}).items()):
                try:
                    now = hasher(name)
                except (MoesimError, OSError):
                    out.append(f"{kind[:-1]} {name} is gone")
                    continue
                if now != sha:
                    out.append(f"{kind[:-1]} {name} changed ({sha[:12]} -> {now[:12]})")
        return out


def _check_fit_record(doc: dict[str, Any], path: Path) -> None:
    """The fields that `costmodel show`, `costmodel fit` and :meth:`CostModel.stale_reasons` read. Each may be
    absent (a model fitted without a record still predicts), but one that is present must have the shape they
    expect, so a corrupted artifact is refused here and not with a traceback in whichever command reads it."""

    def expect(ok: bool, name: str, what: str) -> None:
        if not ok:
            raise MoesimError(f"{path}: field '{name}' must be {what}")

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    for name in ("moesim_version", "moesim_sha256"):
        expect(isinstance(doc.get(name, ""), str), name, "a string")
    fitted = doc.get("fitted_on", {})
    expect(isinstance(fitted, dict), "fitted_on", "an object with 'traces' and 'profiles'")
    for kind in ("traces", "profiles"):
        hashes = fitted.get(kind, {})
        expect(isinstance(hashes, dict) and all(isinstance(h, str) for h in hashes.values()), f"fitted_on.{kind}",
               "an object of name: sha256")
    expect(isinstance(doc.get("sampling", {}), dict), "sampling", "an object")
    if "cross_validation_mape" in doc:
        cv = doc["cross_validation_mape"]
        ok = isinstance(cv, dict) and all(isinstance(cv.get(t), dict) for t in TARGETS)
        expect(ok and all(number(cv[t].get(k)) for t in TARGETS for k in CANDIDATES), "cross_validation_mape",
               f"an object of {', '.join(TARGETS)}, each with the MAPE of {', '.join(CANDIDATES)}")
        # the cross-validation is shown beside the correction it chose
        chosen = doc.get("chosen")
        expect(isinstance(chosen, dict) and all(chosen.get(t) in KINDS for t in TARGETS), "chosen",
               f"an object of {', '.join(TARGETS)}, each one of {', '.join(KINDS)}")


def mape(pred: np.ndarray, true: np.ndarray) -> float:
    ok = np.isfinite(pred) & np.isfinite(true) & (true > 0)
    return float(np.mean(np.abs(pred[ok] / true[ok] - 1.0))) if ok.any() else math.nan
