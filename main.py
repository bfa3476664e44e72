"""The command line: summary, train, eval, predict.

    python main.py summary --config experiments/quickstart.py
    python main.py train   --config experiments/quickstart.py --workdir runs/quickstart
    python main.py eval    --workdir runs/quickstart [--config ...] [--output report.json]
    python main.py predict --workdir runs/quickstart --input PATH --output DIR
    python main.py prepare-data --dataset {embedded,voc2012,train_aug} [--manual-dir DIR] [--data-dir DIR]
    python main.py import-weights --format {deeplab-tf,hf,keras} SRC --output DIR [--config ...]

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
flags.DEFINE_string('output', None, 'eval: report JSON path; predict: output folder; '
                    'import-weights: the workdir to write.')
flags.DEFINE_enum('format', None, ['deeplab-tf', 'hf', 'keras'],
                  'import-weights: the format of SRC (see seg/weights.py).')
flags.DEFINE_string('dataset', None, 'prepare-data: embedded, voc2012 or train_aug.')
flags.DEFINE_string('manual-dir', '', 'prepare-data: folder with the source archives or their '
                    'extracted folders (default: DATA_DIR/downloads/manual).')
flags.DEFINE_string('data-dir', '', 'prepare-data: TFDS data_dir (default ~/tensorflow_datasets).')
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
  from seg import train as train_lib
  train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)


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


def import_weights(src):
  _require(format=FLAGS.format, output=FLAGS.output)
  from seg import weights
  try:
    weights.import_weights(FLAGS.format, src, FLAGS.output, FLAGS.config)
  except weights.WeightsMismatchError as e:  # the list of differences is the whole message
    sys.exit(f'error: {e}')


# Each command is a function of the parsed flags (and of its positional arguments, see
# POSITIONAL); imports happen inside them so that
# `--help` and usage errors answer without loading JAX.
COMMANDS = {
    'summary': summary,
    'train': train,
    'eval': evaluate,
    'predict': predict,
    'prepare-data': prepare_data,
    'import-weights': import_weights,
}
POSITIONAL = {'import-weights': ['SRC']}


def main(argv):
  if len(argv) < 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f'usage: main.py {{{",".join(COMMANDS)}}} [flags]')
  names = POSITIONAL.get(argv[1], [])
  if len(argv) - 2 != len(names):
    raise app.UsageError(f'main.py {argv[1]} takes {" ".join(names) or "no arguments"} besides '
                         f'flags, got {argv[2:]}')
  logging.set_verbosity(logging.WARNING)  # orbax and TFDS log every step at INFO
  sys.stdout.reconfigure(line_buffering=True)  # progress shows up at once in logs too
  import jax
  jax.config.update('jax_compilation_cache_dir', '/tmp/seg-jax-cache')
  COMMANDS[argv[1]](*argv[2:])


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
