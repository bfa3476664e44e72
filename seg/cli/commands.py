"""What each command does with its parsed flags: a thin call into the library.

Each command is a function of keyword arguments; `run` maps parsed flags onto it. Errors a
user can cause are raised as `CommandError` (one line, exit status 1).
"""

import argparse
import json
import sys
from typing import Optional, Sequence, Tuple

from seg import config as config_lib


class CommandError(Exception):
  """A mistake of the user's (bad path, missing data, mismatching weights): exit status 1."""


def _experiment(path: Optional[str], overrides: Sequence[Tuple[str, str]]):
  """The experiment file's config with the overrides, or None without a file."""
  if path is None:
    return None
  try:
    return config_lib.load_experiment(path, overrides)
  except (FileNotFoundError, ValueError) as e:
    raise CommandError(str(e)) from None


def _workdir_config(workdir: str, path: Optional[str], overrides):
  """The experiment file's config, else the workdir's own, with the overrides applied."""
  if path is not None:
    return _experiment(path, overrides)
  if not overrides:
    return None
  from seg import checkpoint
  try:
    config = checkpoint.load_config(workdir)
    config_lib.apply_overrides(config, overrides)
  except (FileNotFoundError, ValueError) as e:
    raise CommandError(str(e)) from None
  return config


def summary(*, config) -> None:
  from seg.model import complexity
  print(complexity.format_summary(config, complexity.describe(config)))


def train(*, config, workdir: str, coordinator: str = '', num_processes: Optional[int] = None,
          process_id: int = -1) -> None:
  from seg import parallel
  try:
    parallel.initialize_distributed(coordinator, num_processes, process_id)
  except ValueError as e:
    raise CommandError(str(e)) from None
  from seg import checkpoint
  from seg.train import loop
  try:
    loop.train_and_evaluate(config, workdir)  # exit 0 also when stopped by a signal
  except checkpoint.WorkdirNotShared as e:
    raise CommandError(str(e)) from None


def evaluate(*, workdir: str, config=None, output: Optional[str] = None,
             dtype: str = 'float32') -> None:
  from seg.inference import evaluate as evaluate_lib
  try:
    evaluate_lib.evaluate_workdir(workdir, config, output, dtype=dtype)
  except ValueError as e:  # e.g. no calibration images
    raise CommandError(str(e)) from None


def predict(*, workdir: str, inputs: Sequence[str], output: str, batch_size: int = 8,
            dtype: str = 'float32', **options) -> int:
  from seg.inference.engine import batch_devices
  from seg.predict import Options, predict_paths
  try:
    failures = predict_paths(workdir, inputs, output, Options(**options),
                             batch_size=batch_size, dtype=dtype, devices=batch_devices())
  except (FileNotFoundError, ValueError) as e:  # bad arguments: one clear line
    raise CommandError(str(e)) from None
  return 1 if failures else 0


def prepare_data(*, dataset: str, data_dir: str = '', manual_dir: str = '') -> None:
  from seg.data import voc
  try:
    builder = voc.prepare(dataset, data_dir, manual_dir)
  except voc.SourceError as e:
    raise CommandError(str(e)) from None
  print(f'{dataset} prepared in {builder.data_dir}')
  for split, info in builder.info.splits.items():
    print(f'  {split:<10} {info.num_examples:>7,} examples')


def import_weights(*, fmt: str, src: str, output: str, config=None) -> None:
  from seg.weights import importer, mapping
  try:
    importer.import_weights(fmt, src, output, config)
  except (mapping.WeightsMismatchError, FileNotFoundError, FileExistsError) as e:
    raise CommandError(str(e)) from None


def benchmark(*, config=None, workdir: Optional[str] = None, train: bool = False,
              steps: int = 30, as_json: bool = False, **settings) -> None:
  if train:  # training images/s: in-memory batches, then the real input pipeline
    if config is None:
      raise CommandError('--train needs --config')
    from seg.train import benchmark as train_benchmark
    train_benchmark.run_train_benchmark(config, steps=steps)
    return
  if config is None and not workdir:
    raise CommandError('--config or --workdir required')
  from seg.inference import benchmark as inference_benchmark
  record = inference_benchmark.benchmark(config, workdir, **settings)
  print(json.dumps(record) if as_json else inference_benchmark.format_record(record))


def export(*, workdir: str, output: str, fmt: str = 'jax', config=None,
           platforms: str = 'cpu,cuda', dtype: str = 'float32', batch_size: Optional[int] = None,
           height: int = 0, width: int = 0, size: str = '', quantize: str = '',
           calibration: str = '', calibration_count: int = 200, logits: bool = False) -> None:
  if fmt == 'jax':
    if size or quantize or calibration or logits:
      raise CommandError('--size, --quantize, --calibration and --logits are for --format '
                         'tflite or onnx (jax: --height/--width, --dtype)')
    from seg.inference import export as export_lib
    try:
      export_lib.export_workdir(workdir, output, platforms.split(','), config, dtype, batch_size,
                                height or None, width or None)
    except (FileNotFoundError, ValueError) as e:
      raise CommandError(str(e)) from None
    return
  if height or width:
    raise CommandError('--height/--width are for --format jax; use --size HxW')
  from seg.export import exporter
  try:
    exporter.export_model(workdir, fmt, output, config, size or None, quantize or None,
                          calibration or None, calibration_count, logits)
  except (FileNotFoundError, ValueError) as e:
    raise CommandError(str(e)) from None


def run(args: argparse.Namespace) -> int:
  """Calls the command named by `args.command` with its flags; returns the exit status."""
  a, command = args, args.command
  if command == 'summary':
    summary(config=_experiment(a.config, a.overrides))
  elif command == 'train':
    train(config=_experiment(a.config, a.overrides), workdir=a.workdir,
          coordinator=a.coordinator, num_processes=a.num_processes, process_id=a.process_id)
  elif command == 'eval':
    evaluate(workdir=a.workdir, config=_workdir_config(a.workdir, a.config, a.overrides),
             output=a.output, dtype=a.dtype)
  elif command == 'predict':
    return predict(workdir=a.workdir, inputs=a.input, output=a.output,
                   batch_size=a.batch_size, dtype=a.dtype, overwrite=a.overwrite,
                   overlay=a.overlay, probabilities=a.probabilities,
                   large_images=a.large_images, max_side=a.max_side, workers=a.workers)
  elif command == 'prepare-data':
    prepare_data(dataset=a.dataset, data_dir=a.data_dir, manual_dir=a.manual_dir)
  elif command == 'import-weights':
    import_weights(fmt=a.format, src=a.src, output=a.output,
                   config=_experiment(a.config, a.overrides))
  elif command == 'benchmark':
    benchmark(config=_experiment(a.config, a.overrides), workdir=a.workdir, train=a.train,
              steps=a.steps, as_json=a.json, batch_size=a.batch_size,
              height=a.height or None, width=a.width or None, dtype=a.dtype,
              measure=a.measure, warmup=a.warmup, iters=a.iters,
              image_by_image=a.image_by_image)
  elif command == 'export':
    export(workdir=a.workdir, output=a.output, fmt=a.format,
           config=_workdir_config(a.workdir, a.config, a.overrides), platforms=a.platforms,
           dtype=a.dtype, batch_size=None if a.symbolic_batch else a.batch_size,
           height=a.height, width=a.width, size=a.size, quantize=a.quantize,
           calibration=a.calibration, calibration_count=a.calibration_count, logits=a.logits)
  else:  # argparse only lets the commands above through
    raise AssertionError(command)
  sys.stdout.flush()
  return 0
