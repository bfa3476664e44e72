"""Training: the pmapped step, the DeepLab optimiser recipe and the resumable loop."""

import functools
import json
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax import lax

from seg import checkpoint, evaluate, parallel, summaries
from seg.losses import cross_entropy_sum
from seg.metrics import format_report
from seg.model import AXIS_NAME, create_model, preprocess


class TrainState(train_state.TrainState):
  """Flax's TrainState plus BatchNorm statistics and the non-finite step record.

  nonfinite_steps: int32 count of steps whose loss or gradient was not finite
    (their update was not applied).
  first_nonfinite_step: int32, the first such step (1-based, as logged), -1 if none.
  """
  batch_stats: Any
  nonfinite_steps: jax.Array = 0
  first_nonfinite_step: jax.Array = -1


def create_learning_rate_fn(train_config: ml_collections.ConfigDict) -> optax.Schedule:
  """DeepLab's poly schedule, lr * (1 - step / steps) ** power, after a linear warm-up."""
  warmup = train_config.warmup_steps
  poly = optax.polynomial_schedule(
      init_value=train_config.learning_rate, end_value=0.0, power=train_config.lr_power,
      transition_steps=max(train_config.steps - warmup, 1))
  if not warmup:
    return poly
  ramp = optax.linear_schedule(0.0, train_config.learning_rate, warmup)
  return optax.join_schedules([ramp, poly], [warmup])


def weight_decay_mask(params: Any) -> Any:
  """True for the conv kernels that TF-slim regularises: all but depthwise kernels."""
  def decayed(path, _):
    keys = [getattr(k, 'key', None) for k in path]
    return keys[-1] == 'kernel' and 'depthwise' not in keys
  return jax.tree_util.tree_map_with_path(decayed, params)


def create_optimizer(train_config, learning_rate_fn) -> optax.GradientTransformation:
  """SGD with momentum; weight decay as the gradient of TF's L2 loss wd / 2 * |w|^2."""
  return optax.chain(
      optax.add_decayed_weights(train_config.weight_decay, mask=weight_decay_mask),
      optax.sgd(learning_rate_fn, momentum=train_config.momentum))


def create_train_state(rng: jax.Array, config: ml_collections.ConfigDict, model,
                       learning_rate_fn) -> TrainState:
  """Freshly initialised parameters, BatchNorm statistics and optimiser state."""
  size = config.data.crop_size
  variables = jax.jit(functools.partial(model.init, train=False))(
      rng, jnp.zeros((1, size, size, 3), jnp.float32))
  state = TrainState.create(apply_fn=model.apply, params=variables['params'],
                            batch_stats=variables['batch_stats'],
                            tx=create_optimizer(config.train, learning_rate_fn),
                            nonfinite_steps=jnp.zeros((), jnp.int32),
                            first_nonfinite_step=jnp.full((), -1, jnp.int32))
  # TrainState.create's step is the Python int 0, a weakly typed input; the step's output
  # is a strong int32, so the second call of the pmapped step compiled it all over again.
  return state.replace(step=jnp.zeros((), jnp.int32))


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def init_from_pretrained(state: TrainState, config, log=print) -> TrainState:
  """A new run's parameters and BatchNorm statistics from `config.train.init_from`.

  What is loaded and what stays freshly initialised is decided and logged by
  `seg.weights.init_from_workdir` (config.train.init_part).
  """
  from seg import weights
  variables = weights.init_from_workdir(
      config, {'params': state.params, 'batch_stats': state.batch_stats}, log)
  return state.replace(params=variables['params'], batch_stats=variables['batch_stats'])


def train_step(state: TrainState, batch: Dict[str, jax.Array], rng: jax.Array, *,
               learning_rate_fn: Callable, ignore_label: int,
               compute_dtype: Optional[Any] = None) -> Tuple[TrainState, Dict]:
  """One synchronous SGD step; runs under `pmap(axis_name=AXIS_NAME)`.

  The loss is the mean over the valid pixels of the whole global batch (sums
  and counts are reduced across devices), so any split of a batch across
  devices gives the same update as one device with the whole batch.

  A step whose global loss or gradient is not finite changes nothing but the
  step counter and `nonfinite_steps` / `first_nonfinite_step`: the loop then
  stops or carries on (config.train.skip_nonfinite), never with NaN weights.

  Args:
    batch: image [n, crop, crop, 3] float in [0, 255], label [n, crop, crop].
    rng: the step's key, the same on every device; each device folds in its index.
    compute_dtype: e.g. jnp.bfloat16: the forward and backward passes run with
      parameters and activations in this dtype (mixed precision); parameters,
      gradients, optimiser state, BatchNorm statistics and the loss stay float32.
      None computes in the parameters' dtype.
  """
  rng = jax.random.fold_in(rng, lax.axis_index(AXIS_NAME))
  images, labels = preprocess(batch['image']), batch['label'].astype(jnp.int32)
  if compute_dtype is not None:
    images = images.astype(compute_dtype)

  def loss_fn(params):
    if compute_dtype is not None:
      # Casting inside the differentiated function gives float32 gradients.
      params = jax.tree.map(lambda p: p.astype(compute_dtype), params)
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
        rngs={'dropout': rng}, mutable=['batch_stats'])
    logits = logits.astype(jnp.float32)
    loss_sum, count = cross_entropy_sum(logits, labels, ignore_label)
    total = jnp.maximum(lax.psum(count, AXIS_NAME), 1.0)
    return loss_sum / total, (updates['batch_stats'], logits, loss_sum, count)

  grads, (batch_stats, logits, loss_sum, count) = jax.grad(loss_fn, has_aux=True)(state.params)
  # Each device's loss is already divided by the global pixel count: sum, not mean.
  grads = lax.psum(grads, AXIS_NAME)
  correct = jnp.sum((jnp.argmax(logits, -1) == labels) & (labels != ignore_label))
  sums = lax.psum({'loss': loss_sum, 'correct': correct.astype(jnp.float32), 'count': count},
                  AXIS_NAME)
  # Both reduced over the axis, so every device takes the same decision.
  finite = jnp.isfinite(sums['loss']) & _all_finite(grads)
  batch_stats = jax.tree.map(lambda x: x.astype(jnp.float32), batch_stats)
  updated = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  kept = state.replace(step=updated.step)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, kept)
  new_state = new_state.replace(
      nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
      first_nonfinite_step=jnp.where(
          ~finite & (state.first_nonfinite_step < 0), updated.step.astype(jnp.int32),
          state.first_nonfinite_step))
  metrics = {'loss': sums['loss'] / jnp.maximum(sums['count'], 1.0),
             'pixel_accuracy': sums['correct'] / jnp.maximum(sums['count'], 1.0),
             'learning_rate': learning_rate_fn(state.step)}
  return new_state, metrics


def make_p_train_step(config, learning_rate_fn):
  """The one pmapped training step, with the state's buffers donated."""
  dtype = config.train.get('compute_dtype', 'float32')
  return jax.pmap(functools.partial(train_step, learning_rate_fn=learning_rate_fn,
                                    ignore_label=config.data.ignore_label,
                                    compute_dtype=None if dtype == 'float32' else jnp.dtype(dtype)),
                  axis_name=AXIS_NAME, donate_argnums=(0,))


def _train_vars(state: TrainState) -> Dict[str, Any]:
  return {'opt_state': state.opt_state, 'step': state.step,
          'nonfinite_steps': state.nonfinite_steps}


def _save(manager, state: TrainState) -> None:
  """Saves the (replicated) state; every process calls it (orbax saves collectively)."""
  host = parallel.unreplicate(state)
  checkpoint.save(manager, int(host.step),
                  {'params': host.params, 'batch_stats': host.batch_stats}, _train_vars(host))


def _restore(manager, state: TrainState) -> TrainState:
  restored = checkpoint.restore(
      manager, {'params': state.params, 'batch_stats': state.batch_stats}, _train_vars(state))
  if restored is None:
    return state
  model_vars, train_vars = restored
  return state.replace(params=model_vars['params'], batch_stats=model_vars['batch_stats'],
                       opt_state=train_vars['opt_state'], step=train_vars['step'],
                       nonfinite_steps=train_vars['nonfinite_steps'])


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


def _check_finite(state: TrainState, skip: bool) -> int:
  """Raises on a non-finite step unless `skip`; returns the count of skipped steps."""
  count = int(parallel.unreplicate(state.nonfinite_steps))
  if count and not skip:
    first = int(parallel.unreplicate(state.first_nonfinite_step))
    raise FloatingPointError(
        f'non-finite loss or gradient at step {first} (its update was not applied); training '
        f'stopped without saving, the last checkpoint is kept. Lower the learning rate, or set '
        f'--config.train.skip_nonfinite=True to skip such steps')
  return count


def _format_duration(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  return f'{minutes // 60}h{minutes % 60:02d}m' if minutes >= 60 else f'{minutes}m{seconds:02d}s'


def _write_json(path: str, value) -> None:
  with open(path, 'w') as f:
    json.dump(value, f, indent=2)


def _evaluate(p_eval_step, model, state, config, step, writer, log) -> Dict:
  """Evaluates the replicated `state` and sends the report and example masks to TensorBoard."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  report = evaluate.evaluate(p_eval_step, variables, config, log=log)
  writer.report(step, report)
  if config.train.summary_images and jax.process_index() == 0:
    panels = summaries.validation_examples(model, parallel.unreplicate(variables), config,
                                           config.train.summary_images)
    if panels is not None:
      writer.images(step, 'eval/examples', panels)
  writer.flush()
  return report


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, log=print,
                       stop_at_step: Optional[int] = None) -> Dict:
  """Trains (resuming from the latest checkpoint in `workdir`), then evaluates.

  Every process of a multi-host run calls this with the same arguments. SIGTERM
  or SIGINT stops after the current step (with several processes: at the next
  logging step) with a checkpoint; so does `stop_at_step` (a preemption at a
  known step, for tests). Written by process 0: WORKDIR/config.json,
  train_log.jsonl (appended at every logging step), tensorboard/, eval.json,
  train_curves.png, per_class_iou.png.

  Returns the final evaluation report (also WORKDIR/eval.json), or, when
  stopped early, {'stopped_at_step': step}.
  """
  from seg.data import pipeline  # TensorFlow stays out of the import of this module.
  checkpoint.save_config(workdir, config)
  batch_size = parallel.local_batch_size(config.train.batch_size)
  parallel.local_batch_size(config.eval.batch_size)  # fail now, not after training
  model = create_model(config.model)
  learning_rate_fn = create_learning_rate_fn(config.train)
  rng = jax.random.key(config.train.seed)
  init_rng, step_rng = jax.random.split(rng)
  state = create_train_state(init_rng, config, model, learning_rate_fn)
  manager = checkpoint.create_manager(workdir, config.train.keep_checkpoints)
  state = _restore(manager, state)
  start_step = int(state.step)
  if not start_step and config.train.get('init_from'):
    state = init_from_pretrained(state, config, log)
  num_steps = config.train.steps
  skip_nonfinite = config.train.skip_nonfinite
  is_chief = jax.process_index() == 0
  log(f'{jax.local_device_count()} local device(s) x {jax.process_count()} process(es), '
      f'global batch {config.train.batch_size}, compute {config.train.compute_dtype}, '
      + (f'resuming at step {start_step}' if start_step else 'starting from scratch'))

  p_train_step = make_p_train_step(config, learning_rate_fn)
  p_eval_step = evaluate.make_p_eval_step(model, config)
  state = parallel.replicate(state)
  # The stream depends on the seed only: a resumed run skips to where it stopped.
  batches = pipeline.train_batches(config.data, batch_size, config.train.seed,
                                   jax.process_index(), jax.process_count(), start_step)
  writer = summaries.SummaryWriter(workdir, enabled=is_chief)
  train_log = os.path.join(workdir, 'train_log.jsonl')
  last_log, last_log_step, run_start = time.time(), start_step, time.time()
  step, stopped = start_step, None
  with _StopRequests() as stop_requests:
    try:
      for step in range(start_step + 1, num_steps + 1):
        batch = parallel.shard(next(batches))
        state, metrics = p_train_step(state, batch, parallel.replicate(
            jax.random.fold_in(step_rng, step)))
        is_log_step = step % config.train.log_every == 0 or step == num_steps
        if is_log_step:
          skipped = _check_finite(state, skip_nonfinite)
          metrics = {k: float(v) for k, v in parallel.unreplicate(metrics).items()}
          now = time.time()
          rate = (step - last_log_step) * config.train.batch_size / (now - last_log)
          eta = (num_steps - step) * config.train.batch_size / rate
          log(f'step {step:>6}/{num_steps}  loss {metrics["loss"]:.4f}  '
              f'pixel acc {100 * metrics["pixel_accuracy"]:5.1f}%  '
              f'lr {metrics["learning_rate"]:.2e}  {rate:6.1f} img/s  eta {_format_duration(eta)}'
              + (f'  ({skipped} non-finite steps skipped)' if skipped else ''))
          record = {'step': step, **metrics, 'images_per_second': rate, 'nonfinite_steps': skipped}
          writer.scalars(step, {k: v for k, v in record.items() if k != 'step'})
          if is_chief:
            with open(train_log, 'a') as f:
              f.write(json.dumps(record) + '\n')
          last_log, last_log_step = now, step
        if stop_requests.agreed(step, is_log_step) or step == stop_at_step:
          stopped = step
        if step % config.train.checkpoint_every == 0 or step == num_steps or stopped:
          _check_finite(state, skip_nonfinite)   # never save after a non-finite step
          _save(manager, state)
        if stopped:
          break
        if config.train.eval_every and step % config.train.eval_every == 0 and step != num_steps:
          _evaluate(p_eval_step, model, state, config, step, writer, log)
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

  report = _evaluate(p_eval_step, model, state, config, num_steps, writer, log)
  writer.close()
  report.update(step=num_steps, train_seconds_this_run=round(train_seconds, 1))
  log(format_report(report))
  if is_chief:
    _write_json(os.path.join(workdir, 'eval.json'), report)
    from seg import plots  # matplotlib only once there is something to draw
    plots.plot_per_class_iou(report, os.path.join(workdir, 'per_class_iou.png'))
    if os.path.exists(train_log):
      plots.plot_training_curves(train_log, os.path.join(workdir, 'train_curves.png'))
  log(f'trained steps {start_step}..{num_steps} in {_format_duration(train_seconds)}; '
      f'report in {os.path.join(workdir, "eval.json")}, plots and TensorBoard '
      f'(tensorboard --logdir {writer.logdir}) beside it')
  return report
