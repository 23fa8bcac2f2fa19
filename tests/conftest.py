"""Test configuration: 8 fake CPU devices before JAX starts, so sharded code paths run in every test run."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No persistent XLA cache in the test process: the CLI tests call mergejax.cli in-process, which would turn it on
# (under ~/.cache, min compile time 0) for every later test; the full suite then crashed (SIGSEGV) in a later
# compile that wrote to the cache. Subprocess tests of the CLI pop this and keep their own cache.
os.environ["MERGEJAX_COMPILE_CACHE"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def mesh8():
    """A 1-D mesh over the 8 fake CPU devices, axis name "x"."""
    assert jax.device_count() == 8, "conftest must set XLA_FLAGS before JAX is imported"
    return jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))


@pytest.fixture(autouse=True)
def _no_persistent_compile_cache():
    """Fail the test that switches JAX's persistent compilation cache on in this process (see above)."""
    yield
    assert jax.config.jax_compilation_cache_dir is None, (
        "this test turned on JAX's persistent compilation cache in the test process; "
        "route it through mergejax.cli.enable_compile_cache, which honours MERGEJAX_COMPILE_CACHE=0")
