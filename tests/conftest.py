"""Test setup: 4 CPU devices (set before jax is imported) and fast compilation."""

import os
import pathlib
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The commands' persistent compilation cache stays off (no writes to ~/.cache); its own test turns
# it on in a temporary folder.
os.environ['W2X_JAX_CACHE_DIR'] = 'off'
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import pytest  # noqa: E402

# Compile time dominates these tiny tests; numerics are unchanged.
jax.config.update('jax_disable_most_optimizations', True)

SHARED_DATA = pathlib.Path(os.environ.get('W2X_SHARED_DATA', ROOT.parent / 'shared' / 'data'))


@pytest.fixture
def shared_data():
  """The real image folder (../shared/data); tests that need it skip where it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f'{SHARED_DATA} not present')
  return SHARED_DATA
