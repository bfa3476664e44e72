"""Training throughput on this machine: the pmapped step alone, then fed by the real pipeline.

    python benchmarks/train_speed.py --config experiments/quickstart.py [--steps 60]

Prints one JSON line (`seg.train_benchmark.measure_train_speed`): images/s of the step
with one in-memory batch and with the augmented TFDS pipeline, and the process's user/system
CPU seconds for each phase. `python main.py benchmark --train` prints the same as a table.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file('config', 'experiments/quickstart.py', 'Experiment file.')
flags.DEFINE_integer('steps', 60, 'Timed steps per phase (after 5 warm-up steps).')
FLAGS = flags.FLAGS


def main(_):
  from seg import train_benchmark
  print(json.dumps(train_benchmark.measure_train_speed(FLAGS.config, FLAGS.steps)))


if __name__ == '__main__':
  app.run(main)
