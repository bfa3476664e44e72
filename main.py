"""The command line: summary, train, eval, predict.

    python main.py summary --config experiments/quickstart.py
    python main.py train   --config experiments/quickstart.py --workdir runs/quickstart
    python main.py eval    --workdir runs/quickstart [--config ...] [--output report.json]
    python main.py predict --workdir runs/quickstart --input PATH --output DIR
    python main.py prepare-data --dataset {embedded,voc2012,train_aug} [--manual-dir DIR] [--data-dir DIR]
    python main.py benchmark --train --config experiments/quickstart.py [--steps 30]

Multi-host training: the same `train` command on every host, with
`--coordinator HOST:PORT --num-processes N --process-id I` (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID; or none of them under SLURM / Open MPI).

Any config field can be overridden, e.g. `--config.train.steps=100`.
"""

import os
import sys
import sysconfig

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Experiment file (experiments/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Run folder: config, checkpoints, reports.')
flags.DEFINE_string('input', None, 'predict: an image file or a folder of images.')
flags.DEFINE_string('output', None, 'eval: report JSON path; predict: output folder.')
flags.DEFINE_string('dataset', None, 'prepare-data: embedded, voc2012 or train_aug.')
flags.DEFINE_string('manual-dir', '', 'prepare-data: folder with the source archives or their '
                    'extracted folders (default: DATA_DIR/downloads/manual).')
flags.DEFINE_string('data-dir', '', 'prepare-data: TFDS data_dir (default ~/tensorflow_datasets).')
flags.DEFINE_string('coordinator', os.environ.get('JAX_COORDINATOR_ADDRESS', ''),
                    'train, multi-host: address:port of process 0, the same on every host '
                    '(env JAX_COORDINATOR_ADDRESS). Without it and --num-processes, one process, '
                    'or the cluster that JAX detects (SLURM, Open MPI, TPU).')
flags.DEFINE_integer('num-processes', int(os.environ.get('JAX_NUM_PROCESSES', 0)) or None,
                     'train, multi-host: number of processes (env JAX_NUM_PROCESSES).')
flags.DEFINE_integer('process-id', int(os.environ.get('JAX_PROCESS_ID', -1)),
                     'train, multi-host: this process, 0..num-processes-1 (env JAX_PROCESS_ID).')
flags.DEFINE_bool('train', False, 'benchmark: training images/s per device (in-memory batches '
                  'and the real input pipeline).')
flags.DEFINE_integer('steps', 30, 'benchmark: timed steps per phase.')
FLAGS = flags.FLAGS


def _require(**values):
  missing = [f'--{name}' for name, value in values.items() if not value]
  if missing:
    raise app.UsageError(f'{" and ".join(missing)} required')


def summary():
  _require(config=FLAGS.config)
  from seg import summary as summary_lib
  print(summary_lib.format_summary(FLAGS.config, summary_lib.describe(FLAGS.config)))


def train():
  _require(config=FLAGS.config, workdir=FLAGS.workdir)
  from seg import parallel
  parallel.initialize_distributed(FLAGS.coordinator, FLAGS['num-processes'].value,
                                  FLAGS['process-id'].value)
  from seg import train as train_lib
  train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)  # exit 0 also when stopped


def benchmark():
  _require(config=FLAGS.config)
  if not FLAGS.train:
    raise app.UsageError('benchmark: pass --train (training speed)')
  from seg import train_benchmark
  train_benchmark.run_train_benchmark(FLAGS.config, steps=FLAGS.steps)


def evaluate():
  _require(workdir=FLAGS.workdir)
  from seg import evaluate as evaluate_lib
  evaluate_lib.evaluate_workdir(FLAGS.workdir, FLAGS.config, FLAGS.output)


def predict():
  _require(workdir=FLAGS.workdir, input=FLAGS.input, output=FLAGS.output)
  from seg import predict as predict_lib
  if predict_lib.predict_paths(FLAGS.workdir, FLAGS.input, FLAGS.output):
    sys.exit(1)


def prepare_data():
  _require(dataset=FLAGS.dataset)
  from seg.data import voc
  builder = voc.prepare(FLAGS.dataset, FLAGS['data-dir'].value, FLAGS['manual-dir'].value)
  print(f'{FLAGS.dataset} prepared in {builder.data_dir}')
  for split, info in builder.info.splits.items():
    print(f'  {split:<10} {info.num_examples:>7,} examples')


# Each command is a function of the parsed flags; imports happen inside them so that
# `--help` and usage errors answer without loading JAX.
COMMANDS = {
    'summary': summary,
    'train': train,
    'eval': evaluate,
    'predict': predict,
    'prepare-data': prepare_data,
    'benchmark': benchmark,
}


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f'usage: main.py {{{",".join(COMMANDS)}}} [flags]')
  logging.set_verbosity(logging.WARNING)  # orbax and TFDS log every step at INFO
  sys.stdout.reconfigure(line_buffering=True)  # progress shows up at once in logs too
  import jax
  jax.config.update('jax_compilation_cache_dir', '/tmp/seg-jax-cache')
  COMMANDS[argv[1]]()


def _reexec_with_mimalloc():
  """Restarts this process with mimalloc preloaded, unless SEG_ALLOCATOR=system.

  Under glibc's malloc, XLA's CPU runtime gets fresh pages from the kernel for
  its buffers at every step: half the CPU time went to page faults, and
  mimalloc (pip package cmeel-mimalloc) doubled training images/s here
  (README, "Speed"). Preloading only works from the start of a process.
  """
  if (os.environ.get('SEG_ALLOCATOR', 'mimalloc') != 'mimalloc'
      or 'mimalloc' in os.environ.get('LD_PRELOAD', '')):
    return
  lib = os.path.join(sysconfig.get_paths()['purelib'], 'cmeel.prefix', 'lib', 'libmimalloc.so')
  if os.path.exists(lib):
    preload = ':'.join(filter(None, [lib, os.environ.get('LD_PRELOAD')]))
    os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, LD_PRELOAD=preload))


if __name__ == '__main__':
  _reexec_with_mimalloc()
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # TF's C++ INFO lines drown the progress
  app.run(main)
