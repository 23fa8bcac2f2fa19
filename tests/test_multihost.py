"""Several local ``jax.distributed`` processes on 127.0.0.1 (CPU devices, gloo collectives) merge one sharded model.

Each process runs tests/_multihost_worker.py: it places the same seeded trees on a global mesh over every process's
devices, merges with TIES and task arithmetic, and checks its own shards against a plain-numpy reference.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._multihost import run_workers

WORKER = Path(__file__).resolve().parent / "_multihost_worker.py"


@pytest.mark.multihost
def test_two_processes_merge_a_sharded_model_like_numpy():
    outputs = run_workers(WORKER, 2, [3], timeout_s=120)
    # each process checked its own shards of every leaf of two merges (6 leaves x 2 local devices x 2)
    for i, out in enumerate(outputs):
        assert f"process {i}: 24 shards checked" in out, out[-2000:]
