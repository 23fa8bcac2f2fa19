"""Multi-process ternary save: each of 2 local jax.distributed processes (gloo, 4 CPU devices each) writes its own
bitmap shards, process 0 finalises; the checkpoint loads in one process equal to the single-process compression."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests._multihost import run_workers

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.multihost
def test_multiprocess_ternary_save_writes_per_process_shards(tmp_path):
    nproc, local = 2, 4
    out = tmp_path / "expert"
    run_workers(ROOT / "tests" / "_ternary_multihost_worker.py", nproc, [local, out])

    from mergejax import ternary
    from mergejax.ternary.storage import TernarySource, read_metadata

    meta = read_metadata(out)
    assert sorted(meta["streams_files"]) == ["streams-00000.bin", "streams-00001.bin"]
    rows = next(e for e in meta["leaves"] if e["path"] == "rows")
    assert len(rows["shards"]) == nproc * local and {s["file"] for s in rows["shards"]} == set(meta["streams_files"])
    rep = next(e for e in meta["leaves"] if e["path"] == "rep")
    assert len(rep["shards"]) == 1  # a replicated leaf is written once
    rng = np.random.default_rng(0)
    n = nproc * local
    tau = {"rows": rng.normal(size=(8 * n, 40)).astype(np.float32), "cols": rng.normal(size=(6, 64 * n)).astype(np.float32),
           "rep": rng.normal(size=(33,)).astype(np.float32), "ids": np.arange(5, dtype=np.int32)}
    single = ternary.compress(tau, density=0.3)  # the same compression in one process, on one device
    loaded = ternary.load(out)
    for j in range(len(single.mask)):  # the kept positions and signs are the same; the scale (a sum over the model)
        m = np.asarray(single.mask[j])  # may differ in the last bit, as the sharded sum adds in another order
        np.testing.assert_array_equal(np.asarray(loaded.mask[j]), m)
        np.testing.assert_array_equal(np.asarray(loaded.sign[j]) & m, np.asarray(single.sign[j]) & m)
        np.testing.assert_allclose(float(loaded.scale[j]), float(single.scale[j]), rtol=1e-6)
    got = loaded.decompress()
    src = TernarySource(out)  # the streaming reader decodes the same values leaf by leaf
    try:
        for k in tau:
            np.testing.assert_array_equal(src.read(k), np.asarray(got[k], src.info(k).dtype), err_msg=k)
    finally:
        src.close()
