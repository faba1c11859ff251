"""Test set-up shared by every test: 8 fake CPU devices (a simulated pod) and the shared data directory."""
import os
import pathlib

# Must precede the first jax import anywhere in the test session.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# libtpu (requirements-tpu.txt, for the AOT tests) would otherwise make every jax process here try a TPU first;
# the AOT tests start their TPU compiles in subprocesses with their own environment.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "e2e: end to end (recipe, launchers, several processes, TPU AOT compiles); "
                          "minutes each: `pytest -m 'not e2e'` is the quick loop, CI runs everything")


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  """The shared data directory (env O1JAX_SHARED); tests that need it skip only when it is unset."""
  path = os.environ.get("O1JAX_SHARED")
  if not path:
    pytest.skip("O1JAX_SHARED is not set")
  return pathlib.Path(path)


@pytest.fixture(scope="session")
def smollm2_gguf(shared_dir) -> pathlib.Path:
  """The real small model: SmolLM2-135M-Instruct as a GGUF file."""
  return shared_dir / "data" / "smollm2-135m-instruct-gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
