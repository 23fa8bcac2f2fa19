"""One process of tests/test_stream.py's multi-host merge (several of these run on 127.0.0.1 with gloo).

Usage: python tests/_stream_multihost_worker.py PORT NUM_PROCESSES PROCESS_ID LOCAL_DEVICES CKPT_DIR OUT_DIR

Each process loads only its own slices of the safetensors checkpoints CKPT_DIR/{base,ft0,ft1,...} onto a global mesh
(``mergejax.stream.load_sharded``), TIES-merges (global trim) and DARE-merges them with the in-memory operators, and
saves both with orbax from every process (each writes its shards, process 0 commits). Prints WORKER_OK at the end.
"""

from __future__ import annotations

import sys

from tests._multihost import cpu_devices, finish, initialize

port, nproc, pid, local = (int(a) for a in sys.argv[1:5])
ckpt, out = sys.argv[5], sys.argv[6]
cpu_devices(local)

import jax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from pathlib import Path  # noqa: E402

import mergejax as mj  # noqa: E402
from mergejax import sharding as shd  # noqa: E402
from mergejax.stream import load_sharded  # noqa: E402

initialize(port, nproc, pid)
mesh = shd.make_mesh()
paths = sorted(p for p in Path(ckpt).iterdir() if p.name.startswith("ft"))
base = load_sharded(Path(ckpt) / "base", mesh)
fts = [load_sharded(p, mesh) for p in paths]
big = base["model.embed_tokens.weight"]
assert not big.is_fully_addressable and len(big.sharding.device_set) == nproc * local
merged = {
    "ties": mj.ties(base, fts, density=0.3),
    "dare": mj.dare(base, fts, drop_rate=0.5, combine="ties", density=0.4, key=jax.random.key(4)),
}
ckptr = ocp.StandardCheckpointer()
for name, tree in merged.items():
    ckptr.save(Path(out) / name, tree)
ckptr.wait_until_finished()
print(f"process {pid}: saved", flush=True)
finish()
