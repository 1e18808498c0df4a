"""The fitted correction on top of the analytic backbone, stored as plain numbers (no pickles).

Two kinds, fitted with scikit-learn and exported to arrays so the committed artifact is small, readable
JSON and prediction is vectorised numpy:

``gbm``    gradient-boosted regression trees (:class:`sklearn.ensemble.GradientBoostingRegressor`);
           the export walks every tree for all rows at once, one level per step.
``ridge``  a ridge regression on standardized features.
``none``   no correction (the backbone alone).

The target is ``log(simulated / backbone)``, so a correction multiplies the backbone's prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from moesim.errors import MoesimError

KINDS = ("none", "ridge", "gbm")


@dataclass(frozen=True)
class TreeEnsemble:
    feature: np.ndarray  # int64 [T, N]; -1 marks a leaf
    threshold: np.ndarray  # float64 [T, N]
    left: np.ndarray  # int64 [T, N]
    right: np.ndarray  # int64 [T, N]
    value: np.ndarray  # float64 [T, N] leaf contribution (learning rate included)
    base: float
    depth: int
    nodes: np.ndarray  # int64 [T] nodes of each tree (the rest of its row is padding)

    def predict(self, X: np.ndarray) -> np.ndarray:
        n = np.asarray(X).shape[0]
        if n == 0:
            return np.zeros(0)
        heap_feature, heap_threshold, heap_value = self._heap()
        # sklearn's trees compare float32 copies of the features
        Xt = np.ascontiguousarray(np.asarray(X, dtype=np.float32).T).reshape(-1)
        T = heap_feature.shape[0]
        width = heap_feature.shape[1]
        base = (np.arange(T, dtype=np.int64) * width)[:, None]
        rows = np.arange(n, dtype=np.int64)[None, :]
        node = np.zeros((T, n), dtype=np.int64)
        for _ in range(self.depth):
            flat = base + node
            f = np.take(heap_feature.reshape(-1), flat)
            x = np.take(Xt, f * n + rows)
            node = 2 * node + 1 + (x > np.take(heap_threshold.reshape(-1), flat))
        leaves = node - (2 ** self.depth - 1)
        vbase = (np.arange(T, dtype=np.int64) * heap_value.shape[1])[:, None]
        return self.base + np.take(heap_value.reshape(-1), vbase + leaves).sum(axis=0)

    def _heap(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each tree as a complete binary tree of ``depth`` levels (heap order): a leaf above the last
        level is pushed down with splits that always go left, so walking needs no child tables."""
        cached = self.__dict__.get("_heap_cache")
        if cached is not None:
            return cached
        T, D = self.feature.shape[0], self.depth
        inner = 2 ** D - 1
        hf = np.zeros((T, inner), dtype=np.int64)
        ht = np.full((T, inner), np.inf)
        hv = np.zeros((T, 2 ** D))
        for t in range(T):
            stack = [(0, 0, 0)]  # (sklearn node, heap position, level)
            while stack:
                node, pos, level = stack.pop()
                if level == D:
                    hv[t, pos - inner] = self.value[t, node]
                    continue
                if self.feature[t, node] < 0:
                    hf[t, pos] = 0
                    ht[t, pos] = np.inf  # x <= inf: always left
                    stack.append((node, 2 * pos + 1, level + 1))
                    stack.append((node, 2 * pos + 2, level + 1))
                    continue
                hf[t, pos] = self.feature[t, node]
                ht[t, pos] = self.threshold[t, node]
                stack.append((int(self.left[t, node]), 2 * pos + 1, level + 1))
                stack.append((int(self.right[t, node]), 2 * pos + 2, level + 1))
        object.__setattr__(self, "_heap_cache", (hf, ht, hv))
        return self.__dict__["_heap_cache"]

    def to_dict(self) -> dict[str, Any]:
        trees = []
        for i in range(self.feature.shape[0]):
            n = int(self.nodes[i])
            trees.append({
                "feature": self.feature[i, :n].tolist(),
                "threshold": [float(f"{x:.9g}") for x in self.threshold[i, :n]],
                "left": self.left[i, :n].tolist(),
                "right": self.right[i, :n].tolist(),
                "value": [float(f"{x:.7g}") for x in self.value[i, :n]],
            })
        return {"kind": "gbm", "base": float(self.base), "depth": self.depth, "trees": trees}

    @classmethod
    def from_dict(cls, d: dict[str, Any], n_features: Optional[int] = None) -> "TreeEnsemble":
        trees = d["trees"]
        if n_features is not None:
            _check_trees(trees, n_features)
        N = max(len(t["feature"]) for t in trees) if trees else 1
        T = len(trees)
        feature = np.full((T, N), -1, dtype=np.int64)
        threshold = np.zeros((T, N))
        left = np.zeros((T, N), dtype=np.int64)
        right = np.zeros((T, N), dtype=np.int64)
        value = np.zeros((T, N))
        for i, t in enumerate(trees):
            n = len(t["feature"])
            feature[i, :n] = t["feature"]
            threshold[i, :n] = t["threshold"]
            left[i, :n] = t["left"]
            right[i, :n] = t["right"]
            value[i, :n] = t["value"]
        nodes = np.asarray([len(t["feature"]) for t in trees], dtype=np.int64)
        return cls(feature, threshold, left, right, value, float(d["base"]), int(d["depth"]), nodes)


@dataclass(frozen=True)
class RidgeModel:
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.intercept + ((np.asarray(X) - self.mean) / self.scale) @ self.coef

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "ridge", "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "coef": self.coef.tolist(), "intercept": float(self.intercept)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], n_features: Optional[int] = None) -> "RidgeModel":
        if n_features is not None:
            for name in ("mean", "scale", "coef"):
                if not isinstance(d[name], list) or len(d[name]) != n_features:
                    raise ValueError(f"'{name}' must list {n_features} numbers, one per feature")
        return cls(np.asarray(d["mean"]), np.asarray(d["scale"]), np.asarray(d["coef"]), float(d["intercept"]))


@dataclass(frozen=True)
class NoCorrection:
    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.zeros(np.asarray(X).shape[0])

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "none"}


Correction = TreeEnsemble | RidgeModel | NoCorrection


def _check_trees(trees: Any, n_features: int) -> None:
    """The indices a walk follows, so a corrupted artifact is refused when loaded rather than failing (or
    reading another feature) in the middle of a prediction."""
    if not isinstance(trees, list):
        raise ValueError("'trees' must be a list")
    for i, t in enumerate(trees):
        n = len(t["feature"])
        for name in ("feature", "threshold", "left", "right", "value"):
            if not isinstance(t[name], list) or len(t[name]) != n:
                raise ValueError(f"trees[{i}].{name} must list {n} nodes, as many as trees[{i}].feature")
        for j, f in enumerate(t["feature"]):
            if isinstance(f, bool) or not isinstance(f, int) or not -1 <= f < n_features:
                raise ValueError(f"trees[{i}].feature[{j}] is {f!r}, expected -1 (a leaf) or a feature index "
                                 f"0..{n_features - 1}")
            if f >= 0:
                for side in ("left", "right"):
                    c = t[side][j]
                    if isinstance(c, bool) or not isinstance(c, int) or not 0 < c < n:
                        raise ValueError(f"trees[{i}].{side}[{j}] is {c!r}, expected a node index 1..{n - 1}")


def correction_from_dict(d: dict[str, Any], where: str, n_features: Optional[int] = None) -> Correction:
    """A correction from its artifact form; with ``n_features``, its feature indices and sizes are checked too."""
    kind = d.get("kind") if isinstance(d, dict) else None
    try:
        if kind == "gbm":
            return TreeEnsemble.from_dict(d, n_features)
        if kind == "ridge":
            return RidgeModel.from_dict(d, n_features)
        if kind == "none":
            return NoCorrection()
    except (KeyError, TypeError, ValueError) as exc:
        raise MoesimError(f"{where}: malformed {kind} correction ({exc})") from None
    raise MoesimError(f"{where}: correction kind {kind!r}, expected one of {', '.join(KINDS)}")


# ---- fitting ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GbmSettings:
    n_estimators: int = 300
    max_depth: int = 3
    learning_rate: float = 0.05
    subsample: float = 0.8
    min_samples_leaf: int = 5


def fit_gbm(X: np.ndarray, y: np.ndarray, settings: GbmSettings = GbmSettings(), seed: int = 0) -> TreeEnsemble:
    from sklearn.ensemble import GradientBoostingRegressor

    model = GradientBoostingRegressor(
        loss="huber", n_estimators=settings.n_estimators, max_depth=settings.max_depth,
        learning_rate=settings.learning_rate, subsample=settings.subsample,
        min_samples_leaf=settings.min_samples_leaf, random_state=seed,
    )
    model.fit(X, y)
    trees = [est[0].tree_ for est in model.estimators_]
    N = max(t.node_count for t in trees)
    T = len(trees)
    feature = np.full((T, N), -1, dtype=np.int64)
    threshold = np.zeros((T, N))
    left = np.zeros((T, N), dtype=np.int64)
    right = np.zeros((T, N), dtype=np.int64)
    value = np.zeros((T, N))
    for i, t in enumerate(trees):
        n = t.node_count
        leaf = t.children_left[:n] < 0
        feature[i, :n] = np.where(leaf, -1, t.feature[:n])
        threshold[i, :n] = np.where(leaf, 0.0, t.threshold[:n])
        left[i, :n] = np.where(leaf, 0, t.children_left[:n])
        right[i, :n] = np.where(leaf, 0, t.children_right[:n])
        value[i, :n] = t.value[:n].reshape(n, -1)[:, 0] * settings.learning_rate
    base = float(np.asarray(model.init_.predict(X[:1])).reshape(-1)[0])
    nodes = np.asarray([t.node_count for t in trees], dtype=np.int64)
    ens = TreeEnsemble(feature, threshold, left, right, value, base, settings.max_depth, nodes)
    check = model.predict(X[: min(len(X), 200)])
    got = ens.predict(X[: min(len(X), 200)])
    if not np.allclose(check, got, atol=1e-9, rtol=1e-7):
        raise RuntimeError("exported tree ensemble disagrees with scikit-learn's prediction")
    return ens


def fit_ridge(X: np.ndarray, y: np.ndarray, alpha: float = 1.0) -> RidgeModel:
    from sklearn.linear_model import Ridge

    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    model = Ridge(alpha=alpha).fit((X - mean) / scale, y)
    return RidgeModel(mean, scale, np.asarray(model.coef_, dtype=np.float64), float(model.intercept_))
