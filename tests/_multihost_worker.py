"""One process of the multi-host test (tests/test_multihost.py starts several of these on 127.0.0.1).

Usage: python tests/_multihost_worker.py PORT NUM_PROCESSES PROCESS_ID SEED

Every process builds the same base and fine-tuned trees from SEED with numpy, places them on a global mesh over all
processes' CPU devices with ``jax.make_array_from_callback`` (each process materialises only its own shards), runs
``mergejax.ties`` and ``mergejax.task_arithmetic``, and checks each addressable shard against the plain-numpy
reference (tests/reference.py) computed locally. Exit status 0 and a final ``WORKER_OK`` line mean every check passed.
"""

from __future__ import annotations

import sys

LOCAL_DEVICES = 2

from tests._multihost import cpu_devices, finish, initialize  # noqa: E402

cpu_devices(LOCAL_DEVICES)  # before JAX starts: CPU only, a few fake devices per process

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import mergejax as mj  # noqa: E402
from mergejax import sharding as shd  # noqa: E402
from mergejax.tree import is_float, paths_and_leaves  # noqa: E402
from tests import reference as ref  # noqa: E402

# leaf path -> (shape, dtype, spec); every sharded dimension divides by 8 (up to 4 processes x 2 devices)
LAYOUT = {
    "enc/kernel": ((16, 6), np.float32, P("data")),
    "enc/w": ((6, 16), np.float32, P(None, "data")),
    "emb": ((8, 4), jnp.bfloat16, P("data")),
    "head": ((5, 3), np.float32, P()),
    "scale": ((), np.float32, P()),
    "step": ((8,), np.int32, P("data")),
}


def numpy_tree(rng: np.random.Generator) -> dict:
    """One model as numpy arrays, identical in every process for the same generator state."""
    tree: dict = {"enc": {}}
    for path, (shape, dtype, _) in LAYOUT.items():
        if np.dtype(dtype) == np.int32:
            x = rng.integers(0, 100, size=shape).astype(np.int32)
        else:
            x = np.asarray(rng.standard_normal(shape), np.float32).astype(dtype)
        parts = path.split("/")
        (tree[parts[0]] if len(parts) == 2 else tree)[parts[-1]] = x
    return tree


def to_global(tree: dict, mesh) -> dict:
    """Global jax.Arrays built shard by shard from the process-local numpy tree (no cross-process transfer)."""
    specs = {p: s for p, (_, _, s) in LAYOUT.items()}

    def leaf(kp, x):
        path = "/".join(str(k.key) for k in kp)
        sharding = NamedSharding(mesh, specs[path])
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx], dtype=x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, tree)


def expected(base: dict, fts: list[dict], merged_float_leaves: list[np.ndarray], scale: float) -> dict:
    it = iter(merged_float_leaves)

    def leaf(b):
        if not is_float(b):
            return b
        return (b.astype(np.float32) + np.float32(scale) * next(it)).astype(b.dtype)

    return jax.tree.map(leaf, base)


def check_shards(name: str, got: dict, want: dict, inputs: dict) -> int:
    """Compares every addressable shard of ``got`` with the same slice of ``want``; returns the number checked."""
    n = 0
    for (path, g), (_, w), (_, x) in zip(paths_and_leaves(got), paths_and_leaves(want), paths_and_leaves(inputs)):
        assert g.dtype == w.dtype, f"{name} {path}: dtype {g.dtype} != {w.dtype}"
        assert g.sharding.is_equivalent_to(x.sharding, g.ndim), f"{name} {path}: sharding {g.sharding} != {x.sharding}"
        for shard in g.addressable_shards:
            a = np.asarray(shard.data, np.float32)
            b = np.asarray(w[shard.index], np.float32)
            tol = 1e-2 if g.dtype == jnp.bfloat16 else 1e-5
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=f"{name} {path} shard {shard.index}")
            n += 1
    return n


def main(port: int, num_processes: int, process_id: int, seed: int) -> None:
    initialize(port, num_processes, process_id)
    assert jax.process_count() == num_processes and jax.process_index() == process_id
    assert jax.device_count() == LOCAL_DEVICES * num_processes, jax.devices()
    assert shd.is_primary() == (process_id == 0)

    mesh = shd.make_mesh()  # every process's devices on one axis "data"
    rng = np.random.default_rng(seed)
    base_np = numpy_tree(rng)
    fts_np = [numpy_tree(rng) for _ in range(3)]
    base = to_global(base_np, mesh)
    fts = [to_global(ft, mesh) for ft in fts_np]
    assert not base["enc"]["kernel"].is_fully_addressable

    tvs = [
        [np.asarray(f, np.float32) - np.asarray(b, np.float32) for (_, f), (_, b) in zip(paths_and_leaves(ft), paths_and_leaves(base_np)) if is_float(b)]
        for ft in fts_np
    ]
    checked = 0
    want = expected(base_np, fts_np, ref.ties_tv(tvs, 0.3, "global", "sum", "mean"), 0.9)
    checked += check_shards("ties", mj.ties(base, fts, density=0.3, scale=0.9), want, base)
    summed = [sum(tl[i] for tl in tvs) for i in range(len(tvs[0]))]
    want = expected(base_np, fts_np, summed, 0.4)
    checked += check_shards("task_arithmetic", mj.task_arithmetic(base, fts, scale=0.4), want, base)
    print(f"process {process_id}: {checked} shards checked", flush=True)
    finish()


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(*(int(a) for a in sys.argv[1:]))
