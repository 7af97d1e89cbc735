"""Arithmetic whose bits do not depend on shapes, threads or BLAS: the embedding explainer's and
simulator's cosines and sums.

BLAS picks kernels, and so summation orders, by matrix shape and thread count (a unit alone is a
different shape from a unit in its shard), so no float product is left to it: cosines are `cosines`,
exact integer arithmetic on vectors rounded to a 2**-24 grid, and every other sum is `fixed_sum`
or `fixed_matmul`, in index order. An entry depends only on its own row and column.
"""

from __future__ import annotations

import numpy as np


def fixed_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a (M, D) @ b (D, N) in float64, each entry summed over D in index order, one rounded multiply
    and one rounded add per term (numpy ufuncs: no FMA, no blocking). Entry (i, j) depends on row i
    of a and column j of b alone: not on M, N, the other rows and columns, threads or BLAS."""
    a = np.ascontiguousarray(np.asarray(a, dtype=np.float64).T)  # (D, M): row k is a's column k
    b = np.asarray(b, dtype=np.float64)
    out = np.zeros((a.shape[1], b.shape[1]))
    term = np.empty_like(out)
    for k in range(a.shape[0]):
        np.multiply(a[k][:, None], b[k][None, :], out=term)
        out += term
    return out


GRID = 2.0**24  # unit vectors' components are rounded to multiples of 1/GRID before a cosine


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a (M, D) @ b (D, N) for unit rows of a and unit columns of b, exactly, at BLAS speed.

    Each component is rounded to a multiple of 2**-24 (at most 3e-8 away, about float32's resolution
    at 1), so every product is an integer below 2**48 in float64, and by Cauchy-Schwarz every partial
    sum, in whatever order or blocking a BLAS kernel adds them, is an integer below 2**49: no step
    rounds, so the result does not depend on the order, the shape or the thread count."""
    return quantised_cosines(quantise(a, axis=1), quantise(b, axis=0))


def quantise(x: np.ndarray, axis: int) -> tuple[np.ndarray, float]:
    """x on the 2**-24 grid, and the largest norm of its vectors along `axis` (for `cosines`);
    compute it once for a matrix that many calls use."""
    q = np.rint(np.asarray(x, dtype=np.float64) * GRID)
    return q, float(np.sqrt((q * q).sum(axis).max())) if q.size else 0.0


def quantised_cosines(a: tuple[np.ndarray, float], b: tuple[np.ndarray, float]) -> np.ndarray:
    (qa, na), (qb, nb) = a, b
    if not na * nb < 2.0**52:  # also catches NaN
        raise ValueError(f"cosines() needs unit vectors: |a||b| = {na * nb / GRID**2:.3g}")
    with _one_blas_thread():
        return (qa @ qb) / (GRID * GRID)


_controller = None


def _one_blas_thread():
    """The products here are small (a unit's words against its few explanations) and many; on two
    cores shared with the other tasks of a flow, BLAS's second thread made them 4-7x slower
    (`bench/RESULTS.md`). The result is exact either way."""
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
    return _controller.limit(limits=1, user_api="blas")


def fixed_sum(x: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in index order, in float64 (numpy's own reduction order depends on the shape:
    pairwise along a contiguous axis, row by row across columns)."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros(x.shape[1:])
    for row in x:
        out += row
    return out


def fixed_mean_std(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (population) standard deviation over axis 0, with `fixed_sum`."""
    n = len(x)
    mean = fixed_sum(x) / n
    return mean, np.sqrt(fixed_sum((np.asarray(x, dtype=np.float64) - mean) ** 2) / n)
