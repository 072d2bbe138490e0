"""A fingerprint of a code list: identifies an id space (order included) in index and embeddings files."""

from __future__ import annotations

import hashlib
from typing import Sequence


def codes_fingerprint(codes: Sequence[str]) -> str:
    """sha256 of the newline-joined code list: identifies an id space (order included)."""
    digest = hashlib.sha256()
    for start in range(0, len(codes), 65536):
        chunk = "\n".join(codes[start : start + 65536])
        digest.update((("\n" if start else "") + chunk).encode())
    return digest.hexdigest()
