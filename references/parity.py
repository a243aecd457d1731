"""Comparison of our outputs with a reference's."""

from __future__ import annotations

import numpy as np


def assert_close(ours, expected, rtol: float = 1e-4) -> float:
    """Relative error w.r.t. the largest reference magnitude (returned); also checks the reference is not degenerate
    (it varies, and varies over positions)."""
    ours, expected = np.asarray(ours), np.asarray(expected)
    assert ours.shape == expected.shape
    assert expected.std() > 0.1 and np.abs(np.diff(expected, axis=-2)).max() > 0.1  # varies over positions
    err = np.abs(ours - expected).max() / np.abs(expected).max()
    assert err <= rtol, f"max relative error {err:.3g}"
    return err


def relative_error(ours, ref) -> float:
    """max |ours - ref| / max |ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())
