"""Training: the pmapped step, the DeepLab optimiser recipe and the resumable loop."""

import functools
import json
import os
import time
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax import lax

from seg import checkpoint, evaluate, parallel
from seg.losses import cross_entropy_sum
from seg.metrics import format_report
from seg.model import AXIS_NAME, create_model, preprocess


class TrainState(train_state.TrainState):
  batch_stats: Any


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
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           batch_stats=variables['batch_stats'],
                           tx=create_optimizer(config.train, learning_rate_fn))


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
               learning_rate_fn: Callable, ignore_label: int) -> Tuple[TrainState, Dict]:
  """One synchronous SGD step; runs under `pmap(axis_name=AXIS_NAME)`.

  The loss is the mean over the valid pixels of the whole global batch (sums
  and counts are reduced across devices), so any split of a batch across
  devices gives the same update as one device with the whole batch.

  Args:
    batch: image [n, crop, crop, 3] float in [0, 255], label [n, crop, crop].
    rng: the step's key, the same on every device; each device folds in its index.
  """
  rng = jax.random.fold_in(rng, lax.axis_index(AXIS_NAME))
  images, labels = preprocess(batch['image']), batch['label'].astype(jnp.int32)

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
        rngs={'dropout': rng}, mutable=['batch_stats'])
    loss_sum, count = cross_entropy_sum(logits, labels, ignore_label)
    total = jnp.maximum(lax.psum(count, AXIS_NAME), 1.0)
    return loss_sum / total, (updates['batch_stats'], logits, loss_sum, count)

  grads, (batch_stats, logits, loss_sum, count) = jax.grad(loss_fn, has_aux=True)(state.params)
  # Each device's loss is already divided by the global pixel count: sum, not mean.
  grads = lax.psum(grads, AXIS_NAME)
  correct = jnp.sum((jnp.argmax(logits, -1) == labels) & (labels != ignore_label))
  sums = lax.psum({'loss': loss_sum, 'correct': correct.astype(jnp.float32), 'count': count},
                  AXIS_NAME)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics = {'loss': sums['loss'] / jnp.maximum(sums['count'], 1.0),
             'pixel_accuracy': sums['correct'] / jnp.maximum(sums['count'], 1.0),
             'learning_rate': learning_rate_fn(state.step)}
  return new_state, metrics


def make_p_train_step(config, learning_rate_fn):
  """The one pmapped training step, with the state's buffers donated."""
  return jax.pmap(functools.partial(train_step, learning_rate_fn=learning_rate_fn,
                                    ignore_label=config.data.ignore_label),
                  axis_name=AXIS_NAME, donate_argnums=(0,))


def _save(manager, state: TrainState) -> None:
  host = parallel.unreplicate(state)
  checkpoint.save(manager, int(host.step),
                  {'params': host.params, 'batch_stats': host.batch_stats},
                  {'opt_state': host.opt_state, 'step': host.step})


def _restore(manager, state: TrainState) -> TrainState:
  restored = checkpoint.restore(
      manager, {'params': state.params, 'batch_stats': state.batch_stats},
      {'opt_state': state.opt_state, 'step': state.step})
  if restored is None:
    return state
  model_vars, train_vars = restored
  return state.replace(params=model_vars['params'], batch_stats=model_vars['batch_stats'],
                       opt_state=train_vars['opt_state'], step=train_vars['step'])


def _format_duration(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  return f'{minutes // 60}h{minutes % 60:02d}m' if minutes >= 60 else f'{minutes}m{seconds:02d}s'


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, log=print) -> Dict:
  """Trains (resuming from the latest checkpoint in `workdir`), then evaluates.

  Returns the final evaluation report, also written to WORKDIR/eval.json.
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
  log(f'{jax.local_device_count()} local device(s) x {jax.process_count()} process(es), '
      f'global batch {config.train.batch_size}, '
      + (f'resuming at step {start_step}' if start_step else 'starting from scratch'))

  p_train_step = make_p_train_step(config, learning_rate_fn)
  p_eval_step = evaluate.make_p_eval_step(model, config)
  state = parallel.replicate(state)
  # A resumed run reshuffles with a step-dependent seed rather than replaying the first batches.
  batches = pipeline.train_batches(config.data, batch_size, config.train.seed + start_step,
                                   jax.process_index(), jax.process_count())
  history, last_log, last_log_step, run_start = [], time.time(), start_step, time.time()
  for step in range(start_step + 1, num_steps + 1):
    batch = parallel.shard(next(batches))
    state, metrics = p_train_step(state, batch, parallel.replicate(
        jax.random.fold_in(step_rng, step)))
    if step % config.train.log_every == 0 or step == num_steps:
      metrics = {k: float(v) for k, v in parallel.unreplicate(metrics).items()}
      if not np.isfinite(metrics['loss']):
        raise FloatingPointError(f'non-finite loss at step {step}; the last checkpoint is kept')
      now = time.time()
      rate = (step - last_log_step) * config.train.batch_size / (now - last_log)
      eta = (num_steps - step) * config.train.batch_size / rate
      log(f'step {step:>6}/{num_steps}  loss {metrics["loss"]:.4f}  '
          f'pixel acc {100 * metrics["pixel_accuracy"]:5.1f}%  '
          f'lr {metrics["learning_rate"]:.2e}  {rate:6.1f} img/s  eta {_format_duration(eta)}')
      history.append({'step': step, **metrics, 'images_per_second': rate})
      last_log, last_log_step = now, step
    if step % config.train.checkpoint_every == 0 or step == num_steps:
      _save(manager, state)
    if config.train.eval_every and step % config.train.eval_every == 0 and step != num_steps:
      evaluate.evaluate(p_eval_step, {'params': state.params, 'batch_stats': state.batch_stats},
                        config, log=log)
  manager.wait_until_finished()
  train_seconds = time.time() - run_start

  report = evaluate.evaluate(p_eval_step,
                             {'params': state.params, 'batch_stats': state.batch_stats},
                             config, log=log)
  report.update(step=num_steps, train_seconds_this_run=round(train_seconds, 1))
  log(format_report(report))
  with open(os.path.join(workdir, 'eval.json'), 'w') as f:
    json.dump(report, f, indent=2)
  if history:
    with open(os.path.join(workdir, 'train_log.jsonl'), 'a') as f:
      f.writelines(json.dumps(h) + '\n' for h in history)
  log(f'trained steps {start_step}..{num_steps} in {_format_duration(train_seconds)}; '
      f'report in {os.path.join(workdir, "eval.json")}')
  return report
