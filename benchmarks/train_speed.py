"""Training throughput on this machine: the pmapped step alone, then fed by the real pipeline.

    python benchmarks/train_speed.py --config experiments/quickstart.py [--steps 60]

Prints one JSON line (`seg.train.benchmark.measure_train_speed`): images/s of the step
with one in-memory batch and with the augmented TFDS pipeline, and the process's user/system
CPU seconds for each phase. `python main.py benchmark --train` prints the same as a table.
"""

import json

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', 'experiments/quickstart.py', 'Experiment file.')
flags.DEFINE_integer('steps', 60, 'Timed steps per phase (after 5 warm-up steps).')
FLAGS = flags.FLAGS


def main(_):
  from seg.train import benchmark
  print(json.dumps(benchmark.measure_train_speed(FLAGS.config, FLAGS.steps)))


if __name__ == '__main__':
  app.run(main)
