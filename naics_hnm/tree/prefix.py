"""The tree of a digit-code taxonomy without a parent column, inferred from code prefixes.

The parent of a code is the longest proper prefix that is itself a code. A merged range written
``LO-HI`` (NAICS ``31-33``) stands for every prefix in the range (``31``, ``32``, ``33``) and
takes its own parent from the prefixes of ``LO``. A code with no prefix among the codes is top
level when it has at most two digits or is one of the shortest codes of the taxonomy (so
``1 -> 11 -> 111`` and ``11 -> 111`` trees both work); a longer code without one is an error.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

_RANGE = re.compile(r"^(\d+)-(\d+)$")
_DIGITS = re.compile(r"^\d+$")


class PrefixTreeError(ValueError):
    """A code or a set of codes that the digit-prefix rule cannot place."""


def is_prefix_code(code: str) -> bool:
    """Digits, or a ``LO-HI`` digit range."""
    return bool(_DIGITS.match(code) or _RANGE.match(code))


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
    """Parent code of each code (None = top level) by the digit-prefix rule.

    ``where(i)`` names code i's row in error messages. Raises :class:`PrefixTreeError` for a code
    that is not digits or a digit range, two codes standing for the same prefix, or a long code
    whose prefixes are not codes.
    """
    owner: dict[str, int] = {}
    for i, code in enumerate(codes):
        if not is_prefix_code(code):
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
