"""Shared plumbing of the multi-process tests: local ``jax.distributed`` processes on 127.0.0.1 (CPU, gloo).

Test side: :func:`run_workers` starts N copies of a worker script as ``worker PORT NUM_PROCESSES PROCESS_ID *args``
and checks that each exits 0 after printing ``WORKER_OK``. Worker side: :func:`cpu_devices` (before JAX is
imported), :func:`initialize` and :func:`finish`. This module imports JAX only inside those functions, so a worker
can import it before setting up its devices.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OK = "WORKER_OK"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for the coordinator)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict[str, str]:
    """The test's environment for a worker: no inherited XLA/JAX/TPU settings or proxies, the repository importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "TPU_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "grpc_proxy"):
        env.pop(proxy, None)  # gRPC to 127.0.0.1 must not go through a proxy
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def run_workers(worker: str | os.PathLike[str], num_processes: int, args: Sequence[str] = (), *,
                timeout_s: float = 240) -> list[str]:
    """Runs ``num_processes`` copies of ``worker`` (``worker PORT NUM_PROCESSES PROCESS_ID *args``) and returns
    their outputs; fails the test, with every process's output tail, unless each exits 0 after ``WORKER_OK``.

    Args:
      worker: the worker script.
      num_processes: how many processes (one coordinator port on 127.0.0.1).
      args: the worker's own arguments, after the three common ones.
      timeout_s: for all of them; on expiry every process is killed.

    Returns:
      Each process's stdout and stderr, in process order.
    """
    import pytest

    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(worker), str(port), str(num_processes), str(i), *map(str, args)],
                              cwd=ROOT, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(num_processes)]
    outputs: list[str] = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout_s)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        details = "\n".join(f"--- process {i}:\n{p.communicate()[0][-3000:]}" for i, p in enumerate(procs))
        pytest.fail(f"multi-host workers did not finish in {timeout_s} s\n{details}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0 and OK in out, f"process {i} exited with {p.returncode}:\n{out[-4000:]}"
    return outputs


def cpu_devices(local_devices: int) -> None:
    """Worker side, before JAX is imported: the CPU platform with ``local_devices`` fake devices."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"


def initialize(port: int, num_processes: int, process_id: int) -> None:
    """Worker side: gloo CPU collectives and ``jax.distributed`` with the coordinator on 127.0.0.1:``port``."""
    import jax

    from mergejax import sharding as shd

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    shd.initialize_distributed(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id, coordinator_bind_address=f"127.0.0.1:{port}",
                               initialization_timeout=60, heartbeat_timeout_seconds=30, shutdown_timeout_seconds=30)


def finish() -> None:
    """Worker side: shuts ``jax.distributed`` down and prints ``WORKER_OK`` (what :func:`run_workers` checks)."""
    import jax

    jax.distributed.shutdown()
    print(OK, flush=True)
