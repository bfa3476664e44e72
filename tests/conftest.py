"""Shared fixtures: four fake CPU devices, the embedded dataset prepared once per run.

Under pytest-xdist (`-n 2`, the README's command) the workers share the run's dataset and
compilation cache: one folder beside their own temporary folders.
"""

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

# The modules that take longest (2026-12-08, a 2-core AMD EPYC Zen 4 VM: their tests among
# the 60 slowest of `--durations=60` add up to ~330, ~320, 200, ~150, ~150, ~130 and 123 s),
# handed to the two workers first. pytest-xdist's `--dist loadfile` otherwise orders modules by their number of tests,
# which left the one-test modules of 200 and 120 s (`test_multihost`, `test_gpu_check`) to the
# end of the run, one worker busy and the other idle.
LONGEST_FIRST = ('train/test_faults.py', 'train/test_train.py', 'train/test_multihost.py',
                 'cli/test_cli.py', 'predict/test_predict.py', 'train/test_best.py',
                 'test_gpu_check.py')


def pytest_configure(config):
  if hasattr(config.option, 'loadscopereorder'):   # pytest-xdist: keep the order below
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  """Modules in LONGEST_FIRST's order, then the others by their number of tests (most
  first, as pytest-xdist would); each module's tests stay together and in order."""
  root = os.path.dirname(os.path.abspath(__file__))
  module = lambda item: os.path.relpath(str(item.path), root)
  counts = {}
  for item in items:
    counts[module(item)] = counts.get(module(item), 0) + 1
  rank = lambda name: (LONGEST_FIRST.index(name) if name in LONGEST_FIRST
                       else len(LONGEST_FIRST), -counts[name], name)
  items.sort(key=lambda item: rank(module(item)))


def _run_folder(tmp_path_factory, name):
  """A folder for the whole run: shared by the xdist workers, else this session's own."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    base = base.parent   # pytest-N/popen-gwK -> pytest-N, one per run
  path = base / name
  path.mkdir(exist_ok=True)
  return path


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent compilation cache for the run, empty at its start.

  Every `make_p_train_step`, `train_and_evaluate` and `create_train_state` call jits
  its functions anew, so JAX's in-memory caches miss and identical programs (the tiny
  config's init, train and eval steps) were compiled again in test after test.
  """
  import jax
  previous = jax.config.jax_compilation_cache_dir
  jax.config.update('jax_compilation_cache_dir', str(_run_folder(tmp_path_factory, 'jax_cache')))
  yield
  jax.config.update('jax_compilation_cache_dir', previous)


@pytest.fixture(scope='module', autouse=True)
def release_compiled_programs():
  """After each test module: JAX's in-memory caches cleared and freed memory handed back.

  A worker runs module after module in one process, and JAX keeps every compiled program
  (and what it captured) for the life of the process. Clean-clone runs, 2026-12-02, Intel Xeon:
  without this the largest worker reached 11.3 GB and the machine 23.7 of 24 GB used; with it
  8.7 GB and 12.1 GB. Later modules
  load what they need again from the persistent compilation cache.
  """
  yield
  import ctypes
  import gc
  import jax
  jax.clear_caches()
  gc.collect()
  try:  # glibc keeps freed pages in its arenas unless asked
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass


@pytest.fixture
def xla_optimizations():
  """XLA's optimisation passes on for one test, as users run (the session has them off).

  For equivalence checks whose result could depend on them (fusion, reassociation,
  bf16 normalisation): they run once more this way. Checks the flag took effect.
  """
  import jax
  import jax.numpy as jnp
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', False)
  try:
    hlo = jax.jit(lambda x: jnp.tanh(x) * 2 + 1).lower(jnp.ones(8)).compile().as_text()
    assert 'fusion' in hlo, 'XLA optimisations did not come back on'
    yield
  finally:
    jax.config.update('jax_disable_most_optimizations', previous)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A TFDS data_dir holding the prepared embedded dataset (one worker builds it, under
  voc.prepare's lock; the others wait and reuse it)."""
  from seg.data import voc
  path = str(_run_folder(tmp_path_factory, 'tfds'))
  voc.prepare('embedded', path)
  return path


@pytest.fixture
def tiny_config(data_dir):
  """experiments/tiny.py reading the session's dataset (unlocked for per-test changes)."""
  config = tiny.get_config()
  config.data.data_dir = data_dir
  return config

