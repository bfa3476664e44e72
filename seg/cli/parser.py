"""The commands' flags (argparse) and `--config.FIELD=VALUE` overrides of experiment configs.

Every command has its own flags, so `main.py COMMAND --help` shows only those. Flags are
spelt with hyphens on the command line (`--batch-size`) and read with underscores in code
(`args.batch_size`). A switch `--x` is turned off with `--no-x` (or absl's `--nox`).
"""

import argparse
import os
import re
from typing import List, Tuple

DTYPES = ('float32', 'bfloat16', 'int8')
_OVERRIDE = re.compile(r'^--config\.([A-Za-z_][\w.]*)(?:=(.*))?$', re.S)


def _shard(text: str):
  try:
    index, count = (int(v) for v in text.split('/'))
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r}: give K/N, e.g. 0/4') from None
  if not 0 <= index < count:
    raise argparse.ArgumentTypeError(f'{text!r}: K/N needs 0 <= K < N')
  return index, count


class _Bool(argparse.Action):
  """A switch: --x turns it on, --no-x (or absl's spelling --nox) off."""

  def __init__(self, option_strings, dest, default=False, help=None):
    name = option_strings[0][2:]
    super().__init__([f'--{name}', f'--no-{name}', f'--no{name}'], dest, nargs=0,
                     default=default, help=help)

  def format_usage(self) -> str:
    return ' | '.join(self.option_strings[:2])

  def __call__(self, parser, namespace, values, option_string=None):
    setattr(namespace, self.dest, not option_string.startswith('--no'))


def _scales(text: str):
  try:
    scales = tuple(float(v) for v in text.split(','))
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r}: give comma-separated scales, '
                                     'e.g. 0.75,1,1.25') from None
  if min(scales) <= 0:
    raise argparse.ArgumentTypeError(f'{text!r}: scales must be positive')
  return scales


def _positive(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'must be a positive integer, got {text}')
  return value


def _add_config(p, required: bool, what: str) -> None:
  p.add_argument('--config', required=required, metavar='FILE',
                 help=f'experiment file (experiments/*.py){what}; any field can then be '
                      'overridden with --config.FIELD=VALUE, e.g. --config.train.steps=100')


def _add_calibration(p, what: str) -> None:
  p.add_argument('--calibration', default='', metavar='IMAGES',
                 help=f'{what}: the calibration images, a folder, glob or list, or a dataset '
                      'split (default: those the workdir was calibrated on before, else the '
                      'config\'s training split); the scales are stored as '
                      'WORKDIR/int8_scales.json and reused while model and images stay')
  p.add_argument('--calibration-count', type=_positive, default=None,
                 help=f'{what}: how many calibration images (a seeded choice; default 200)')


def _add_passes(p, scales: str, flip: str) -> None:
  p.add_argument('--scales', type=_scales, default=None, metavar='S,S,...',
                 help='multi-scale inference: the softmax averaged over the image at these '
                      f'scales, e.g. 0.75,1,1.25 (default: {scales})')
  p.add_argument('--flip', action=_Bool, default=None,
                 help=f'also average the left-right flipped image (default: {flip})')


def build_parser() -> argparse.ArgumentParser:
  """The parser of every command (`args.command` names the one given)."""
  parser = argparse.ArgumentParser(
      description='DeepLabv3 + MobileNetV2 in JAX: train, evaluate, predict masks, export.',
      epilog='"main.py COMMAND --help" shows the flags of a command.')
  commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

  p = commands.add_parser('summary', help='parameters, multiply-adds and shapes of a model')
  _add_config(p, True, '')

  p = commands.add_parser('train', help='train (resuming from the workdir), then evaluate')
  _add_config(p, True, '')
  p.add_argument('--workdir', required=True, help='run folder: config, checkpoints, reports')
  p.add_argument('--coordinator', default=os.environ.get('JAX_COORDINATOR_ADDRESS', ''),
                 help='multi-host: address:port of process 0, the same on every host '
                      '(env JAX_COORDINATOR_ADDRESS). Without it and --num-processes: one '
                      'process, or the cluster JAX detects (SLURM, Open MPI)')
  p.add_argument('--num-processes', type=int,
                 default=int(os.environ.get('JAX_NUM_PROCESSES', 0)) or None,
                 help='multi-host: number of processes (env JAX_NUM_PROCESSES)')
  p.add_argument('--process-id', type=int, default=int(os.environ.get('JAX_PROCESS_ID', -1)),
                 help='multi-host: this process, 0..num-processes-1 (env JAX_PROCESS_ID)')

  p = commands.add_parser('eval', help='mIoU of the latest checkpoint of a workdir')
  p.add_argument('--workdir', required=True)
  _add_config(p, False, ' (default: the workdir\'s own config)')
  p.add_argument('--output', help='also write the report as JSON, every image\'s scores '
                 'as OUTPUT_STEM_images.csv and two charts (per-class IoU, confusion matrix)')
  p.add_argument('--worst', type=_positive, default=0, metavar='N',
                 help='with --output: image | label | prediction panels of the N '
                      'lowest-scoring images in OUTPUT_STEM_worst/')
  p.add_argument('--dtype', default='float32', choices=DTYPES,
                 help='engine compute dtype (int8: calibrated once, see --calibration)')
  _add_calibration(p, '--dtype int8')
  _add_passes(p, "the config's eval.scales; the same as --config.eval.scales='(...)'",
              "the config's eval.flip")
  p.add_argument('--images', action='append',
                 help='instead of the dataset\'s split: image files, folders, globs or lists '
                      '(as predict\'s --input), scored against --labels; no dataset to '
                      'prepare, no TensorFlow')
  p.add_argument('--labels', metavar='DIR',
                 help='with --images: the label PNGs, LABELS/RELATIVE_PATH.png (the path '
                      'predict mirrors) or LABELS/NAME.png, as a dataset folder\'s labels')
  p.add_argument('--max-side', type=_positive, default=None, metavar='N',
                 help='with --images: as predict\'s (default: the model\'s)')

  p = commands.add_parser('compare', help='runs side by side: config differences, mIoU, '
                          'per-class IoU, from their workdirs')
  p.add_argument('workdirs', nargs='+', metavar='WORKDIR', help='training workdirs (A, B, ...)')

  p = commands.add_parser('predict', help='masks for image files, folders, globs and lists')
  p.add_argument('--workdir', required=True)
  p.add_argument('--input', action='append', required=True,
                 help='image files, folders (recursive), glob patterns or .txt/.lst lists of '
                      'paths; repeat or comma-separate')
  p.add_argument('--output', required=True, help='output folder')
  p.add_argument('--overwrite', action=_Bool,
                 help='redo inputs whose outputs exist (default: skip them, so a run resumes)')
  p.add_argument('--overlay', action=_Bool, help='also write NAME_overlay.jpg')
  p.add_argument('--probabilities', default='none', choices=('none', 'float16', 'uint8'),
                 help='also write NAME_prob.npy, class probabilities [C, H, W]')
  p.add_argument('--batch-size', type=_positive, default=8,
                 help='images of one padding bucket per compiled call')
  p.add_argument('--large-images', default='resize', choices=('resize', 'tile'),
                 help='images with a side above --max-side are downscaled to fit and their '
                      'logits upsampled back (resize), or cut into tiles (tile)')
  p.add_argument('--max-side', type=_positive, default=None,
                 help="the largest side predicted in one piece (default: the model's "
                      'data.predict_max_side: its data.eval_size, or the side of the largest '
                      'eval image when larger, the scale it was trained and evaluated at)')
  p.add_argument('--memory-budget', default='1536M',
                 help='what the whole process may hold (e.g. 1536M, 4G); it bounds the '
                      'largest compiled shape and the images in flight')
  p.add_argument('--shard', default='0/1', type=_shard,
                 help='K/N: only the inputs whose relative path hashes to shard K of N '
                      '(0 <= K < N), for N machines or array jobs with no coordinator')
  p.add_argument('--workers', type=_positive, default=2,
                 help='decoding threads, and as many writing threads')
  p.add_argument('--dtype', default='float32', choices=DTYPES, help='engine compute dtype')
  _add_calibration(p, '--dtype int8')
  _add_passes(p, "the workdir's config.eval.scales, so the masks are those eval scores; "
                 'usually 1', "the workdir's config.eval.flip")
  p.add_argument('--profile', action=_Bool,
                 help='print where the time went: seconds per stage (decode ... write)')

  p = commands.add_parser('prepare-data', help='build a dataset\'s TFDS files')
  p.add_argument('--dataset', required=True, choices=('embedded', 'voc2012', 'train_aug',
                                                       'folder'))
  p.add_argument('--folder', default='',
                 help='with --dataset folder: your dataset\'s folder, in the VOC layout '
                      '(JPEGImages/, SegmentationClass/, ImageSets/Segmentation/SPLIT.txt)')
  p.add_argument('--manual-dir', default='',
                 help='folder with the source archives or their extracted folders '
                      '(default: DATA_DIR/downloads/manual)')
  p.add_argument('--data-dir', default='', help='TFDS data_dir (default ~/tensorflow_datasets)')

  p = commands.add_parser('import-weights', help='a published checkpoint -> a workdir')
  p.add_argument('src', metavar='SRC', help='the checkpoint (file or folder, see --format)')
  p.add_argument('--format', required=True, choices=('deeplab-tf', 'hf', 'keras'))
  p.add_argument('--output', required=True, help='the workdir to write')
  _add_config(p, False, ' whose model the weights must fit (default: taken from the file)')

  p = commands.add_parser('benchmark', help='inference (or --train: training) speed')
  _add_config(p, False, ' (random weights), or --workdir')
  p.add_argument('--workdir', help='time a trained model instead of random weights')
  p.add_argument('--batch-size', type=_positive, default=1)
  p.add_argument('--height', type=int, default=0, help='padded input height (default eval_size)')
  p.add_argument('--width', type=int, default=0, help='padded input width (default eval_size)')
  p.add_argument('--dtype', default='float32', choices=DTYPES)
  _add_calibration(p, '--dtype int8 with --workdir')
  p.add_argument('--measure', default='network', choices=('network', 'predict'),
                 help='network: float images -> logits at the output stride (what the peers '
                      'time); predict: uint8 images -> class map at full size')
  p.add_argument('--warmup', type=int, default=3, help='untimed runs first')
  p.add_argument('--iters', type=_positive, default=10, help='timed runs (median reported)')
  p.add_argument('--image-by-image', action=_Bool, default=None,
                 help='run the images of a batch one after the other inside the compiled '
                      'call (less memory; the default on a CPU); --no-image-by-image: at '
                      'once (the default on accelerators)')
  p.add_argument('--json', action=_Bool, help='print one JSON line (benchmarks/peers/run.py)')
  p.add_argument('--train', action=_Bool,
                 help='training images/s: in-memory batches and the real input pipeline')
  p.add_argument('--steps', type=_positive, default=30, help='--train: timed steps per phase')

  p = commands.add_parser('export', help='the model for another runtime: jax.export, LiteRT '
                          '(TFLite), ONNX or Hugging Face (docs/export.md)')
  p.add_argument('--workdir', required=True)
  p.add_argument('--format', default='jax', choices=('jax', 'tflite', 'onnx', 'hf'),
                 help='jax: one jax.export file; tflite: a LiteRT flatbuffer (phones); onnx: '
                      'an ONNX model (ONNX Runtime); hf: a transformers folder')
  p.add_argument('--output', required=True, help='the file to write (hf: a folder)')
  _add_config(p, False, ' (default: the workdir\'s own config)')
  p.add_argument('--size', default='', metavar='HxW',
                 help='tflite/onnx: the input size, e.g. 257x257 (tflite default: eval_size '
                      "square, or a folder model's larger eval canvas; onnx default: any size)")
  p.add_argument('--quantize', choices=('int8',),
                 help='tflite/onnx: int8 post-training quantization (needs --calibration)')
  p.add_argument('--calibration', default='', metavar='IMAGES',
                 help='--quantize (tflite/onnx) or --dtype int8 (jax): a folder, glob or list '
                      'of images, or a dataset split (e.g. train; jax: the default)')
  p.add_argument('--calibration-count', type=_positive, default=None,
                 help='how many calibration images (a seeded choice; default 200)')
  p.add_argument('--logits', action=_Bool,
                 help='tflite/onnx: also output the upsampled logits, not only the class map')
  p.add_argument('--platforms', default='cpu,cuda', help='jax: comma-separated, e.g. cpu,cuda')
  p.add_argument('--dtype', default='float32', choices=DTYPES, help='jax: compute dtype')
  p.add_argument('--symbolic-batch', action=_Bool, default=True,
                 help='jax: a symbolic batch dimension (else --batch-size)')
  p.add_argument('--batch-size', type=_positive, default=1)
  p.add_argument('--height', type=int, default=0,
                 help="jax: canvas height (default eval_size, or a folder model's larger eval "
                      'canvas)')
  p.add_argument('--width', type=int, default=0, help='jax: canvas width (default: as --height)')
  _add_passes(p, "jax: the workdir's config.eval.scales, so the file gives the masks eval "
                 'scores; the other formats hold one pass at scale 1', "jax: config.eval.flip")
  return parser


def split_overrides(argv: List[str]) -> Tuple[List[str], List[Tuple[str, str]]]:
  """(the other arguments, [(field, value text)]) of `--config.FIELD=VALUE` or
  `--config.FIELD VALUE` arguments."""
  rest, overrides, i = [], [], 0
  while i < len(argv):
    m = _OVERRIDE.match(argv[i])
    if m and m.group(2) is not None:
      overrides.append((m.group(1), m.group(2)))
    elif m and i + 1 < len(argv):
      overrides.append((m.group(1), argv[i + 1]))
      i += 1
    else:
      rest.append(argv[i])
    i += 1
  return rest, overrides


def parse(parser: argparse.ArgumentParser, argv: List[str]) -> argparse.Namespace:
  """Parses `argv`; `args.overrides` holds the config overrides. Usage errors exit 2."""
  rest, overrides = split_overrides(argv)
  args = parser.parse_args(rest)
  if overrides and 'config' not in vars(args):
    parser.error(f'{args.command} takes no --config.FIELD overrides')
  args.overrides = overrides
  return args
