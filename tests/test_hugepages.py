"""Huge-page arrays are ordinary arrays: aligned where large, equal values, usable by torch."""

from __future__ import annotations

import numpy as np
import torch

from naics_hnm.hugepages import HUGE_PAGE, MIN_BYTES, hugepage_empty, on_hugepages


def test_large_arrays_are_aligned_and_hold_the_values():
    x = np.random.default_rng(0).standard_normal((MIN_BYTES // 4 // 8 + 10, 8)).astype(np.float32)
    y = on_hugepages(x)
    assert y.shape == x.shape and y.dtype == x.dtype and y.flags.c_contiguous
    assert y.ctypes.data % HUGE_PAGE == 0
    np.testing.assert_array_equal(y, x)
    assert torch.equal(torch.from_numpy(y)[[3, 1]], torch.from_numpy(x)[[3, 1]])


def test_small_arrays_are_plain():
    a = hugepage_empty((10, 3), np.int32)
    assert a.shape == (10, 3) and a.dtype == np.int32
