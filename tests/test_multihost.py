"""Several local ``jax.distributed`` processes on 127.0.0.1 (CPU devices, gloo collectives) merge one sharded model.

Each process runs tests/_multihost_worker.py: it places the same seeded trees on a global mesh over every process's
devices, merges with TIES and task arithmetic, and checks its own shards against a plain-numpy reference.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_multihost_worker.py"
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "TPU_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "grpc_proxy"):
        env.pop(proxy, None)  # gRPC to 127.0.0.1 must not go through a proxy
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def _run_processes(num_processes: int, seed: int) -> list[str]:
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(port), str(num_processes), str(i), str(seed)],
            cwd=ROOT,
            env=_worker_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(num_processes)
    ]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            outputs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        details = "\n".join(f"--- process {i}:\n{p.communicate()[0][-3000:]}" for i, p in enumerate(procs))
        pytest.fail(f"multi-host workers did not finish in {TIMEOUT_S} s\n{details}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0 and "WORKER_OK" in out, f"process {i} exited with {p.returncode}:\n{out[-4000:]}"
    return outputs


@pytest.mark.multihost
def test_two_processes_merge_a_sharded_model_like_numpy():
    outputs = _run_processes(2, seed=3)
    # each process checked its own shards of every leaf of two merges (6 leaves x 2 local devices x 2)
    for i, out in enumerate(outputs):
        assert f"process {i}: 24 shards checked" in out, out[-2000:]
