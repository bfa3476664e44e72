"""One training step: the state, DeepLab's optimiser recipe and the pmapped SGD step.

`train_step(state, batch, rng) -> (state, metrics)` is pure; `make_p_train_step` pmaps it in
exactly one place, over `AXIS_NAME`, with the state's buffers donated.
"""

import functools
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state
from jax import lax

from seg.parallel import AXIS_NAME
from seg.preprocessing import preprocess, preprocess_in_box
from seg.train.loss import hardest_pixels_sum, mining_fraction, pixel_losses


class TrainState(train_state.TrainState):
  """Flax's TrainState plus BatchNorm statistics and the non-finite step record.

  nonfinite_steps: int32 count of steps whose loss or gradient was not finite
    (their update was not applied).
  first_nonfinite_step: int32, the first such step of this run (1-based, as logged), -1 if
    none; not checkpointed, so a resumed run starts again at -1.
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


OPTIMIZERS = ('sgd', 'adam')   # config.train.optimizer (seg.config.CHOICES)


# The head's scopes, DeepLab's `last_layers` (model.get_extra_layer_scopes: logits, image
# pooling, ASPP, concat projection), or only the logits with last_layers_contain_logits_only.
HEAD_SCOPE, LOGITS_SCOPE = 'head', 'logits'


def gradient_multiplier(path, train_config) -> float:
  """DeepLab's train_utils.get_model_gradient_multipliers for the parameter at `path`:
  `bias_gradient_multiplier` (DeepLab: 2) for conv biases (TF's `biases`: the logits'; not
  BatchNorm's offsets, TF's `beta`), times `last_layer_gradient_multiplier` in the last
  layers (the whole head, or only the logits)."""
  keys = [str(getattr(k, 'key', k)) for k in path]
  head = keys[0] == HEAD_SCOPE and (
      not train_config.last_layers_contain_logits_only or keys[1:2] == [LOGITS_SCOPE])
  bias = keys[-1] == 'bias' and 'BatchNorm' not in keys
  return ((train_config.bias_gradient_multiplier if bias else 1.0)
          * (train_config.last_layer_gradient_multiplier if head else 1.0))


def _decay_then_multiply(decay: optax.GradientTransformation,
                         train_config) -> optax.GradientTransformation:
  """`decay`, then each gradient times its `gradient_multiplier` (DeepLab multiplies the
  gradient of the whole loss, L2 included). The state is `decay`'s own, so checkpoints of
  runs from before the multipliers restore unchanged."""
  def update(updates, state, params=None):
    updates, state = decay.update(updates, state, params)
    def scale(path, g):
      factor = gradient_multiplier(path, train_config)
      return g if factor == 1.0 else g * jnp.asarray(factor, g.dtype)
    return jax.tree_util.tree_map_with_path(scale, updates), state
  return optax.GradientTransformation(decay.init, update)


def create_optimizer(train_config, learning_rate_fn) -> optax.GradientTransformation:
  """`train_config.optimizer`: 'sgd' (with `momentum`, DeepLab's) or 'adam' (optax's default
  betas and epsilon); weight decay either way as the gradient of TF's L2 loss
  wd / 2 * |w|^2, added before the gradient multipliers and the optimiser."""
  name = train_config.optimizer
  if name == 'sgd':
    update = optax.sgd(learning_rate_fn, momentum=train_config.momentum)
  elif name == 'adam':
    update = optax.adam(learning_rate_fn)
  else:
    raise ValueError(f"config.train.optimizer must be 'sgd' or 'adam', got {name!r}")
  decay = optax.add_decayed_weights(train_config.weight_decay, mask=weight_decay_mask)
  return optax.chain(_decay_then_multiply(decay, train_config), update)


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


def _advance_counts(old_state, new_state):
  """`old_state` with the step counts (optax's `count` fields) of `new_state`."""
  def pick(path, old, new):
    return new if getattr(path[-1], 'name', None) == 'count' else old
  return jax.tree_util.tree_map_with_path(pick, old_state, new_state)


def train_step(state: TrainState, batch: Dict[str, jax.Array], rng: jax.Array, *,
               learning_rate_fn: Callable, ignore_label: int,
               compute_dtype: Optional[Any] = None,
               label_weights: Optional[Tuple[float, ...]] = None,
               top_k_percent_pixels: float = 1.0,
               hard_example_mining_step: int = 0) -> Tuple[TrainState, Dict]:
  """One synchronous SGD step; runs under `pmap(axis_name=AXIS_NAME)`.

  The loss is the mean over the valid pixels of the whole global batch (sums
  and counts are reduced across devices), so any split of a batch across
  devices gives the same update as one device with the whole batch. With
  `label_weights` each pixel's loss is weighted by its class (still divided by the
  number of valid pixels); with `top_k_percent_pixels` < 1 only the hardest pixels of
  the global batch count (DeepLab's hard pixel mining, seg.train.loss).

  A step whose global loss or gradient is not finite changes nothing but the
  step counter and `nonfinite_steps` / `first_nonfinite_step`: the loop then
  stops or carries on (config.train.skip_nonfinite), never with NaN weights.

  Args:
    batch: image [n, crop, crop, 3] float in [0, 255], label [n, crop, crop]; or image
      uint8 with valid [n, 4] int32, the boxes of `seg.preprocessing.preprocess_in_box`.
    rng: the step's key, the same on every device; each device folds in its index.
    compute_dtype: e.g. jnp.bfloat16: the forward and backward passes run with
      parameters and activations in this dtype (mixed precision); parameters,
      gradients, optimiser state, BatchNorm statistics and the loss stay float32.
      None computes in the parameters' dtype.
  """
  rng = jax.random.fold_in(rng, lax.axis_index(AXIS_NAME))
  # Normalised here, on the device: uint8 crops (with their boxes) travel 4x lighter.
  images = (preprocess_in_box(batch['image'], batch['valid']) if 'valid' in batch
            else preprocess(batch['image']))
  labels = batch['label'].astype(jnp.int32)
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
    losses, valid = pixel_losses(logits, labels, ignore_label, label_weights)
    if top_k_percent_pixels < 1.0:
      fraction = mining_fraction(state.step, top_k_percent_pixels, hard_example_mining_step)
      loss_sum, count = hardest_pixels_sum(losses, fraction, AXIS_NAME)
    else:
      loss_sum, count = jnp.sum(losses), jnp.sum(valid).astype(jnp.float32)
    total = jnp.maximum(lax.psum(count, AXIS_NAME), 1.0)
    return loss_sum / total, (updates['batch_stats'], logits, loss_sum, count)

  grads, (batch_stats, logits, loss_sum, count) = jax.grad(loss_fn, has_aux=True)(state.params)
  # Each device's loss is already divided by the global pixel count: sum, not mean.
  grads = lax.psum(grads, AXIS_NAME)
  valid = labels != ignore_label
  correct = jnp.sum((jnp.argmax(logits, -1) == labels) & valid)
  sums = lax.psum({'loss': loss_sum, 'loss_count': count,
                   'correct': correct.astype(jnp.float32),
                   'count': jnp.sum(valid).astype(jnp.float32)}, AXIS_NAME)
  # Both reduced over the axis, so every device takes the same decision.
  finite = jnp.isfinite(sums['loss']) & _all_finite(grads)
  batch_stats = jax.tree.map(lambda x: x.astype(jnp.float32), batch_stats)
  updated = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  # A skipped step keeps the old optimiser state but for its step counts: the schedule
  # (optax's ScaleByScheduleState.count) must follow state.step, or every later update
  # would apply an earlier step's learning rate and the run would never reach lr 0.
  kept = state.replace(step=updated.step,
                       opt_state=_advance_counts(state.opt_state, updated.opt_state))
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, kept)
  new_state = new_state.replace(
      nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
      first_nonfinite_step=jnp.where(
          ~finite & (state.first_nonfinite_step < 0), updated.step.astype(jnp.int32),
          state.first_nonfinite_step))
  metrics = {'loss': sums['loss'] / jnp.maximum(sums['loss_count'], 1.0),
             'pixel_accuracy': sums['correct'] / jnp.maximum(sums['count'], 1.0),
             'learning_rate': learning_rate_fn(state.step)}
  return new_state, metrics


def describe_loss(train_config) -> str:
  """The loss options and multipliers that differ from DeepLab's defaults, for the log."""
  parts = []
  if tuple(train_config.label_weights):
    parts.append('label weights ' + ', '.join(f'{float(w):g}' for w in train_config.label_weights))
  if train_config.top_k_percent_pixels < 1:
    share = f'hardest {train_config.top_k_percent_pixels:.0%} of pixels'
    if train_config.hard_example_mining_step:
      share += f' (reached at step {train_config.hard_example_mining_step})'
    parts.append(share)
  if train_config.last_layer_gradient_multiplier != 1:
    where = 'logits' if train_config.last_layers_contain_logits_only else 'head'
    parts.append(f'{where} gradients x{train_config.last_layer_gradient_multiplier:g}')
  if train_config.bias_gradient_multiplier != 2:
    parts.append(f'bias gradients x{train_config.bias_gradient_multiplier:g}')
  return ', '.join(parts)


def make_p_train_step(config, learning_rate_fn):
  """The one pmapped training step, with the state's buffers donated."""
  dtype = config.train.compute_dtype
  weights = tuple(float(w) for w in config.train.label_weights) or None
  return jax.pmap(functools.partial(train_step, learning_rate_fn=learning_rate_fn,
                                    ignore_label=config.data.ignore_label,
                                    compute_dtype=None if dtype == 'float32' else jnp.dtype(dtype),
                                    label_weights=weights,
                                    top_k_percent_pixels=config.train.top_k_percent_pixels,
                                    hard_example_mining_step=config.train.hard_example_mining_step),
                  axis_name=AXIS_NAME, donate_argnums=(0,))
