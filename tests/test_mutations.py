"""Tests that catch the mutations issue 13's audit found surviving (public API only, numpy expectations).

Each test names the mutation it kills. Inputs are built so that the float32 computation is exact (bf16 values on a
bounded grid, power-of-two scales and counts), which makes "bit-exact against float32 cast to bf16" a sharp and
stable assertion: any step done in bf16 (a bf16 sum, a bf16 final add) rounds and shows up.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import mergejax as mj
from mergejax.regmean import regmean_kernel
from tests import reference as ref

BF16 = np.dtype(ml_dtypes.bfloat16)


def _grid_bf16(rng: np.random.Generator, shape, scale: float = 2.0) -> np.ndarray:
    """bf16 values with |x| in [2^-8, 8): multiples of 2^-15 spanning 18 bits, so sums of <= 32 are exact in f32."""
    x = rng.normal(size=shape) * scale
    x = np.where(np.abs(x) < 2.0**-8, np.sign(x + 1e-30) * 2.0**-8, x)
    return np.clip(x, -7.9, 7.9).astype(BF16)


def _f32(x) -> np.ndarray:
    return np.asarray(x).astype(np.float32)


def _ordered(x: np.ndarray) -> np.ndarray:
    """bf16 bit patterns mapped to integers that count ulps (monotone in the value)."""
    bits = np.asarray(x, BF16).view(np.uint16).astype(np.int32)
    return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)


def _ulps(a, b) -> np.ndarray:
    return np.abs(_ordered(np.asarray(a)) - _ordered(np.asarray(b)))


def _models(seed: int, n: int, shape=(32, 64)):
    rng = np.random.default_rng(seed)
    base = {"w": _grid_bf16(rng, shape), "b": _grid_bf16(rng, shape[-1:])}
    fts = [{k: (_f32(v) + _f32(_grid_bf16(rng, v.shape, 0.5))).astype(BF16) for k, v in base.items()}
           for _ in range(n)]
    return base, fts


# ------------------------------------------------------------------------------------------------- TIES sign rule
@pytest.mark.parametrize("sign_method", ["sum", "count"])
def test_ties_zero_sum_takes_the_models_majority_sign_not_plus(sign_method):
    """Kills: electing + on an exact zero sum (mergekit/PEFT), and taking the majority per leaf instead of per model.

    Leaf "a" alone has a positive majority, the whole model a negative one; coordinates where +c and -c cancel
    (by sum and by count) must take the model's negative sign.
    """
    base = {"a": jnp.zeros(4), "b": jnp.zeros(6)}
    t1 = {"a": jnp.array([1.0, 1.5, 2.5, 1.0]), "b": jnp.array([-3.0, -2.0, -1.0, -4.0, -1.0, 1.0])}
    t2 = {"a": jnp.array([1.0, 0.5, -2.5, -1.0]), "b": jnp.array([-1.0, -2.0, -1.0, -4.0, -3.0, 1.0])}
    fts = [jax.tree.map(jnp.add, base, t) for t in (t1, t2)]
    merged = mj.ties(base, fts, density=1.0, sign_method=sign_method)
    # elected: a -> [+, +, 0, 0] (cancelling), b -> [-, -, -, -, -, +]; model: 3 plus vs 5 minus -> zeros take "-"
    np.testing.assert_array_equal(np.asarray(merged["a"]), [1.0, 1.0, -2.5, -1.0])
    np.testing.assert_array_equal(np.asarray(merged["b"]), [-2.0, -2.0, -1.0, -4.0, -2.0, 1.0])
    tl = [[np.asarray(t["a"]), np.asarray(t["b"])] for t in (t1, t2)]  # and the independent numpy reference
    want = ref.ties_tv(tl, 1.0, "global", sign_method, "mean")
    np.testing.assert_array_equal(np.asarray(merged["a"]), want[0])
    np.testing.assert_array_equal(np.asarray(merged["b"]), want[1])


def test_ties_zero_sum_with_positive_majority_takes_plus():
    """The same rule mirrored (so a hard-coded '-' would fail too)."""
    base = {"a": jnp.zeros(5)}
    ft = [{"a": jnp.array([2.0, 1.0, 1.0, 3.0, -1.0])}, {"a": jnp.array([-2.0, 1.0, 1.0, 1.0, -1.0])}]
    np.testing.assert_array_equal(np.asarray(mj.ties(base, ft, density=1.0)["a"]), [2.0, 1.0, 1.0, 2.0, -1.0])


# ---------------------------------------------------------------------------------------------- bf16 bit-exactness
def test_average_bf16_is_bit_exact_against_float32():
    """Kills: summing the models in bf16 (rtol/atol 1e-2 hid it)."""
    _, models = _models(0, 4)
    got = mj.average(models)
    for k in ("w", "b"):
        want = (sum(_f32(m[k]) for m in models) / 4).astype(BF16)
        assert np.asarray(got[k]).dtype == BF16
        np.testing.assert_array_equal(np.asarray(got[k]).view(np.uint16), want.view(np.uint16))


def test_task_arithmetic_bf16_is_bit_exact_against_float32():
    """Kills: the final base + lambda * tau done in bf16 (tau rounded to bf16 first)."""
    base, fts = _models(1, 3)
    got = mj.task_arithmetic(base, fts, scale=0.5)
    for k in base:
        tau = sum(_f32(f[k]) - _f32(base[k]) for f in fts)
        want = (_f32(base[k]) + np.float32(0.5) * tau).astype(BF16)
        np.testing.assert_array_equal(np.asarray(got[k]).view(np.uint16), want.view(np.uint16))


def test_ties_bf16_is_bit_exact_against_float32():
    """Kills: a bf16 final add or a bf16 disjoint mean in TIES."""
    base, fts = _models(2, 3)
    got = mj.ties(base, fts, density=0.3)
    keys = sorted(base)  # the library flattens dicts in sorted-key order; the global trim spans both leaves
    tl = [[_f32(f[k]) - _f32(base[k]) for k in keys] for f in fts]
    tv = ref.ties_tv(tl, 0.3, "global", "sum", "mean")
    for k, t in zip(keys, tv):
        want = (_f32(base[k]) + t).astype(BF16)
        ulps = _ulps(np.asarray(got[k]), want)
        assert ulps.max() <= 1, (k, ulps.max())
        assert (ulps == 0).mean() >= 0.999, (k, (ulps == 0).mean())  # disjoint mean /3 rounds once in f32


def test_fisher_merge_bf16_checks_values():
    """Kills: a Fisher merge that returns bf16 of the wrong values (the old test checked only the dtype)."""
    _, models = _models(3, 4)
    rng = np.random.default_rng(4)
    fishers = [{k: (2.0 ** rng.integers(-2, 3, size=v.shape)).astype(np.float32) for k, v in m.items()}
               for m in models]
    got = mj.fisher_merge(models, fishers)
    for k in models[0]:
        num = sum(np.float32(0.25) * f[k] * _f32(m[k]) for m, f in zip(models, fishers))
        den = sum(np.float32(0.25) * f[k] for f in fishers)
        want = (num / den).astype(BF16)
        assert np.asarray(got[k]).dtype == BF16
        ulps = _ulps(np.asarray(got[k]), want)
        assert ulps.max() <= 1 and (ulps == 0).mean() >= 0.99, (k, ulps.max(), (ulps == 0).mean())


# ------------------------------------------------------------------------------------------------ RegMean fallback
def test_regmean_singular_gram_solves_reachable_rows_by_least_squares():
    """Kills: 'the Gram is singular, so average the whole kernel'. Inputs never reach features 3..5 (always 0)."""
    rng = np.random.default_rng(5)
    n_in, n_out, reach = 6, 4, 3
    xs = [np.concatenate([rng.normal(size=(20, reach)), np.zeros((20, n_in - reach))], 1).astype(np.float32)
          for _ in range(3)]
    ws = [rng.normal(size=(n_in, n_out)).astype(np.float32) for _ in range(3)]
    grams = [jnp.asarray(x.T @ x) for x in xs]
    got = np.asarray(regmean_kernel(grams, [jnp.asarray(w) for w in ws]))
    # min_W sum_i ||X_i W - X_i W_i||^2 over the reachable rows: one stacked least-squares problem
    a = np.concatenate([x[:, :reach] for x in xs]).astype(np.float64)
    b = np.concatenate([x.astype(np.float64) @ w for x, w in zip(xs, ws)])
    want_rows = np.linalg.lstsq(a, b, rcond=None)[0]
    np.testing.assert_allclose(got[:reach], want_rows, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(got[reach:], np.mean(ws, 0)[reach:], rtol=1e-6, atol=1e-6)
    assert not np.allclose(got[:reach], np.mean(ws, 0)[:reach], atol=1e-2)  # the two answers do differ here


# ---------------------------------------------------------------------------------------------- Breadcrumbs ties
def test_breadcrumbs_tied_rows_fall_on_one_side_of_both_band_edges():
    """Kills: breaking magnitude ties by position. gamma=0.2, beta=0.5, m=10 -> drop ranks 1-2, keep ranks 3-7.

    Every row has a tie straddling rank 2 (top edge: all copies dropped) and one straddling rank 7 (low edge: all
    copies kept), at different positions and with mixed signs.
    """
    mags = np.array([9.0, 8.0, 8.0, 7.0, 6.0, 5.0, 4.0, 4.0, 3.0, 2.0], np.float32)
    rng = np.random.default_rng(6)
    rows = []
    for _ in range(6):
        perm = rng.permutation(10)
        rows.append(mags[perm] * rng.choice([-1.0, 1.0], size=10))
    tv = np.stack(rows).astype(np.float32)
    base = {"w": jnp.zeros_like(tv)}
    got = np.asarray(mj.breadcrumbs(base, [{"w": jnp.asarray(tv)}], beta=0.5, gamma=0.2)["w"])
    for r, row in enumerate(tv):
        a = np.abs(row)
        kept = got[r] != 0
        assert not kept[a >= 8.0].any(), f"row {r}: an entry tied at the top edge (|x| = 8) was kept"
        assert kept[a == 4.0].all(), f"row {r}: an entry tied at the low edge (|x| = 4) was dropped"
        np.testing.assert_array_equal(kept, (a >= 4.0) & (a < 8.0), err_msg=f"row {r}")
        np.testing.assert_array_equal(got[r][kept], row[kept])
    np.testing.assert_array_equal(got != 0, ref.breadcrumbs_mask(tv, 0.5, 0.2))


# --------------------------------------------------------------------------------------------- identical models
@pytest.mark.parametrize("n", [1, 3, 4])
def test_merging_identical_models_returns_the_model(n):
    """Kills: any method that does not reduce to the model itself when every fine-tuned model is the same."""
    base, (ft,) = _models(7, 1)
    models = [ft] * n
    fishers = [jax.tree.map(lambda x: np.full(x.shape, 0.5 + i, np.float32), ft) for i in range(n)]
    results = {
        "average": mj.average(models),
        "task_arithmetic": mj.task_arithmetic(base, models, scale=1.0 / n) if n != 3 else None,
        "ties": mj.ties(base, models, density=1.0),
        "dare": mj.dare(base, models, key=jax.random.key(0), drop_rate=0.0, scale=1.0 / n) if n != 3 else None,
        "fisher": mj.fisher_merge(models, fishers),
    }
    for name, merged in results.items():
        if merged is None:  # 1/3 is not exact in float32: covered with n = 1 and 4
            continue
        for k in ft:
            got, want = np.asarray(merged[k]), np.asarray(ft[k])
            assert got.dtype == want.dtype, name
            assert _ulps(got, want).max() <= (1 if name == "fisher" else 0), (name, k)
