"""The command line: summary, train, eval, predict, prepare-data, benchmark, export.

    python main.py summary --config experiments/quickstart.py
    python main.py train   --config experiments/quickstart.py --workdir runs/quickstart
    python main.py eval    --workdir runs/quickstart [--config ...] [--output report.json]
    python main.py predict --workdir runs/quickstart --input PATH[,PATH...] --output DIR
        [--overwrite] [--overlay] [--probabilities=float16] [--large-images=tile] ...
    python main.py prepare-data --dataset {embedded,voc2012,train_aug} [--manual-dir DIR] [--data-dir DIR]
    python main.py import-weights --format {deeplab-tf,hf,keras} SRC --output DIR [--config ...]
    python main.py benchmark --config experiments/base.py --batch-size 8 [--dtype bfloat16] [--json]
    python main.py export  --workdir runs/quickstart --output model.jax [--platforms cpu,cuda]
    python main.py benchmark --train --config experiments/quickstart.py [--steps 30]

Multi-host training: the same `train` command on every host, with
`--coordinator HOST:PORT --num-processes N --process-id I` (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID; or none of them under SLURM / Open MPI).

Any config field can be overridden, e.g. `--config.train.steps=100`.
"""

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from seg import runtime

config_flags.DEFINE_config_file('config', None, 'Experiment file (experiments/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Run folder: config, checkpoints, reports.')
flags.DEFINE_multi_string('input', None, 'predict: image files, folders (recursive), glob '
                          'patterns or .txt/.lst lists of paths; repeat or comma-separate.')
flags.DEFINE_string('output', None, 'eval: report JSON path; predict: output folder; '
                    'import-weights: the workdir to write.')
flags.DEFINE_enum('format', None, ['deeplab-tf', 'hf', 'keras'],
                  'import-weights: the format of SRC (see seg/weights.py).')
flags.DEFINE_string('dataset', None, 'prepare-data: embedded, voc2012 or train_aug.')
flags.DEFINE_string('manual-dir', '', 'prepare-data: folder with the source archives or their '
                    'extracted folders (default: DATA_DIR/downloads/manual).')
flags.DEFINE_string('data-dir', '', 'prepare-data: TFDS data_dir (default ~/tensorflow_datasets).')
flags.DEFINE_bool('overwrite', False, 'predict: redo inputs whose outputs already exist '
                  '(default: skip them, so an interrupted run resumes).')
flags.DEFINE_bool('overlay', False, 'predict: also write NAME_overlay.jpg (image + colours).')
flags.DEFINE_enum('probabilities', 'none', ['none', 'float16', 'uint8'],
                  'predict: also write NAME_prob.npy, class probabilities [C, H, W] as float16 '
                  'or uint8 round(255 p).')
flags.DEFINE_integer('batch-size', None, 'Images per compiled call: predict (default 8, images '
                     'of one shape bucket), benchmark and export (default 1).')
flags.DEFINE_enum('large-images', 'resize', ['resize', 'tile'],
                  'predict: images with a side above --max-side are downscaled to fit and '
                  'their class probabilities upsampled back (resize), or cut into '
                  '--max-side tiles overlapping by 64 pixels (tile).')
flags.DEFINE_integer('max-side', 2049, 'predict: the largest side predicted in one piece.')
flags.DEFINE_integer('workers', 2, 'predict: decoding threads, and as many writing threads.')
flags.DEFINE_integer('height', 0, 'benchmark, export: padded input height (default eval_size).')
flags.DEFINE_integer('width', 0, 'benchmark, export: padded input width (default eval_size).')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                  'predict, benchmark, export: compute dtype of the engine (products '
                  'accumulate in float32).')
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


def evaluate():
  _require(workdir=FLAGS.workdir)
  from seg import evaluate as evaluate_lib
  evaluate_lib.evaluate_workdir(FLAGS.workdir, FLAGS.config, FLAGS.output)


def predict():
  _require(workdir=FLAGS.workdir, input=FLAGS.input, output=FLAGS.output)
  from seg import predict as predict_lib
  from seg.engine import batch_devices
  options = predict_lib.Options(
      overwrite=FLAGS.overwrite, overlay=FLAGS.overlay, probabilities=FLAGS.probabilities,
      large_images=FLAGS['large-images'].value, max_side=FLAGS['max-side'].value,
      workers=FLAGS.workers)
  try:
    failures = predict_lib.predict_paths(FLAGS.workdir, FLAGS.input, FLAGS.output, options,
                                         batch_size=FLAGS['batch-size'].value or 8,
                                         dtype=FLAGS.dtype, devices=batch_devices())
  except (FileNotFoundError, ValueError) as e:  # bad arguments: one clear line, no traceback
    raise app.UsageError(str(e))
  except KeyboardInterrupt:  # the summary said how to resume
    sys.exit(130)
  if failures:
    sys.exit(1)


def prepare_data():
  _require(dataset=FLAGS.dataset)
  from seg.data import voc
  try:
    builder = voc.prepare(FLAGS.dataset, FLAGS['data-dir'].value, FLAGS['manual-dir'].value)
  except voc.SourceError as e:
    sys.exit(f'prepare-data: {e}')
  print(f'{FLAGS.dataset} prepared in {builder.data_dir}')
  for split, info in builder.info.splits.items():
    print(f'  {split:<10} {info.num_examples:>7,} examples')


def benchmark():
  if FLAGS.train:  # training images/s: in-memory batches, then the real input pipeline
    _require(config=FLAGS.config)
    from seg import train_benchmark
    train_benchmark.run_train_benchmark(FLAGS.config, steps=FLAGS.steps)
    return
  if not FLAGS.config and not FLAGS.workdir:
    raise app.UsageError('--config or --workdir required')
  from benchmarks import inference_speed
  record = inference_speed.benchmark(
      FLAGS.config, FLAGS.workdir, FLAGS['batch-size'].value or 1, FLAGS.height or None,
      FLAGS.width or None, FLAGS.dtype, FLAGS.measure, FLAGS.warmup, FLAGS.iters,
      FLAGS['image-by-image'].value)
  print(json.dumps(record) if FLAGS.json else inference_speed.format_record(record))


def export():
  _require(workdir=FLAGS.workdir, output=FLAGS.output)
  from seg import export as export_lib
  export_lib.export_workdir(
      FLAGS.workdir, FLAGS.output, FLAGS.platforms.split(','), FLAGS.config, FLAGS.dtype,
      None if FLAGS['symbolic-batch'].value else FLAGS['batch-size'].value or 1,
      FLAGS.height or None, FLAGS.width or None)


def import_weights(src):
  _require(format=FLAGS.format, output=FLAGS.output)
  from seg import weights
  try:
    weights.import_weights(FLAGS.format, src, FLAGS.output, FLAGS.config)
  except weights.WeightsMismatchError as e:  # the list of differences is the whole message
    sys.exit(f'error: {e}')


# Each command is a function of the parsed flags (and of its positional arguments, see
# POSITIONAL); imports happen inside them so that `--help` and usage errors answer
# without loading JAX.
COMMANDS = {
    'summary': summary,
    'train': train,
    'eval': evaluate,
    'predict': predict,
    'prepare-data': prepare_data,
    'import-weights': import_weights,
    'benchmark': benchmark,
    'export': export,
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
  jax.config.update('jax_compilation_cache_dir', runtime.compilation_cache_dir())
  COMMANDS[argv[1]](*argv[2:])


# Commands that only run the network: see seg/runtime.py on MIMALLOC_PURGE_DELAY.
INFERENCE_COMMANDS = ('eval', 'predict', 'benchmark', 'export')


if __name__ == '__main__':
  runtime.reexec_with_mimalloc(
      purge_at_once=len(sys.argv) > 1 and sys.argv[1] in INFERENCE_COMMANDS)
  trains = any(a in ('--train', '--train=true', '--train=True', '--train=1') for a in sys.argv)
  if len(sys.argv) > 1 and (sys.argv[1] == 'predict' or
                            (sys.argv[1] == 'benchmark' and not trains)):
    runtime.split_cpu_into_devices()  # batches computed as two parts at once on a CPU
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # TF's C++ INFO lines drown the progress
  app.run(main)
