"""One process of tests/train/test_multihost.py: a few training steps under jax.distributed,
then an evaluation, or the one-device reference.

    python tests/train/multihost_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID OUT_DIR DATA_DIR
    python tests/train/multihost_worker.py reference OUT_DIR

Each process feeds its own slice of the same synthetic global batches, then the
processes save one orbax checkpoint together into OUT_DIR/run and evaluate `eval_model` on
the embedded val split in DATA_DIR, each process its shard; the first writes the report
(its confusion matrix and every image's scores) to OUT_DIR/eval.json. The reference trains the whole
global batches on ONE device (global normalisation by construction) and writes the leaves of
its params and batch_stats to OUT_DIR/reference.npz.
"""

import json
import os
import sys

import jax
import numpy as np

from seg import checkpoint, parallel
from seg.config import load_experiment
from seg.train import step as step_lib

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'experiments',
                    'tiny.py')

STEPS = 3


def global_batches(config, steps=STEPS):
  """The same [batch, crop, crop] images and labels in every process, from a fixed seed."""
  rng = np.random.RandomState(0)
  size, n = config.data.crop_size, config.train.batch_size
  for _ in range(steps):
    labels = rng.randint(0, config.model.num_classes, (n, size, size)).astype(np.uint8)
    # Unequal valid pixels per device (example i loses its first 2 + 7i rows): a loss that
    # averaged per-device means would weight the devices' pixels unequally.
    for i in range(n):
      labels[i, :2 + 7 * i] = config.data.ignore_label
    images = rng.uniform(0, 255, (n, size, size, 3)).astype(np.float32)
    yield {'image': images, 'label': labels}


def tiny_config():
  config = load_experiment(TINY)
  config.unlock()
  config.model.num_classes = 5
  config.train.batch_size = 8
  # No dropout: its masks are drawn per device, so they depend on how the batch is split.
  config.model.dropout_rate = 0.0
  # DeepLab's loss options, all on: class weights, hard pixel mining (its share falling over
  # the steps, one threshold over every process's pixels) and the gradient multipliers.
  config.train.label_weights = (1.0, 0.5, 2.0, 0.0, 1.5)
  config.train.top_k_percent_pixels = 0.4
  config.train.hard_example_mining_step = 2
  config.train.last_layer_gradient_multiplier = 3.0
  return config


def run_steps(config, process_index, process_count):
  """Trains STEPS steps on this process's rows of each global batch; the replicated state."""
  from seg.model import create_model
  lr = step_lib.create_learning_rate_fn(config.train)
  init_rng, step_rng = jax.random.split(jax.random.key(config.train.seed))
  state = step_lib.create_train_state(init_rng, config, create_model(config.model), lr)
  # float64, so that the comparison sees the algorithm, not float32 summation order.
  to64 = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float64), tree)
  state = parallel.replicate(state.replace(params=to64(state.params),
                                           batch_stats=to64(state.batch_stats),
                                           opt_state=to64(state.opt_state)))
  p_step = step_lib.make_p_train_step(config, lr)
  rows = config.train.batch_size // process_count
  for step, batch in enumerate(global_batches(config), 1):
    local = {k: v[process_index * rows:(process_index + 1) * rows] for k, v in batch.items()}
    local['image'] = local['image'].astype(np.float64)
    state, _ = p_step(state, parallel.shard(local),
                      parallel.replicate(jax.random.fold_in(step_rng, step)))
  return state


def eval_model(data_dir):
  """The config (tiny, the embedded dataset's 21 classes, read from `data_dir`) and variables
  of a seeded model whose logits kernel is random (std 1), so that it predicts many classes."""
  from seg.classes import EMBEDDED_CLASS_NAMES
  from seg.model import create_model
  config = load_experiment(TINY)
  config.unlock()
  config.data.data_dir = data_dir
  config.model.num_classes = len(EMBEDDED_CLASS_NAMES)
  config.eval.batch_size = 8
  model = create_model(config.model)
  size = config.data.eval_size
  with jax.enable_x64(False):   # the same weights in the workers (float64 for training)
    variables = jax.device_get(model.init(jax.random.key(3), np.zeros((1, size, size, 3),
                                                                      np.float32), train=False))
  kernel = variables['params']['head']['logits']['kernel']
  variables['params']['head']['logits']['kernel'] = np.random.default_rng(0).normal(
      0, 1, kernel.shape).astype(np.float32)
  return config, variables


def main(coordinator, num_processes, process_id, out_dir, data_dir):
  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
  parallel.initialize_distributed(coordinator, int(num_processes), int(process_id))
  jax.config.update('jax_enable_x64', True)
  assert jax.process_count() == int(num_processes) and jax.device_count() == 4
  from seg.train import loop
  state = run_steps(tiny_config(), jax.process_index(), jax.process_count())
  manager = checkpoint.create_manager(os.path.join(out_dir, 'run'))
  loop.save_state(manager, state)
  manager.wait_until_finished()
  from seg.inference import evaluate
  config, variables = eval_model(data_dir)
  report = evaluate.evaluate(evaluate.make_p_eval_step(None, config),
                             parallel.replicate(variables), config, log=print)
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, 'eval.json'), 'w') as f:
      json.dump(report, f)
  print(f'process {jax.process_index()} done')


def reference(out_dir):
  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
  jax.config.update('jax_enable_x64', True)
  assert jax.device_count() == 1
  state = parallel.unreplicate(run_steps(tiny_config(), 0, 1))
  leaves = jax.tree.leaves({'params': state.params, 'batch_stats': state.batch_stats})
  np.savez(os.path.join(out_dir, 'reference.npz'), *[np.asarray(x) for x in leaves])
  print('reference done')


if __name__ == '__main__':
  if sys.argv[1] == 'reference':
    reference(*sys.argv[2:])
  else:
    main(*sys.argv[1:])
