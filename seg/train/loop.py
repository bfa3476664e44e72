"""The training run: resumable loop, checkpoints, stop requests, periodic evaluation, reports."""

import json
import os
import signal
import threading
import time
from typing import Any, Dict, Optional

import jax
import ml_collections
import numpy as np

from seg import checkpoint, parallel
from seg import config as config_lib
from seg.inference import evaluate
from seg.inference.metrics import format_report
from seg.model import create_model
from seg.train import changes as changes_lib
from seg.train import tensorboard
from seg.train.best import BestWeights
from seg.train.step import (TrainState, create_learning_rate_fn, create_train_state,
                             describe_loss, make_p_train_step)


def init_from_pretrained(state: TrainState, config, log=print) -> TrainState:
  """A new run's parameters and BatchNorm statistics from `config.train.init_from`.

  What is loaded and what stays freshly initialised is decided and logged by
  `seg.weights.init_from.init_from_workdir` (config.train.init_part).
  """
  from seg.weights import init_from
  variables = init_from.init_from_workdir(
      config, {'params': state.params, 'batch_stats': state.batch_stats}, log)
  return state.replace(params=variables['params'], batch_stats=variables['batch_stats'])


# TF-slim's ImageNet MobileNetV2 checkpoints (docs/weights.md), by width.
IMAGENET_CHECKPOINT_URL = 'https://storage.googleapis.com/mobilenet_v2/checkpoints/{name}.tgz'


def check_initialisation(config, workdir: str) -> None:
  """Refuses a new run that would start from random weights without saying so.

  DeepLab always starts from ImageNet weights; from random ones a VOC run ends far below
  its figures. A new run (no checkpoint in `workdir`) needs `train.init_from` (a workdir,
  e.g. written by `import-weights`) or `train.from_scratch=True`; the error gives the
  commands. Raises ValueError (FileNotFoundError for an init_from that is no workdir).
  """
  if checkpoint.latest_step(workdir) is not None:
    return  # resuming: the weights come from the checkpoint
  init_from = config.train.init_from
  if init_from:
    if not os.path.isfile(os.path.join(init_from, checkpoint.CONFIG_FILE)):
      raise FileNotFoundError(f'train.init_from={init_from}: no {checkpoint.CONFIG_FILE} '
                              'there; give a workdir written by import-weights or train')
    return
  if config.train.from_scratch:
    return
  name = f'mobilenet_v2_{config.model.width}_224'
  url = IMAGENET_CHECKPOINT_URL.format(name=name)
  raise ValueError(
      'this config trains from ImageNet weights, as DeepLab does, and train.init_from is '
      'empty. Import the TF-slim checkpoint once (docs/weights.md):\n'
      f'  curl -LO {url} && mkdir {name} && tar xzf {name}.tgz -C {name}\n'
      f'  python main.py import-weights --format deeplab-tf {name} --output runs/{name}\n'
      f'then add --config.train.init_from=runs/{name}; or add '
      '--config.train.from_scratch=True to train from random weights (far below DeepLab\'s '
      'figures)')


def keep_bias_rule_of_old_run(config, workdir: str, log=print) -> None:
  """A run checkpointed before `train.bias_gradient_multiplier` existed trained its conv
  biases at 1x: resumed, it keeps 1x (DeepLab's 2x half-way would change its recipe)."""
  path = os.path.join(workdir, checkpoint.CONFIG_FILE)
  if (config.train.bias_gradient_multiplier == 1.0 or not os.path.isfile(path)
      or checkpoint.latest_step(workdir) is None):
    return
  with open(path) as f:
    if 'bias_gradient_multiplier' in json.load(f).get('train', {}):
      return
  config.train.bias_gradient_multiplier = 1.0
  log(f'{workdir} was trained before train.bias_gradient_multiplier existed (biases at 1x): '
      'resuming with 1.0, not DeepLab\'s 2.0')


def report_changes(previous, config, workdir: str, log=print) -> None:
  """Says and records (`seg.train.changes`) what the config resuming `workdir` changed."""
  changed = changes_lib.changed_fields(previous, config)
  if not changed:
    return
  step = checkpoint.latest_step(workdir)
  rates = changes_lib.learning_rates_at(previous, config, step)
  for line in changes_lib.describe(changed, step, rates):
    log(line)
  if jax.process_index() == 0:
    changes_lib.record(workdir, changed, step)


def warn_from_scratch(config, log=print) -> None:
  """The warning of a new run from random weights on a real dataset."""
  if config.train.from_scratch and config.data.dataset != 'embedded':
    log(f'WARNING: training {config.data.folder or config.data.dataset} from random weights '
        '(train.from_scratch=True); DeepLab starts from ImageNet weights, and without them '
        'the run ends far below its figures (docs/training.md)')


def train_vars(state: TrainState) -> Dict[str, Any]:
  return {'opt_state': state.opt_state, 'step': state.step,
          'nonfinite_steps': state.nonfinite_steps}


def save_state(manager, state: TrainState) -> None:
  """Saves the (replicated) state; every process calls it (orbax saves collectively)."""
  host = parallel.unreplicate(state)
  checkpoint.save(manager, int(host.step),
                  {'params': host.params, 'batch_stats': host.batch_stats}, train_vars(host))


def restore_state(manager, state: TrainState) -> TrainState:
  restored = checkpoint.restore(
      manager, {'params': state.params, 'batch_stats': state.batch_stats}, train_vars(state))
  if restored is None:
    return state
  model_vars, train_items = restored
  return state.replace(params=model_vars['params'], batch_stats=model_vars['batch_stats'],
                       opt_state=train_items['opt_state'], step=train_items['step'],
                       nonfinite_steps=train_items['nonfinite_steps'])


class _StopRequests:
  """Turns SIGTERM / SIGINT into a request to stop after the current step.

  A second SIGINT (Ctrl-C twice) interrupts at once. Handlers are only
  installed from the main thread (Python's rule) and restored on exit.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received = None
    self._previous = {}

  def _handle(self, signum, frame):
    if self.received == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = signum

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def agreed(self, step: int, sync: bool) -> bool:
    """Whether to stop now; with several processes, stop if any process was signalled.

    `sync` says whether this step is one where every process checks (several
    processes must all stop at the same step or their collectives hang).
    """
    if jax.process_count() == 1:
      return self.received is not None
    if not sync:
      return False
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.int32(self.received is not None))
    return bool(np.any(flags))


def _check_finite(state: TrainState, skip: bool, before: int = 0) -> int:
  """Raises on a non-finite step of this run unless `skip`; returns the count of skipped steps.

  `before`: the count restored from the checkpoint (steps an earlier run skipped with
  skip_nonfinite=True), which does not make this run fail.
  """
  count = int(parallel.unreplicate(state.nonfinite_steps))
  if count > before and not skip:
    first = int(parallel.unreplicate(state.first_nonfinite_step))
    raise FloatingPointError(
        f'non-finite loss or gradient at step {first} (its update was not applied); training '
        f'stopped without saving, the last checkpoint is kept. Lower the learning rate, or set '
        f'--config.train.skip_nonfinite=True to skip such steps')
  return count


def _format_duration(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  return f'{minutes // 60}h{minutes % 60:02d}m' if minutes >= 60 else f'{minutes}m{seconds:02d}s'


def _evaluate(p_eval_step, model, state, config, step, writer, log, eval_log: str,
              best: Optional[BestWeights]) -> Dict:
  """Evaluates the replicated `state`, sends the report and example masks to TensorBoard,
  appends its figures to `eval_log` (JSON lines: step, miou, pixel_accuracy) and offers the
  weights to `best`."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  report = evaluate.evaluate(p_eval_step, variables, config, log=log)
  if jax.process_index() == 0:
    with open(eval_log, 'a') as f:
      f.write(json.dumps({'step': step, 'miou': report['miou'],
                          'pixel_accuracy': report['pixel_accuracy']}) + '\n')
  if best is not None:
    best.offer(state, step, report['miou'])
  writer.report(step, report)
  if config.train.summary_images and jax.process_index() == 0:
    panels = tensorboard.validation_examples(model, parallel.unreplicate(variables), config,
                                           config.train.summary_images)
    if panels is not None:
      writer.images(step, 'eval/examples', panels)
  writer.flush()
  return report


TRANSFERS = ('auto', 'uint8', 'float32')


def transfers_uint8(transfer: str) -> bool:
  """Whether training crops travel as uint8 (`config.data.transfer`; 'auto': not on a CPU)."""
  if transfer not in TRANSFERS:
    raise ValueError(f'data.transfer must be one of {TRANSFERS}, got {transfer!r}')
  return transfer == 'uint8' or (transfer == 'auto' and jax.default_backend() != 'cpu')


class TimedBatches:
  """An iterator that adds up the seconds its consumer waits in `next` (input-bound time)."""

  def __init__(self, batches):
    self._batches = batches
    self.waited = 0.0

  def __iter__(self):
    return self

  def __next__(self):
    start = time.perf_counter()
    try:
      return next(self._batches)
    finally:
      self.waited += time.perf_counter() - start


def keep_folder_facts(config: ml_collections.ConfigDict, facts: Dict) -> None:
  """Keeps in the config (then config.json, for eval, predict and exports) a dataset folder's
  labelmap.txt names and colours, and the side up to which its eval images run whole as
  `predict`'s default --max-side; fields the config gives are kept."""
  if facts['names'] and not config.data.class_names:
    config.data.class_names = ','.join(facts['names'])
  if facts['colours'] and not config.data.class_colours:
    config.data.class_colours = ';'.join(','.join(map(str, c)) for c in facts['colours'])
  if facts['eval_side'] > config.data.eval_size and not config.data.predict_max_side:
    config.data.predict_max_side = facts['eval_side']


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, log=print,
                       stop_at_step: Optional[int] = None) -> Dict:
  """Trains (resuming from the latest checkpoint in `workdir`), then evaluates.

  Every process of a multi-host run calls this with the same arguments. SIGTERM
  or SIGINT stops after the current step (with several processes: at the next
  logging step) with a checkpoint; so does `stop_at_step` (a preemption at a
  known step, for tests). Written by process 0: WORKDIR/config.json,
  train_log.jsonl (appended at every logging step), eval_log.jsonl (at every evaluation),
  tensorboard/, eval.json, eval_images.csv, train_curves.png, per_class_iou.png,
  confusion_matrix.png, and best/ (`seg.train.best`, with train.keep_best).

  Returns the final evaluation report (also WORKDIR/eval.json), or, when
  stopped early, {'stopped_at_step': step}.
  """
  from seg.data import pipeline  # TensorFlow stays out of the import of this module.
  # Everything a user can get wrong fails here, before anything is written or compiled.
  config_lib.validate(config)
  checkpoint.check_shared_workdir(workdir)
  check_initialisation(config, workdir)
  batch_size = parallel.local_batch_size(config.train.batch_size)
  parallel.local_batch_size(config.eval.batch_size)  # fail now, not after training
  model = create_model(config.model)
  # Missing dataset archives; a dataset folder's classes that the model does not fit.
  folder_facts = pipeline.prepare(config.data, config.model.num_classes, log,
                                  jax.process_count())
  if folder_facts:
    keep_folder_facts(config, folder_facts)
  keep_bias_rule_of_old_run(config, workdir, log)
  previous = changes_lib.previous_config(workdir)  # the run being resumed, if any
  checkpoint.save_config(workdir, config)  # a workdir of another model
  if previous is not None:
    report_changes(previous, config, workdir, log)
  learning_rate_fn = create_learning_rate_fn(config.train)
  rng = jax.random.key(config.train.seed)
  init_rng, step_rng = jax.random.split(rng)
  state = create_train_state(init_rng, config, model, learning_rate_fn)
  manager = checkpoint.create_manager(workdir, config.train.keep_checkpoints)
  state = restore_state(manager, state)
  start_step = int(state.step)
  # The checkpoint keeps the count of skipped steps, not the first of them (first_nonfinite_step
  # is this run's own): only this run's non-finite steps make it fail (skip_nonfinite=False).
  nonfinite_before = int(state.nonfinite_steps)
  if not start_step and config.train.init_from:
    state = init_from_pretrained(state, config, log)
  elif not start_step:
    warn_from_scratch(config, log)
  num_steps = config.train.steps
  skip_nonfinite = config.train.skip_nonfinite
  is_chief = jax.process_index() == 0
  # A workdir trained to train.steps (or beyond: a run asked for fewer steps) is evaluated at
  # the step it holds.
  final_step = max(num_steps, start_step)
  loss = describe_loss(config.train)
  log(f'{parallel.describe_devices(config.train.batch_size)}, '
      f'compute {config.train.compute_dtype}, ' + (f'loss: {loss}, ' if loss else '')
      + (f'already trained to step {start_step} (train.steps={num_steps}): evaluating it'
         if start_step >= num_steps > 0 else
         f'resuming at step {start_step}' if start_step else 'starting from scratch'))

  p_train_step = make_p_train_step(config, learning_rate_fn)
  p_eval_step = evaluate.make_p_eval_step(model, config)
  state = parallel.replicate(state)
  # The stream depends on the seed only: a resumed run skips to where it stopped.
  batches = pipeline.train_batches(config.data, batch_size, config.train.seed,
                                   jax.process_index(), jax.process_count(), start_step,
                                   as_uint8=transfers_uint8(config.data.transfer),
                                   num_classes=config.model.num_classes)
  # Two batches in flight on the devices while a step runs; the wait for them is timed.
  batches = TimedBatches(parallel.prefetch_to_device(batches, 2))
  writer = tensorboard.SummaryWriter(workdir, enabled=is_chief)
  train_log = os.path.join(workdir, 'train_log.jsonl')
  eval_log = os.path.join(workdir, 'eval_log.jsonl')
  best = BestWeights(workdir, config, log) if config.train.keep_best else None
  last_log, last_log_step, run_start = time.time(), start_step, time.time()
  last_waited = 0.0
  step, stopped = start_step, None
  with _StopRequests() as stop_requests:
    try:
      for step in range(start_step + 1, num_steps + 1):
        batch = next(batches)
        state, metrics = p_train_step(state, batch, parallel.replicate(
            jax.random.fold_in(step_rng, step)))
        is_log_step = step % config.train.log_every == 0 or step == num_steps
        if is_log_step:
          skipped = _check_finite(state, skip_nonfinite, nonfinite_before)
          metrics = {k: float(v) for k, v in parallel.unreplicate(metrics).items()}
          now = time.time()
          rate = (step - last_log_step) * config.train.batch_size / (now - last_log)
          eta = (num_steps - step) * config.train.batch_size / rate
          # The share of the time since the last log spent waiting for input batches.
          input_wait = min((batches.waited - last_waited) / max(now - last_log, 1e-9), 1.0)
          last_waited = batches.waited
          log(f'step {step:>6}/{num_steps}  loss {metrics["loss"]:.4f}  '
              f'pixel acc {100 * metrics["pixel_accuracy"]:5.1f}%  '
              f'lr {metrics["learning_rate"]:.2e}  {rate:6.1f} img/s  '
              f'input wait {100 * input_wait:3.0f}%  eta {_format_duration(eta)}'
              + (f'  ({skipped} non-finite steps skipped)' if skipped else ''))
          record = {'step': step, **metrics, 'images_per_second': rate,
                    'input_wait_fraction': input_wait, 'nonfinite_steps': skipped}
          writer.scalars(step, {k: v for k, v in record.items() if k != 'step'})
          if is_chief:
            with open(train_log, 'a') as f:
              f.write(json.dumps(record) + '\n')
          last_log, last_log_step = now, step
        elif step == start_step + 1:
          # The first step of a run compiles (and fills the input pipeline's buffers): said
          # once here, and left out of the rates and the ETA, which it made look several
          # times slower at the first log.
          now = time.time()
          log(f'step {step} compiled and started in {_format_duration(now - run_start)}; '
              f'progress every {config.train.log_every} steps')
          last_log, last_log_step, last_waited = now, step, batches.waited
        if stop_requests.agreed(step, is_log_step) or step == stop_at_step:
          stopped = step
        if step % config.train.checkpoint_every == 0 or step == num_steps or stopped:
          _check_finite(state, skip_nonfinite, nonfinite_before)   # never save after one
          save_state(manager, state)
        if stopped:
          break
        if config.train.eval_every and step % config.train.eval_every == 0 and step != num_steps:
          eval_start = time.time()
          _evaluate(p_eval_step, model, state, config, step, writer, log, eval_log,
                    best)
          last_log += time.time() - eval_start  # the rates count training time only
    finally:
      # Also on an error: the save in flight completes, the last good checkpoint with it.
      manager.wait_until_finished()
  train_seconds = time.time() - run_start

  if stopped:
    writer.close()
    why = (signal.Signals(stop_requests.received).name if stop_requests.received
           else 'request')
    log(f'stopped by {why} after step {stopped}/{num_steps}; checkpoint saved in '
        f'{os.path.join(workdir, "checkpoints")}. Resume with the same command: '
        f'python main.py train --config CONFIG --workdir {workdir}')
    return {'stopped_at_step': stopped}

  report = _evaluate(p_eval_step, model, state, config, final_step, writer, log, eval_log,
                     best)
  writer.close()
  report.update(step=final_step, train_seconds_this_run=round(train_seconds, 1))
  log(format_report(report))
  if is_chief:
    evaluate.write_report(report, os.path.join(workdir, 'eval.json'),
                          os.path.join(workdir, ''), log=lambda _: None)
    from seg import plots  # matplotlib only once there is something to draw
    if os.path.exists(train_log):
      plots.plot_training_curves(train_log, os.path.join(workdir, 'train_curves.png'),
                                 eval_log)
  log(f'trained steps {start_step}..{final_step} in {_format_duration(train_seconds)}; '
      f'report in {os.path.join(workdir, "eval.json")} (every val image\'s scores in '
      f'eval_images.csv), plots and TensorBoard (tensorboard --logdir {writer.logdir}) '
      'beside it')
  if best is not None and best.step is not None and best.step != final_step:
    log(f'the best evaluation was at step {best.step} ({100 * best.miou:.2f}% val mIoU, '
        f'{100 * report["miou"]:.2f}% at the end): its weights are in {best.path}')
  return report
