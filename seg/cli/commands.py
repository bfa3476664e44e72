"""What each command does with its parsed flags: a thin call into the library.

Each command is a function of keyword arguments; `run` maps parsed flags onto it. Errors a
user can cause are raised as `CommandError` (one line, exit status 1).
"""

import argparse
import contextlib
import json
import sys
from typing import Optional, Sequence, Tuple

from seg import config as config_lib


class CommandError(Exception):
  """A mistake of the user's (bad path, missing data, mismatching weights): exit status 1."""


# What the libraries raise for a user's mistake: a bad config value or flag (ValueError, and
# WeightsMismatchError, a ValueError), a missing file, dataset archive (voc.SourceError, a
# FileNotFoundError) or workdir, an output that exists; and a run whose loss became NaN
# (FloatingPointError, whose message says what to change).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, FloatingPointError)


@contextlib.contextmanager
def _user_errors():
  """Turns USER_ERRORS into a CommandError: one message, exit status 1, no traceback."""
  try:
    yield
  except USER_ERRORS as e:
    raise CommandError(str(e)) from None


def _experiment(path: Optional[str], overrides: Sequence[Tuple[str, str]]):
  """The experiment file's config with the overrides, or None without a file."""
  if path is None:
    return None
  with _user_errors():
    return config_lib.load_experiment(path, overrides)


def _passes_as_overrides(scales, flip) -> list:
  """eval's --scales / --flip as the --config.eval overrides they stand for."""
  return ([('eval.scales', repr(tuple(scales)))] if scales is not None else []) + \
      ([('eval.flip', str(flip))] if flip is not None else [])


def _workdir_config(workdir: str, path: Optional[str], overrides):
  """The experiment file's config, else the workdir's own, with the overrides applied."""
  if path is not None:
    return _experiment(path, overrides)
  if not overrides:
    return None
  from seg import checkpoint
  with _user_errors():
    config = checkpoint.load_config(workdir)
    config_lib.apply_overrides(config, overrides)
    config_lib.validate(config)
  return config


def summary(*, config) -> None:
  from seg.model import complexity
  with _user_errors():
    print(complexity.format_summary(config, complexity.describe(config)))


def train(*, config, workdir: str, coordinator: str = '', num_processes: Optional[int] = None,
          process_id: int = -1) -> None:
  from seg import parallel
  with _user_errors():
    parallel.initialize_distributed(coordinator, num_processes, process_id)
    from seg.train import loop
    loop.train_and_evaluate(config, workdir)  # exit 0 also when stopped by a signal


def _calibration(dtype: str, calibration: str, calibration_count: int):
  """The int8 calibration flags as keyword arguments; refused with another dtype."""
  if dtype != 'int8' and (calibration or calibration_count):
    raise CommandError('--calibration and --calibration-count are for --dtype int8')
  return dict(calibration=calibration or None, calibration_count=calibration_count)


def evaluate(*, workdir: str, config=None, output: Optional[str] = None,
             dtype: str = 'float32', calibration: str = '',
             calibration_count: Optional[int] = None, worst: int = 0) -> None:
  from seg.inference import evaluate as evaluate_lib
  calibrate = _calibration(dtype, calibration, calibration_count)
  with _user_errors():  # also e.g. no calibration images
    evaluate_lib.evaluate_workdir(workdir, config, output, dtype=dtype, worst=worst,
                                  **calibrate)


def evaluate_files(*, workdir: str, images: Sequence[str], labels: str,
                   output: Optional[str] = None, dtype: str = 'float32',
                   calibration: str = '', calibration_count: Optional[int] = None,
                   worst: int = 0, scales=None, flip=None,
                   max_side: Optional[int] = None) -> None:
  from seg.predict import scoring
  calibrate = _calibration(dtype, calibration, calibration_count)
  with _user_errors():
    scoring.evaluate_files(workdir, images, labels, output, worst, dtype=dtype, scales=scales,
                           flip=flip, max_side=max_side, **calibrate)


def compare(*, workdirs: Sequence[str]) -> None:
  from seg.train import compare as compare_lib
  with _user_errors():
    compare_lib.compare(workdirs)


def predict(*, workdir: str, inputs: Sequence[str], output: str, batch_size: int = 8,
            dtype: str = 'float32', calibration: str = '',
            calibration_count: Optional[int] = None, scales=None, flip=None,
            **options) -> int:
  from seg.inference.engine import batch_devices
  from seg.predict import Options, predict_paths
  from seg.predict.memory import parse_budget
  calibrate = _calibration(dtype, calibration, calibration_count)
  with _user_errors():
    if 'memory_budget' in options:
      options['memory_budget'] = parse_budget(options['memory_budget'])
    failures = predict_paths(workdir, inputs, output, Options(**options),
                             batch_size=batch_size, dtype=dtype, devices=batch_devices(),
                             scales=scales, flip=flip, **calibrate)
  return 1 if failures else 0


def prepare_data(*, dataset: str, data_dir: str = '', manual_dir: str = '',
                 folder: str = '') -> None:
  from seg.data import voc
  from seg.data.folder import class_summary
  with _user_errors():
    if dataset == 'folder' and not folder:
      raise ValueError('--dataset folder needs --folder DIR, the dataset\'s folder')
    builder = voc.prepare(dataset, data_dir, manual_dir, root=folder)
  print(f'{dataset} prepared in {builder.data_dir}')
  for split, info in builder.info.splits.items():
    print(f'  {split:<10} {info.num_examples:>7,} examples')
  facts = voc.folder_facts(builder)
  if facts:
    print(class_summary(facts, data_dir))


def import_weights(*, fmt: str, src: str, output: str, config=None) -> None:
  from seg.weights import importer
  with _user_errors():
    importer.import_weights(fmt, src, output, config)


def benchmark(*, config=None, workdir: Optional[str] = None, train: bool = False,
              steps: int = 30, as_json: bool = False, calibration: str = '',
              calibration_count: Optional[int] = None, **settings) -> None:
  if train:  # training images/s: in-memory batches, then the real input pipeline
    if config is None:
      raise CommandError('--train needs --config')
    from seg.train import benchmark as train_benchmark
    with _user_errors():
      train_benchmark.run_train_benchmark(config, steps=steps)
    return
  if config is None and not workdir:
    raise CommandError('--config or --workdir required')
  calibrate = _calibration(settings.get('dtype', 'float32'), calibration, calibration_count)
  if calibration and not workdir:
    raise CommandError('--calibration needs --workdir (random weights run fixed scales)')
  from seg.inference import benchmark as inference_benchmark
  with _user_errors():
    record = inference_benchmark.benchmark(config, workdir, **settings, **calibrate)
  print(json.dumps(record) if as_json else inference_benchmark.format_record(record))


def export(*, workdir: str, output: str, fmt: str = 'jax', config=None,
           platforms: str = 'cpu,cuda', dtype: str = 'float32', batch_size: Optional[int] = None,
           height: int = 0, width: int = 0, size: str = '', quantize: str = '',
           calibration: str = '', calibration_count: Optional[int] = None,
           logits: bool = False, scales=None, flip=None) -> None:
  if fmt == 'jax':
    if size or quantize or logits:
      raise CommandError('--size, --quantize and --logits are for --format tflite or onnx '
                         '(jax: --height/--width, --dtype)')
    calibrate = _calibration(dtype, calibration, calibration_count)
    from seg.inference import export as export_lib
    with _user_errors():
      export_lib.export_workdir(workdir, output, platforms.split(','), config, dtype, batch_size,
                                height or None, width or None, **calibrate, scales=scales,
                                flip=flip)
    return
  if height or width:
    raise CommandError('--height/--width are for --format jax; use --size HxW')
  if scales is not None or flip is not None:
    raise CommandError(f'--scales and --flip are for --format jax: the {fmt} export holds one '
                       'pass at scale 1')
  _say_exports_run_one_pass(workdir, fmt, config)
  from seg.export import exporter
  with _user_errors():
    exporter.export_model(workdir, fmt, output, config, size or None, quantize or None,
                          calibration or None, calibration_count, logits)


def _say_exports_run_one_pass(workdir: str, fmt: str, config=None) -> None:
  """A model evaluated (and by default predicted) with several scales or flips is exported
  to LiteRT, ONNX or Hugging Face as its one plain pass: said, so that nobody expects the
  exported masks to be eval's."""
  from seg import checkpoint
  from seg.inference.forward import is_multi_scale
  try:
    evaluation = (config or checkpoint.load_config(workdir)).eval
  except FileNotFoundError:
    return   # the export itself names the missing workdir
  if is_multi_scale(evaluation.scales, evaluation.flip):
    listed = ', '.join(f'{s:g}' for s in evaluation.scales)
    print(f'note: the config evaluates (and predict runs) scales {listed}'
          f'{" with flips" if evaluation.flip else ""}; the {fmt} export holds one pass at '
          'scale 1 (average the passes yourself for those masks; --format jax holds them)')


def run(args: argparse.Namespace) -> int:
  """Calls the command named by `args.command` with its flags; returns the exit status."""
  a, command = args, args.command
  if command == 'summary':
    summary(config=_experiment(a.config, a.overrides))
  elif command == 'train':
    train(config=_experiment(a.config, a.overrides), workdir=a.workdir,
          coordinator=a.coordinator, num_processes=a.num_processes, process_id=a.process_id)
  elif command == 'eval' and (a.images or a.labels):
    if not (a.images and a.labels):
      raise CommandError('--images and --labels go together: the images to score and the '
                         'folder of their label PNGs')
    if a.config is not None or a.overrides:
      raise CommandError('--config applies to the dataset\'s split; with --images give '
                         '--scales/--flip/--max-side')
    evaluate_files(workdir=a.workdir, images=a.images, labels=a.labels, output=a.output,
                   dtype=a.dtype, calibration=a.calibration,
                   calibration_count=a.calibration_count, worst=a.worst, scales=a.scales,
                   flip=a.flip, max_side=a.max_side)
  elif command == 'eval':
    if a.max_side is not None:
      raise CommandError('--max-side goes with --images (the dataset\'s split is evaluated '
                         'at full size)')
    overrides = list(a.overrides) + _passes_as_overrides(a.scales, a.flip)
    evaluate(workdir=a.workdir, config=_workdir_config(a.workdir, a.config, overrides),
             output=a.output, dtype=a.dtype, calibration=a.calibration,
             calibration_count=a.calibration_count, worst=a.worst)
  elif command == 'compare':
    compare(workdirs=a.workdirs)
  elif command == 'predict':
    return predict(workdir=a.workdir, inputs=a.input, output=a.output,
                   batch_size=a.batch_size, dtype=a.dtype, overwrite=a.overwrite,
                   overlay=a.overlay, probabilities=a.probabilities,
                   large_images=a.large_images, max_side=a.max_side, workers=a.workers,
                   profile=a.profile, memory_budget=a.memory_budget, shard=a.shard,
                   calibration=a.calibration, calibration_count=a.calibration_count,
                   scales=a.scales, flip=a.flip)
  elif command == 'prepare-data':
    prepare_data(dataset=a.dataset, data_dir=a.data_dir, manual_dir=a.manual_dir,
                 folder=a.folder)
  elif command == 'import-weights':
    import_weights(fmt=a.format, src=a.src, output=a.output,
                   config=_experiment(a.config, a.overrides))
  elif command == 'benchmark':
    benchmark(config=_experiment(a.config, a.overrides), workdir=a.workdir, train=a.train,
              steps=a.steps, as_json=a.json, batch_size=a.batch_size,
              height=a.height or None, width=a.width or None, dtype=a.dtype,
              measure=a.measure, warmup=a.warmup, iters=a.iters,
              image_by_image=a.image_by_image, calibration=a.calibration,
              calibration_count=a.calibration_count)
  elif command == 'export':
    export(workdir=a.workdir, output=a.output, fmt=a.format,
           config=_workdir_config(a.workdir, a.config, a.overrides), platforms=a.platforms,
           dtype=a.dtype, batch_size=None if a.symbolic_batch else a.batch_size,
           height=a.height, width=a.width, size=a.size, quantize=a.quantize,
           calibration=a.calibration, calibration_count=a.calibration_count, logits=a.logits,
           scales=a.scales, flip=a.flip)
  else:  # argparse only lets the commands above through
    raise AssertionError(command)
  sys.stdout.flush()
  return 0
