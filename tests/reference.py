"""Independent plain-numpy references of the data-free merge methods, written from the papers' formulas.

Everything works on flat float32 vectors (one per float leaf), uses sorting (not counting) to find thresholds, and
loops over tasks explicitly, so it shares no code path with mergejax.
"""

from __future__ import annotations

import math

import numpy as np


def floor_rank(fraction: float, n: int) -> int:
    return math.floor(round(fraction * n, 6))


def kth_largest(values: np.ndarray, k: int) -> float:
    return np.sort(values.ravel())[::-1][k - 1]


def trim(leaves: list[np.ndarray], density: float, scope: str) -> list[np.ndarray]:
    """TIES step 1: keep |x| >= k-th largest magnitude (global over all leaves, or per leaf)."""
    if scope == "global":
        allmag = np.concatenate([np.abs(x).ravel() for x in leaves]) if leaves else np.zeros(0)
        k = floor_rank(density, allmag.size)
        t = np.inf if k == 0 else kth_largest(allmag, k)
        return [np.where(np.abs(x) >= t, x, 0).astype(x.dtype) for x in leaves]
    out = []
    for x in leaves:
        k = floor_rank(density, x.size)
        t = np.inf if k == 0 else kth_largest(np.abs(x), k)
        out.append(np.where(np.abs(x) >= t, x, 0).astype(x.dtype))
    return out


def elect(task_leaves: list[list[np.ndarray]], method: str) -> list[np.ndarray]:
    """TIES Eq. 2 with the reference code's majority sign for zero sums."""
    n_leaves = len(task_leaves[0])
    gammas = []
    for i in range(n_leaves):
        xs = [tl[i] for tl in task_leaves]
        if method == "sum":
            mass = xs[0].copy()
            for x in xs[1:]:
                mass = mass + x
        else:
            mass = np.sign(xs[0])
            for x in xs[1:]:
                mass = mass + np.sign(x)
        gammas.append(np.sign(mass))
    total = sum(float(np.sum(g, dtype=np.float64)) for g in gammas)
    majority = np.sign(total)
    return [np.where(g == 0, majority, g).astype(np.float32) for g in gammas]


def disjoint(task_leaves: list[list[np.ndarray]], gammas: list[np.ndarray], reduce: str) -> list[np.ndarray]:
    """TIES Eq. 3: aggregate the entries agreeing with the elected sign."""
    out = []
    for i, g in enumerate(gammas):
        xs = [tl[i] for tl in task_leaves]
        sel = [np.where((np.sign(x) == g) & (x != 0), x, 0).astype(np.float32) for x in xs]
        if reduce == "max":
            res = sel[0].copy()
            for s in sel[1:]:
                res = np.where(np.abs(s) > np.abs(res), s, res)
        else:
            res = sel[0].copy()
            for s in sel[1:]:
                res = res + s
            if reduce == "mean":
                cnt = sum((s != 0).astype(np.float32) for s in sel)
                res = res / np.maximum(cnt, 1)
        out.append(res)
    return out


def ties_tv(task_leaves, density, scope, sign_method, reduce):
    trimmed = [trim(tl, density, scope) for tl in task_leaves]
    return disjoint(trimmed, elect(trimmed, sign_method), reduce)


def breadcrumbs_mask(x: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    a = np.abs(x).reshape(x.shape if x.ndim else (1,))
    rows = a.reshape(-1, a.shape[-1])
    m = rows.shape[-1]
    k_top, k_end = floor_rank(gamma, m), min(floor_rank(gamma + beta, m), m)
    keep = np.zeros_like(rows, bool)
    for r in range(rows.shape[0]):
        srt = np.sort(rows[r])[::-1]
        lo = srt[k_end - 1] if k_end > 0 else np.inf
        hi = srt[k_top - 1] if k_top > 0 else np.inf
        keep[r] = (rows[r] >= lo) & (rows[r] < hi)
    return keep.reshape(x.shape)


def pcb_tv(task_leaves: list[list[np.ndarray]], ratio: float, r: float = 1e-4) -> list[np.ndarray]:
    """PCB-Merging over whole-model rows, following the paper's Eqs. 3-7 with sorted-position quantiles."""
    sizes = [x.size for x in task_leaves[0]]
    rows = np.stack([np.concatenate([x.ravel() for x in tl]) for tl in task_leaves]).astype(np.float32)
    T, n = rows.shape
    srt = np.sort(np.abs(rows), axis=1)
    lo = srt[:, int(n * r)][:, None]
    hi = srt[:, max(int(round(n * (1 - r), 6)) - 1, 0)][:, None]
    a = np.clip(np.abs(rows), lo, hi)
    width = hi - lo
    norm = np.where(width > 0, (a - lo) / np.where(width > 0, width, 1), 0)
    beta = np.exp(T * norm**2) * np.tanh(rows * rows.sum(axis=0, keepdims=True))
    q = np.sort(beta, axis=1)[:, floor_rank(1 - ratio, n)][:, None]
    top = beta.max(axis=1, keepdims=True)
    c = np.maximum(beta, q)
    w = np.where(top - q > 0, (c - q) / np.where(top - q > 0, top - q, 1), 0)
    merged = (w * np.sign(rows) * a).sum(0) / np.maximum(w.sum(0), 1e-12)
    out, off = [], 0
    for x, s in zip(task_leaves[0], sizes):
        out.append(merged[off : off + s].reshape(x.shape).astype(np.float32))
        off += s
    return out
