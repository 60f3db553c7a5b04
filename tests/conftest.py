"""Test setup: 8 fake CPU devices (sharding tests), float32 matmuls, GPU tests skipped on CPU."""

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# The CLI turns JAX's persistent compilation cache on by default; tests that want it say so.
os.environ.setdefault("LONGSPEC_COMPILE_CACHE", "none")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    has_gpu = any(d.platform == "gpu" for d in jax.devices())
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _free_executables():
    """Drop the executables a test module compiled once it is done: the process-wide compiler and
    jax's caches would otherwise hold every model's code for the whole run."""
    yield
    from longspec_jax.infer import runtime

    runtime.default_compiler().clear()
    jax.clear_caches()
