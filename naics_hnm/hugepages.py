"""Large per-code arrays on transparent huge pages (2 MiB-aligned, ``MADV_HUGEPAGE`` on Linux), so random reads stay
in the TLB; elsewhere, or for small arrays, a plain ``numpy.empty``. The result is an ordinary numpy array either way.
"""

from __future__ import annotations

import ctypes
import logging
import math
import sys

import numpy as np

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
MIN_BYTES = 4 << 20
_MADV_HUGEPAGE = 14
_libc = None


def _madvise(address: int, length: int) -> bool:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), _MADV_HUGEPAGE) == 0


def hugepage_empty(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """An uninitialised C-contiguous array, 2 MiB-aligned and advised to use huge pages on Linux."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MIN_BYTES or not sys.platform.startswith("linux"):
        return np.empty(shape, dtype)
    buffer = np.empty(nbytes + HUGE_PAGE, dtype=np.uint8)
    offset = (-buffer.ctypes.data) % HUGE_PAGE
    array = buffer[offset:offset + nbytes].view(dtype).reshape(shape)
    if not _madvise(array.ctypes.data, nbytes - nbytes % HUGE_PAGE or nbytes):
        log.debug("madvise(MADV_HUGEPAGE) refused for %d bytes (errno %d): ordinary pages", nbytes, ctypes.get_errno())
    return array


def on_hugepages(array: np.ndarray) -> np.ndarray:
    """A huge-page copy of ``array`` (same shape, dtype and values)."""
    out = hugepage_empty(array.shape, array.dtype)
    out[...] = array
    return out
