"""Shared fixtures: four fake CPU devices, the embedded dataset prepared once per session."""

import os

# Must happen before JAX initialises its backends.
if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=4').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# Compilation dominates the tests' time on a CPU, and they check logic, not speed: XLA's
# optimisation passes off (the Flax ImageNet example's tests do the same). Through the
# environment, so that the tests' subprocesses inherit it.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')

import pytest  # noqa: E402

from experiments import tiny  # noqa: E402


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent compilation cache for the session, empty at its start.

  Every `make_p_train_step`, `train_and_evaluate` and `create_train_state` call jits
  its functions anew, so JAX's in-memory caches miss and identical programs (the tiny
  config's init, train and eval steps) were compiled again in test after test.
  """
  import jax
  previous = jax.config.jax_compilation_cache_dir
  jax.config.update('jax_compilation_cache_dir', str(tmp_path_factory.mktemp('jax_cache')))
  yield
  jax.config.update('jax_compilation_cache_dir', previous)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A TFDS data_dir holding the prepared embedded dataset."""
  from seg.data import voc
  path = str(tmp_path_factory.mktemp('tfds'))
  voc.prepare('embedded', path)
  return path


@pytest.fixture
def tiny_config(data_dir):
  """experiments/tiny.py reading the session's dataset (unlocked for per-test changes)."""
  config = tiny.get_config()
  config.data.data_dir = data_dir
  return config
