"""Two processes on localhost (2 fake CPU devices each, gloo collectives) train exactly as one
process with 4 devices, and their collective orbax checkpoint restores in one process."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

import multihost_worker  # beside this file (pytest puts the folder on the path)
from seg import checkpoint, parallel
from seg.model import create_model
from seg.train import step as step_lib

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process_with_four_devices(tmp_path):
  assert jax.device_count() == 4
  coordinator = f'localhost:{_free_port()}'
  # Unoptimised XLA: compilation dominates these few steps (logic is checked, not speed).
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='1')
  workers = [subprocess.Popen(
      [sys.executable, os.path.join(HERE, 'multihost_worker.py'), coordinator, '2', str(i),
       str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = []
  try:
    for worker in workers:
      outputs.append(worker.communicate(timeout=400)[0])
  finally:
    for worker in workers:
      worker.kill()
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0, output[-3000:]

  # The reference: this process, 4 devices, the whole global batches.
  config = multihost_worker.tiny_config()
  model = create_model(config.model)
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)   # as the workers
  try:
    with jax.enable_x64(True):
      reference = parallel.unreplicate(multihost_worker.run_steps(config, 0, 1))
  finally:
    jax.config.update('jax_disable_most_optimizations', previous)
  init = step_lib.create_train_state(jax.random.split(jax.random.key(config.train.seed))[0],
                                  config, model, step_lib.create_learning_rate_fn(config.train))
  manager = checkpoint.create_manager(str(tmp_path / 'run'))
  assert manager.latest_step() == multihost_worker.STEPS
  with jax.enable_x64(True):   # restored on 4 devices of one process, as float64
    restored, _ = checkpoint.restore(manager, {'params': reference.params,
                                               'batch_stats': reference.batch_stats})
  # In float64 (as test_train's one-host check): only the algorithm can make a difference.
  for name in ('params', 'batch_stats'):
    ours, theirs = jax.tree.leaves(reference.__dict__[name]), jax.tree.leaves(restored[name])
    assert len(ours) == len(theirs)
    for x, y in zip(ours, theirs):
      assert np.asarray(x).dtype == np.asarray(y).dtype == np.float64
      np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-9)
  # The steps did move the weights (the comparison is not between two initialisations).
  moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for a, b in zip(jax.tree.leaves(init.params), jax.tree.leaves(restored['params'])))
  assert moved > 1e-3
