"""The three metrics, each described once: which way is nearer, the padding score, faiss's constant.

``"cosine"`` and ``"ip"`` are similarities (larger is nearer; cosine L2-normalises rows first), ``"l2"`` a
squared Euclidean distance (smaller is nearer). Look a name up with :func:`get_metric`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Metric:
    """One metric; ``normalise``: rows and queries are L2-normalised; ``faiss_name``: ``faiss.<faiss_name>``."""
    name: str
    higher_is_better: bool
    normalise: bool
    faiss_name: str

    @property
    def is_distance(self) -> bool:
        """Scores are squared distances, computed from inner products and squared norms."""
        return not self.higher_is_better

    @property
    def worst(self) -> float:
        """The padding score: ``-inf`` for similarities, ``+inf`` for distances."""
        return float("-inf") if self.higher_is_better else float("inf")


COSINE = Metric("cosine", higher_is_better=True, normalise=True, faiss_name="METRIC_INNER_PRODUCT")
IP = Metric("ip", higher_is_better=True, normalise=False, faiss_name="METRIC_INNER_PRODUCT")
L2 = Metric("l2", higher_is_better=False, normalise=False, faiss_name="METRIC_L2")

_BY_NAME = {m.name: m for m in (COSINE, IP, L2)}
METRICS = tuple(_BY_NAME)


def check_metric(metric: Any) -> str:
    """``metric`` unchanged, or ValueError ``metric=...: expected one of ...``."""
    if metric not in _BY_NAME:
        raise ValueError(f"metric={metric!r}: expected one of {METRICS}")
    return metric


def get_metric(metric: str | Metric) -> Metric:
    """The :class:`Metric` of a name (a Metric passes through); ValueError for an unknown name."""
    return metric if isinstance(metric, Metric) else _BY_NAME[check_metric(metric)]
