"""Configuration dataclasses for Phase 1 sampling, validated on construction."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


class Relation(str, enum.Enum):
    """Tree relations that make an (anchor, positive) pair."""

    PARENT = "parent"  # anchor -> its parent
    CHILD = "child"  # anchor -> each of its children
    SIBLING = "sibling"  # anchor -> each code with the same parent
    LEVELS = "levels"  # one item per anchor; the positive is drawn each epoch from a tree level


class Schedule(str, enum.Enum):
    """How the curriculum mix moves from its start to its end value over Phase 1."""

    LINEAR = "linear"
    COSINE = "cosine"
    STEP = "step"  # start mix for the first half of Phase 1, end mix after


def _check(condition: bool, name: str, value: object, expected: str) -> None:
    if not condition:
        raise ValueError(f"{name}={value!r}: expected {expected}")


@dataclass(frozen=True)
class StreamingConfig:
    """What a Phase 1 item holds and how its randomness is keyed.

    ``seed`` keys every draw with (epoch, index); K = ``n_negatives`` per item, C = ``n_candidates`` >= K for Phase 2+.
    ``positive_relations`` form the (anchor, positive) pairs; ``("levels",)`` instead draws each epoch a level d
    (weight ``level_decay**d``), then a code whose LCA with the anchor is at depth d. ``max_siblings`` keeps a seeded
    choice of siblings per anchor (None: all); ``exclude_codes`` never appear in an item; ``taxonomy`` is a CSV
    path, or None for NAICS 2022.
    """

    seed: int = 42
    n_negatives: int = 8
    n_candidates: int = 48
    positive_relations: tuple[str, ...] = ("parent", "sibling")
    max_siblings: int | None = None
    level_decay: float = 2.0
    exclude_codes: tuple[str, ...] = ()
    taxonomy: str | None = None

    def __post_init__(self) -> None:
        _check(isinstance(self.seed, int) and 0 <= self.seed < 2**63, "seed", self.seed, "an int in [0, 2**63)")
        _check(isinstance(self.n_negatives, int) and self.n_negatives >= 1, "n_negatives", self.n_negatives,
               "an int >= 1")
        _check(isinstance(self.n_candidates, int) and self.n_candidates >= self.n_negatives, "n_candidates",
               self.n_candidates, f"an int >= n_negatives ({self.n_negatives})")
        relations = (self.positive_relations,) if isinstance(self.positive_relations, str) else tuple(
            self.positive_relations)
        allowed = [r.value for r in Relation]
        _check(len(relations) > 0 and all(r in allowed for r in relations) and len(set(relations)) == len(relations),
               "positive_relations", self.positive_relations, f"a non-empty tuple of distinct values from {allowed}")
        _check(Relation.LEVELS.value not in relations or len(relations) == 1, "positive_relations",
               self.positive_relations, "('levels',) alone, or fixed relations without 'levels'")
        object.__setattr__(self, "positive_relations", relations)
        _check(isinstance(self.level_decay, (int, float)) and math.isfinite(self.level_decay) and self.level_decay > 0,
               "level_decay", self.level_decay, "a number > 0")
        _check(self.max_siblings is None or (isinstance(self.max_siblings, int) and self.max_siblings >= 1),
               "max_siblings", self.max_siblings, "None or an int >= 1")
        _check(not isinstance(self.exclude_codes, str) and all(isinstance(c, str) for c in self.exclude_codes),
               "exclude_codes", self.exclude_codes, "a sequence of code strings, e.g. ('311111',)")
        object.__setattr__(self, "exclude_codes", tuple(self.exclude_codes))


@dataclass(frozen=True)
class SamplingConfig:
    """The Phase 1 difficulty curriculum.

    Negatives are hard (LCA with the anchor = its parent), easy (LCA = the root) or semi-hard (in between). Easy and
    semi-hard shares move from ``*_start`` at epoch 0 to ``*_end`` at the last Phase 1 epoch; hard takes the rest.
    A bucket that runs short is filled from its neighbours, so an item never fails for lack of one bucket.
    """

    easy_start: float = 0.70
    easy_end: float = 0.20
    semi_hard_start: float = 0.20
    semi_hard_end: float = 0.40
    schedule: Schedule = field(default=Schedule.LINEAR)
    order_filter: bool = False
    uniform: bool = False

    def __post_init__(self) -> None:
        for name in ("easy_start", "easy_end", "semi_hard_start", "semi_hard_end"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0, name, value,
                   "a number in [0, 1]")
        for when in ("start", "end"):
            total = getattr(self, f"easy_{when}") + getattr(self, f"semi_hard_{when}")
            _check(total <= 1.0 + 1e-9, f"easy_{when} + semi_hard_{when}", total, "<= 1 (hard takes the rest)")
        _check(isinstance(self.order_filter, bool), "order_filter", self.order_filter, "True or False")
        _check(isinstance(self.uniform, bool), "uniform", self.uniform, "True or False")
        try:
            object.__setattr__(self, "schedule", Schedule(self.schedule))
        except ValueError:
            raise ValueError(f"schedule={self.schedule!r}: expected one of {[s.value for s in Schedule]}") from None

    def progress(self, epoch: int, phase1_end_epoch: int) -> float:
        """Curriculum position in [0, 1]: 0 at epoch 0, 1 at the last Phase 1 epoch and after."""
        if phase1_end_epoch <= 1:
            return 1.0
        t = min(max(epoch, 0) / (phase1_end_epoch - 1), 1.0)
        if self.schedule is Schedule.COSINE:
            return 0.5 - 0.5 * math.cos(math.pi * t)
        if self.schedule is Schedule.STEP:
            return 0.0 if t < 0.5 else 1.0
        return t

    def mix(self, epoch: int, phase1_end_epoch: int) -> tuple[float, float, float]:
        """(hard, semi_hard, easy) shares at an epoch."""
        t = self.progress(epoch, phase1_end_epoch)
        easy = self.easy_start + t * (self.easy_end - self.easy_start)
        semi = self.semi_hard_start + t * (self.semi_hard_end - self.semi_hard_start)
        return (max(0.0, 1.0 - easy - semi), semi, easy)
