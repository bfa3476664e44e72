"""The command line: summary, train, eval, predict, prepare-data, benchmark, export.

    python main.py summary --config experiments/quickstart.py
    python main.py train   --config experiments/quickstart.py --workdir runs/quickstart
    python main.py eval    --workdir runs/quickstart [--config ...] [--output report.json]
    python main.py predict --workdir runs/quickstart --input PATH --output DIR
    python main.py prepare-data --dataset {embedded,voc2012,train_aug} [--manual-dir DIR] [--data-dir DIR]
    python main.py benchmark --config experiments/base.py --batch-size 8 [--dtype bfloat16] [--json]
    python main.py export  --workdir runs/quickstart --output model.jax [--platforms cpu,cuda]

Any config field can be overridden, e.g. `--config.train.steps=100`.
"""

import json
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
flags.DEFINE_integer('batch-size', 1, 'benchmark, export: images per compiled call.')
flags.DEFINE_integer('height', 0, 'benchmark, export: padded input height (default eval_size).')
flags.DEFINE_integer('width', 0, 'benchmark, export: padded input width (default eval_size).')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                  'benchmark, export: compute dtype of the engine (products accumulate in f32).')
flags.DEFINE_enum('measure', 'network', ['network', 'predict'],
                  'benchmark: network = float images -> logits at the output stride (what the '
                  'peers time); predict = uint8 images -> class map at full size.')
flags.DEFINE_integer('warmup', 3, 'benchmark: untimed runs first.')
flags.DEFINE_integer('iters', 10, 'benchmark: timed runs (the median is reported).')
flags.DEFINE_bool('image-by-image', True, 'benchmark: run the images of a batch one after '
                  'the other inside the compiled call (less memory); --noimage-by-image: at once.')
flags.DEFINE_bool('json', False, 'benchmark: print one JSON line (../shared/bench/run_all.py).')
flags.DEFINE_string('platforms', 'cpu,cuda', 'export: platforms to lower for, comma-separated.')
flags.DEFINE_bool('symbolic-batch', True, 'export: a symbolic batch dimension (else --batch-size).')
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


def benchmark():
  if not FLAGS.config and not FLAGS.workdir:
    raise app.UsageError('--config or --workdir required')
  from benchmarks import inference_speed
  record = inference_speed.benchmark(
      FLAGS.config, FLAGS.workdir, FLAGS['batch-size'].value, FLAGS.height or None,
      FLAGS.width or None, FLAGS.dtype, FLAGS.measure, FLAGS.warmup, FLAGS.iters,
      FLAGS['image-by-image'].value)
  print(json.dumps(record) if FLAGS.json else inference_speed.format_record(record))


def export():
  _require(workdir=FLAGS.workdir, output=FLAGS.output)
  from seg import export as export_lib
  export_lib.export_workdir(
      FLAGS.workdir, FLAGS.output, FLAGS.platforms.split(','), FLAGS.config, FLAGS.dtype,
      None if FLAGS['symbolic-batch'].value else FLAGS['batch-size'].value,
      FLAGS.height or None, FLAGS.width or None)


# Each command is a function of the parsed flags; imports happen inside them so that
# `--help` and usage errors answer without loading JAX.
COMMANDS = {
    'summary': summary,
    'train': train,
    'eval': evaluate,
    'predict': predict,
    'prepare-data': prepare_data,
    'benchmark': benchmark,
    'export': export,
}


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f'usage: main.py {{{",".join(COMMANDS)}}} [flags]')
  logging.set_verbosity(logging.WARNING)  # orbax and TFDS log every step at INFO
  sys.stdout.reconfigure(line_buffering=True)  # progress shows up at once in logs too
  import jax
  jax.config.update('jax_compilation_cache_dir', '/tmp/seg-jax-cache')
  COMMANDS[argv[1]]()


INFERENCE_COMMANDS = ('eval', 'predict', 'benchmark', 'export')


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
    env = dict(os.environ, LD_PRELOAD=preload)
    if len(sys.argv) > 1 and sys.argv[1] in INFERENCE_COMMANDS:
      # Inference frees one large activation arena per call; mimalloc's default delayed
      # purge let the peak resident set wander between 806 and 1,164 MiB (batch 8, 513x513),
      # immediate purging held it at ~735 MiB at the same speed (README, "Speed on the CPU").
      env.setdefault('MIMALLOC_PURGE_DELAY', '0')
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


if __name__ == '__main__':
  _reexec_with_mimalloc()
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # TF's C++ INFO lines drown the progress
  app.run(main)
