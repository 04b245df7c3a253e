"""Baseline routers: what a lookup table already gets, so that an evaluation shows what the learned router adds.

Each is fitted on the labels' training rows (their rewards, tags and query features) and routes with one scoring
method, as RouteLLM's routers do: `scores(rows) -> (n, experts)`, higher is better, the route is the argmax (ties go
to the first expert). `BASELINES` is the registry by name.
- `tag-lookup`: the best expert of each tag by mean training reward; a query takes the mean of its tags' reward
  vectors (a query with no known tag: the best single expert's). Needs tags, so it routes tagged queries only.
- `cluster-lookup`: k-means over the training queries' features (cosine), then each cluster's best expert; a query
  goes to its nearest cluster's. Needs no tags: usable on untagged live queries.
- `knn`: the mean reward vector of the k training queries nearest by cosine.
Features are the router's own: the embed step's cells for a frozen encoder, else the learned router's encoder.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from tasks.tag import kmeans, nearest, unit_rows

CLUSTERS = 16  # cluster-lookup's k (fewer when the training rows are few: about 8 rows a cluster at least)
NEIGHBOURS = 16  # knn's k


@dataclass(frozen=True)
class Rows:
    """What a baseline reads of some queries: pooled features (n, d) and tags (n lists)."""

    features: np.ndarray
    tags: list[list[str]]

    def __len__(self) -> int:
        return len(self.tags)


def best_single(rewards: np.ndarray) -> np.ndarray:
    """The mean reward vector over rows that have any finite reward (zeros when there are none)."""
    ok = np.isfinite(rewards).all(axis=1)
    return rewards[ok].mean(axis=0) if ok.any() else np.zeros(rewards.shape[1])


class Baseline(ABC):
    """A router fitted on training rows: one scoring method, routes by argmax."""

    name: ClassVar[str]

    @abstractmethod
    def scores(self, rows: Rows) -> np.ndarray:
        """(len(rows), experts): higher is better."""

    def route(self, rows: Rows) -> np.ndarray:
        return self.scores(rows).argmax(axis=1) if len(rows) else np.zeros(0, dtype=int)


class TagLookup(Baseline):
    name = "tag-lookup"

    def __init__(self, train: Rows, rewards: np.ndarray, prior: np.ndarray):
        by: dict[str, list[np.ndarray]] = {}
        for tags, r in zip(train.tags, rewards, strict=True):
            for t in dict.fromkeys(tags):
                by.setdefault(t, []).append(r)
        self.means = {t: np.mean(rs, axis=0) for t, rs in by.items()}
        self.prior = prior

    def scores(self, rows: Rows) -> np.ndarray:
        out = [np.mean([self.means[t] for t in known], axis=0) if (known := [t for t in tags if t in self.means])
               else self.prior for tags in rows.tags]
        return np.array(out).reshape(len(rows), len(self.prior))


class ClusterLookup(Baseline):
    name = "cluster-lookup"

    def __init__(self, train: Rows, rewards: np.ndarray, prior: np.ndarray, k: int = CLUSTERS, seed: int = 0):
        x = unit_rows(train.features)
        self.centroids = kmeans(x, max(1, min(k, len(x) // 8)), seed)
        assign = nearest(x, self.centroids)
        self.means = np.array([rewards[assign == j].mean(axis=0) if (assign == j).any() else prior
                               for j in range(len(self.centroids))])

    def scores(self, rows: Rows) -> np.ndarray:
        return self.means[nearest(unit_rows(rows.features), self.centroids)]


class KNN(Baseline):
    name = "knn"

    def __init__(self, train: Rows, rewards: np.ndarray, prior: np.ndarray, k: int = NEIGHBOURS):
        self.x, self.rewards, self.k = unit_rows(train.features), rewards, min(k, len(rewards))

    def scores(self, rows: Rows, chunk: int = 2048) -> np.ndarray:
        out = []
        q = unit_rows(rows.features)
        for i in range(0, len(q), chunk):
            sim = q[i:i + chunk] @ self.x.T
            top = np.argpartition(-sim, self.k - 1, axis=1)[:, :self.k]
            out.append(self.rewards[top].mean(axis=1))
        return np.concatenate(out) if out else np.zeros((0, self.rewards.shape[1]))


BASELINES: dict[str, type[Baseline]] = {b.name: b for b in (TagLookup, ClusterLookup, KNN)}


def fit_baselines(train: Rows, rewards: np.ndarray, prior: np.ndarray | None = None,
                  names: list[str] | None = None) -> dict[str, Baseline]:
    """Every baseline (or those in `names`) fitted on the training rows; rows with a missing reward are left out.
    `prior`: the per-expert score a query gets when nothing is known of it (default: the mean training reward;
    evaluate passes the best single expert's criterion). A baseline that needs features is left out when the rows
    have none."""
    ok = np.isfinite(rewards).all(axis=1)
    feats = train.features[ok] if train.features.size else train.features
    fit = Rows(feats, [t for t, o in zip(train.tags, ok, strict=True) if o])
    prior = best_single(rewards) if prior is None else prior
    rewards = rewards[ok]
    out: dict[str, Baseline] = {}
    for name in names or list(BASELINES):
        if not len(rewards) or (name != "tag-lookup" and fit.features.size == 0):
            continue
        out[name] = BASELINES[name](fit, rewards, prior)
    return out
