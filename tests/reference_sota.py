"""Independent plain-numpy references of the newer data-free merges, written from the official code.

Each follows the loop structure of its reference (FusionBench ``TSVM_utils.compute_and_sum_svd_mem_reduction``,
``iso_utils.iso_c``/``iso_cts``, ``wudi.wudi_merging``, JH-GEECS/CART, ``emr_merging.utils.emr_merge``,
nik-dim/tall_masks, mergekit ``della_magprune``, FusionBench ``model_stock``): zero-filled buffers written slice by
slice, SVDs in float64 (numpy), Adam written out by hand. Two documented mergejax conventions are mirrored so the
comparison is exact on rank-deficient inputs: singular directions with sigma <= max(m, n) * eps32 * scale are
dropped before / inside the polar factors (see mergejax.ops.svd), and TSV's k is r // T.
"""

from __future__ import annotations

import math

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)


def _svd(x):
    return np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)


def _polar(a):
    u, s, vh = _svd(a)
    tol = max(a.shape) * EPS32 * (s.max() if s.size else 0.0)
    return (u[:, s > tol]) @ vh[s > tol]


def tsv(mats: list[np.ndarray]) -> np.ndarray:
    """FusionBench TSV-M on one matrix: sum_u/sum_s/sum_vh buffers, slice i*k:(i+1)*k per task."""
    T = len(mats)
    m, n = mats[0].shape
    r = min(m, n)
    k = r // T
    sum_u = np.zeros((m, r))
    sum_s = np.zeros(r)
    sum_vh = np.zeros((r, n))
    for i, x in enumerate(mats):
        u, s, vh = _svd(x)
        tol = max(m, n) * EPS32 * s.max()
        for j in range(k):
            if s[j] > tol:
                sum_u[:, i * k + j] = u[:, j]
                sum_s[i * k + j] = s[j]
                sum_vh[i * k + j, :] = vh[j, :]
    if k == 0:
        return np.zeros((m, n))
    return _polar(sum_u) @ np.diag(sum_s) @ _polar(sum_vh)


def iso_c(mats):
    total = np.sum(np.asarray(mats, np.float64), axis=0)
    u, s, vh = _svd(total)
    tol = max(total.shape) * EPS32 * s.max()
    keep = s > tol
    return u[:, keep] @ np.diag(np.full(keep.sum(), s.mean())) @ vh[keep]


def iso_cts(mats, common_space_fraction=0.8):
    """FusionBench iso_cts on one (out, in) matrix."""
    T = len(mats)
    shape_ = mats[0].shape
    r = min(shape_)
    common = int(r * common_space_fraction)
    total_ts = round((r - common) / T) * T
    if total_ts > r:
        total_ts = (r // T) * T
    common = r - total_ts
    combined = np.sum(np.asarray(mats, np.float64), axis=0)
    u, s, v = _svd(combined)
    live = s[:common] > max(shape_) * EPS32 * s.max()
    cu, cs, cv = u[:, :common] * live, s[:common] * live, v[:common, :] * live[:, None]
    n_dims = total_ts // T
    comb_u = np.zeros((shape_[0], r))
    comb_s = np.zeros(r)
    comb_v = np.zeros((r, shape_[1]))
    for i, w in enumerate(mats):
        w = np.asarray(w, np.float64)
        w_ts = w - cu @ cu.T @ w
        ut, st, vt = _svd(w_ts)
        tol = max(shape_) * EPS32 * np.linalg.norm(w)
        for j in range(n_dims):
            if st[j] > tol:
                comb_u[:, i * n_dims + j] = ut[:, j]
                comb_s[i * n_dims + j] = st[j]
                comb_v[i * n_dims + j, :] = vt[j, :]
    comb_u[:, T * n_dims : T * n_dims + common] = cu
    comb_s[T * n_dims : T * n_dims + common] = cs
    comb_v[T * n_dims : T * n_dims + common, :] = cv
    return comb_s.mean() * (_polar(comb_u) @ _polar(comb_v))


def cart(mats, rank_ratio=0.12, coeff=2.0):
    """theta_avg + coeff * sum_i lowrank(theta_i - theta_avg), in task-vector form."""
    mats = [np.asarray(x, np.float64) for x in mats]
    avg = sum(mats) / len(mats)
    dim = min(avg.shape)
    k = max(1, math.floor(round(rank_ratio * dim, 6)))
    out = avg.copy()
    for x in mats:
        u, s, vh = _svd(x - avg)
        out += coeff * (u[:, :k] * s[:k]) @ vh[:k]
    return out


def wudi(mats, iter_num=300, lr=1e-5, squared=True):
    """FusionBench/official WUDI on one (out, in) matrix: the literal loss's gradient and torch's Adam, float64."""
    tvs = np.asarray(mats, np.float64)
    merged = tvs.sum(0)
    norms = np.sum(tvs.reshape(len(tvs), -1) ** 2, axis=1)
    if not squared:
        norms = np.sqrt(norms)
    b1, b2, eps = 0.9, 0.999, 1e-8
    m = np.zeros_like(merged)
    v = np.zeros_like(merged)
    for step in range(1, iter_num + 1):
        grad = np.zeros_like(merged)
        for t in range(len(tvs)):
            if norms[t] == 0:
                continue
            product = (merged - tvs[t]) @ tvs[t].T  # d/dmerged of ||product||^2 / n = 2 product tau / n
            grad += 2.0 * product @ tvs[t] / norms[t]
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad * grad
        mhat = m / (1 - b1**step)
        vhat = v / (1 - b2**step)
        merged = merged - lr * mhat / (np.sqrt(vhat) + eps)
    return merged


def emr(task_leaves: list[list[np.ndarray]]):
    """FusionBench emr_merge: (unified leaves, masks[t][leaf], rescalers[t])."""
    T = len(task_leaves)
    L = len(task_leaves[0])
    unified, masks = [], [[None] * L for _ in range(T)]
    scales = np.zeros(T)
    for n in range(L):
        s = sum(np.asarray(tl[n], np.float64) for tl in task_leaves)
        flag = (s > 0) * 2 - 1
        pmax = np.zeros_like(s)
        for t in range(T):
            p = np.asarray(task_leaves[t][n], np.float64)
            mask = (p * flag) > 0
            masks[t][n] = mask
            pa = np.abs(mask * p)
            pmax = np.where(pa > pmax, pa, pmax)
            scales[t] += np.mean(np.abs(p))
        unified.append(pmax * flag)
    new = np.zeros(T)
    for t in range(T):
        for n in range(L):
            new[t] += np.mean(np.abs(unified[n] * masks[t][n]))
    resc = np.where(new > 0, scales / np.where(new > 0, new, 1), 0.0)
    return unified, masks, resc


def tall_masks(task_leaves, lam, mtl_leaves=None):
    """|tau_t| > lam * |tau_MTL - tau_t| (nik-dim/tall_masks), tau_MTL = sum_t tau_t unless given."""
    if mtl_leaves is None:
        mtl_leaves = [sum(np.asarray(tl[n], np.float64) for tl in task_leaves) for n in range(len(task_leaves[0]))]
    return [
        [np.abs(np.asarray(x, np.float64)) > lam * np.abs(mtl_leaves[n] - x) for n, x in enumerate(tl)]
        for tl in task_leaves
    ], mtl_leaves


def consensus(task_leaves, lam, k=2, mtl_leaves=None):
    masks, mtl = tall_masks(task_leaves, lam, mtl_leaves)
    out = []
    for n in range(len(mtl)):
        count = sum(m[n].astype(np.float64) for m in masks)
        out.append(mtl[n] * (count >= k))
    return out


def della(x: np.ndarray, u: np.ndarray, density: float, epsilon: float, rows_axis_last: bool = True, rescale="inverse"):
    """mergekit della_magprune with the uniform draws ``u`` given (keep where u < p): ranks along the last axis."""
    x = np.asarray(x, np.float64)
    shape = x.shape
    a = x.reshape(1, -1) if x.ndim < 2 else x.reshape(-1, shape[-1])
    uu = np.asarray(u, np.float64).reshape(a.shape)
    n = a.shape[1]
    ranks = np.argsort(np.argsort(np.abs(a), axis=1, kind="stable"), axis=1, kind="stable").astype(np.float64)
    rn = ranks / (n - 1) if n > 1 else np.ones_like(ranks)
    p = (density - epsilon) + rn * 2 * epsilon
    keep = uu < p
    if rescale == "inverse":
        out = np.where(keep, a / p, 0.0)
    else:
        masked = np.where(keep, a, 0.0)
        before, after = np.abs(a).sum(), np.abs(masked).sum()
        out = masked * (before / after) if after > 0 else masked
    return out.reshape(shape)


def model_stock(xs: list[np.ndarray], eps: float = 1e-8) -> np.ndarray:
    """FusionBench ModelStock on one leaf, in task-vector form: t * mean(tau), t from the mean pairwise angle."""
    xs = [np.asarray(x, np.float64) for x in xs]
    N = len(xs)
    angles = []
    for i in range(N):
        for j in range(i + 1, N):
            a, b = xs[i].ravel(), xs[j].ravel()
            c = np.sum(a * b) / (math.sqrt(np.sum(a * a) * np.sum(b * b)) + eps)
            angles.append(math.degrees(math.acos(min(max(c, -1.0), 1.0))))
    ang = math.radians(sum(angles) / len(angles))
    t = N * math.cos(ang) / ((N - 1) * math.cos(ang) + 1 + eps)
    return t * (sum(xs) / N)
