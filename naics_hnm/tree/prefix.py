"""The tree of a digit-code taxonomy without a parent column, inferred from code prefixes: a code's parent is its
longest proper prefix that is a code; a range ``LO-HI`` (NAICS ``31-33``) stands for every prefix in it. A code
without such a prefix is top level if it has at most two digits or is among the shortest codes."""

from __future__ import annotations

import re
from typing import Callable, Sequence

_RANGE = re.compile(r"^(\d+)-(\d+)$")
_DIGITS = re.compile(r"^\d+$")


class PrefixTreeError(ValueError):
    """A code or a set of codes that the digit-prefix rule cannot place."""


def stands_for(code: str) -> list[str]:
    """The digit prefixes a code stands for: ``'31-33'`` -> ``['31', '32', '33']``."""
    match = _RANGE.match(code)
    if match is None:
        return [code]
    lo, hi = match.groups()
    if len(lo) != len(hi) or int(lo) > int(hi):
        raise PrefixTreeError(f"code range {code!r} is malformed: expected 'LO-HI' with equal widths and LO <= HI")
    return [str(v).zfill(len(lo)) for v in range(int(lo), int(hi) + 1)]


def prefix_parents(codes: Sequence[str], where: Callable[[int], str] = str) -> list[str | None]:
    """Parent code of each code (None = top level) by the digit-prefix rule; ``where(i)`` names code i's row.
    :class:`PrefixTreeError` for a code not digits or a range, two codes standing for one prefix, or a long code
    whose prefixes are not codes."""
    owner: dict[str, int] = {}
    for i, code in enumerate(codes):
        if not (_DIGITS.match(code) or _RANGE.match(code)):
            raise PrefixTreeError(f"{where(i)}: code {code!r} is not digits or a 'LO-HI' digit range; "
                                  "a taxonomy with other codes needs a 'parent' column")
        for prefix in stands_for(code):
            if prefix in owner:
                raise PrefixTreeError(f"{where(i)}: code {code!r} overlaps code {codes[owner[prefix]]!r} "
                                      f"(both stand for {prefix!r})")
            owner[prefix] = i
    shortest = min((len(stands_for(c)[0]) for c in codes), default=0)
    parents: list[str | None] = []
    for i, code in enumerate(codes):
        digits = stands_for(code)[0]
        parent = next((owner[digits[:cut]] for cut in range(len(digits) - 1, 0, -1) if digits[:cut] in owner), None)
        if parent is None and len(digits) > max(2, shortest):
            raise PrefixTreeError(f"{where(i)}: code {code!r} has no parent: none of its prefixes "
                                  f"{digits[:1]!r}..{digits[:-1]!r} is a code")
        parents.append(None if parent is None else codes[parent])
    return parents
