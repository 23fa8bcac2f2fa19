"""One process of tests/test_ternary_multihost.py: a multi-process ternary save (several run on 127.0.0.1, gloo).

Usage: python tests/_ternary_multihost_worker.py PORT NUM_PROCESSES PROCESS_ID LOCAL_DEVICES OUT_DIR

Every process builds the same seeded task vector on a global mesh over all processes' devices, compresses it
(ComPEFT), and saves it with ``mergejax.ternary.save``: each process writes the bitmap shards it holds, process 0
writes the metadata and swaps the directory in. Then each process loads the checkpoint and checks that its own
shards of the bitmaps and the scales round-trip exactly. Prints WORKER_OK at the end.
"""

from __future__ import annotations

import os
import sys

from tests._multihost import cpu_devices, finish, initialize

port, nproc, pid, local = (int(a) for a in sys.argv[1:5])
out = sys.argv[5]
cpu_devices(local)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mergejax import ternary  # noqa: E402

initialize(port, nproc, pid)
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
P = jax.sharding.PartitionSpec


def put(x: np.ndarray, spec: P) -> jax.Array:
    sharding = jax.sharding.NamedSharding(mesh, spec)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


rng = np.random.default_rng(0)
n = len(jax.devices())
tau_np = {"rows": rng.normal(size=(8 * n, 40)).astype(np.float32),  # sharded along the rows
          "cols": rng.normal(size=(6, 64 * n)).astype(np.float32),  # along the packed (last) axis: 2 words a device
          "rep": rng.normal(size=(33,)).astype(np.float32),  # replicated: written once (replica 0)
          "ids": np.arange(5, dtype=np.int32)}
specs = {"rows": P("d"), "cols": P(None, "d"), "rep": P(), "ids": P()}
tau = {k: put(v, specs[k]) for k, v in tau_np.items()}
ttv = ternary.compress(tau, density=0.3)
assert not ttv.mask[0].is_fully_addressable
ternary.save(out, ttv)
files = sorted(os.listdir(out))
assert f"streams-{pid:05d}.bin" in files and not any(f.startswith("shards-") for f in files), files
loaded = ternary.load(out)
for j in range(len(ttv.mask)):
    full_mask, full_sign = np.asarray(loaded.mask[j]), np.asarray(loaded.sign[j])
    for sh, sg in zip(ttv.mask[j].addressable_shards, ttv.sign[j].addressable_shards):
        m = np.asarray(sh.data)
        np.testing.assert_array_equal(full_mask[sh.index], m)
        np.testing.assert_array_equal(full_sign[sh.index] & m, np.asarray(sg.data) & m)
    assert float(loaded.scale[j]) == float(np.asarray(ttv.scale[j].addressable_data(0)))
ternary.save(out, ttv)  # replacing an earlier multi-process checkpoint
print(f"process {pid}: saved {files}", flush=True)
finish()
