"""Two processes on localhost (2 fake CPU devices each, gloo collectives) train exactly as one
process on ONE device with the whole batch, though their devices hold unequal numbers of valid
pixels, and their collective orbax checkpoint restores in one process; they evaluate a split
as one process does, every image counted once under its own id."""

import json
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


def test_two_processes_equal_one_device_with_the_whole_batch(tmp_path, data_dir):
  assert jax.device_count() == 4
  config = multihost_worker.tiny_config()
  # The precondition that makes the comparison discerning: the 4 devices' shares of each
  # global batch hold unequal numbers of valid pixels, so global normalisation (the sum over
  # all pixels / all valid pixels) and a mean of per-device means give different losses.
  for batch in multihost_worker.global_batches(config):
    valid = (batch['label'] != config.data.ignore_label).reshape(4, -1).sum(1)
    assert valid.max() > 1.3 * valid.min()
  coordinator = f'localhost:{_free_port()}'
  # Unoptimised XLA: compilation dominates these few steps (logic is checked, not speed).
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='1')
  worker = os.path.join(HERE, 'multihost_worker.py')
  # The two processes together, then the one-device reference in a process of its own
  # (after them: three at once would add its ~1.4 GB to the test workers' peak).
  for commands in ([[worker, coordinator, '2', str(i), str(tmp_path), data_dir]
                    for i in range(2)],
                   [[worker, 'reference', str(tmp_path)]]):
    workers = [subprocess.Popen([sys.executable, *command], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for command in commands]
    outputs = []
    try:
      for process in workers:
        outputs.append(process.communicate(timeout=400)[0])
    finally:
      for process in workers:
        process.kill()
    for process, output in zip(workers, outputs):
      assert process.returncode == 0, output[-3000:]

  with np.load(tmp_path / 'reference.npz') as f:
    reference = [f[f'arr_{i}'] for i in range(len(f.files))]
  model = create_model(config.model)
  init = step_lib.create_train_state(jax.random.split(jax.random.key(config.train.seed))[0],
                                     config, model, step_lib.create_learning_rate_fn(config.train))
  manager = checkpoint.create_manager(str(tmp_path / 'run'))
  assert manager.latest_step() == multihost_worker.STEPS
  with jax.enable_x64(True):   # restored on 4 devices of one process, as float64
    to64 = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float64), tree)
    restored, _ = checkpoint.restore(manager, {'params': to64(init.params),
                                               'batch_stats': to64(init.batch_stats)})
  # In float64 (as test_train's one-host check): only the algorithm can make a difference.
  theirs = jax.tree.leaves({'params': restored['params'], 'batch_stats': restored['batch_stats']})
  assert len(reference) == len(theirs)
  for x, y in zip(reference, theirs):
    assert x.dtype == np.asarray(y).dtype == np.float64
    np.testing.assert_allclose(np.asarray(y), x, rtol=1e-5, atol=1e-9)
  # The steps did move the weights (the comparison is not between two initialisations).
  moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for a, b in zip(jax.tree.leaves(init.params), jax.tree.leaves(restored['params'])))
  assert moved > 1e-3

  # The evaluation: the two processes' report (each read its shard of the split; the per-image
  # rows gathered onto the first) against this process's evaluation of the same model.
  from seg.inference import evaluate
  eval_config, variables = multihost_worker.eval_model(data_dir)
  here = evaluate.evaluate(evaluate.make_p_eval_step(None, eval_config),
                           parallel.replicate(variables), eval_config, log=lambda _: None)
  with open(tmp_path / 'eval.json') as f:
    theirs = json.load(f)
  assert theirs['num_images'] == here['num_images'] == 150
  assert len({r['id'] for r in theirs['images']}) == 150
  assert np.abs(np.array(theirs['confusion_matrix'])
                - np.array(here['confusion_matrix'])).sum() <= 4   # near-tie pixels
  rows = {r['id']: r for r in here['images']}
  assert sum(r['pixels'] == rows[r['id']]['pixels'] and abs(r['miou'] - rows[r['id']]['miou'])
             < 1e-6 for r in theirs['images']) >= 146
  assert len({round(r['miou'], 3) for r in here['images']}) > 20   # the images do differ
