"""Training throughput on this machine: the pmapped step alone, then fed by the real pipeline.

    python benchmarks/train_speed.py --config experiments/quickstart.py [--steps 60]

Prints one JSON line: images/s of the step with one in-memory batch, images/s with the
augmented TFDS pipeline, and the process's user/system CPU seconds for each phase.
"""

import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file('config', 'experiments/quickstart.py', 'Experiment file.')
flags.DEFINE_integer('steps', 60, 'Timed steps per phase (after 5 warm-up steps).')
FLAGS = flags.FLAGS


def _cpu():
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime, usage.ru_stime


def main(_):
  import jax
  from seg import parallel, train
  from seg.data import pipeline
  from seg.model import create_model
  config = FLAGS.config
  lr = train.create_learning_rate_fn(config.train)
  state = parallel.replicate(train.create_train_state(
      jax.random.key(0), config, create_model(config.model), lr))
  p_step = train.make_p_train_step(config, lr)
  batches = pipeline.train_batches(config.data, parallel.local_batch_size(
      config.train.batch_size), seed=0)
  rng = parallel.replicate(jax.random.key(0))
  fixed = parallel.shard(next(batches))
  result = {'devices': jax.local_device_count(),
            'global_batch': config.train.batch_size, 'crop': config.data.crop_size}
  for phase, get in (('in_memory', lambda: fixed),
                     ('pipeline', lambda: parallel.shard(next(batches)))):
    for _ in range(5):
      state, metrics = p_step(state, get(), rng)
    jax.block_until_ready(metrics)
    (u0, s0), t0 = _cpu(), time.perf_counter()
    for _ in range(FLAGS.steps):
      state, metrics = p_step(state, get(), rng)
    jax.block_until_ready(metrics)
    (u1, s1), seconds = _cpu(), time.perf_counter() - t0
    result[f'{phase}_images_per_s'] = round(FLAGS.steps * config.train.batch_size / seconds, 1)
    result[f'{phase}_cpu_user_s'] = round(u1 - u0, 1)
    result[f'{phase}_cpu_sys_s'] = round(s1 - s0, 1)
    result[f'{phase}_wall_s'] = round(seconds, 1)
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
