"""DeepLab's loss options (label weights, hard pixel mining) and gradient multipliers against
NumPy transcriptions of deeplab/utils/train_utils.py (tensorflow/models, research/deeplab):
`add_softmax_cross_entropy_loss_for_each_scale` and `get_model_gradient_multipliers`."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import optimizer_updates
from seg import config as config_lib
from seg.train import loop
from seg.train import step as step_lib
from seg.train.loss import cross_entropy_sum, hardest_pixels_sum, mining_fraction, pixel_losses


def _numpy_deeplab_loss(logits, labels, weights=None, top_k=1.0, mining_step=0, step=0):
  """train_utils.add_softmax_cross_entropy_loss_for_each_scale in float64: weighted pixel
  losses (0 where ignored); all pixels: sum / labelled pixels; else the top k of all pixels
  (k = int(share * pixels) in float32 as tf.to_int32) over the number of non-zero ones."""
  x = logits.astype(np.float64).reshape(-1, logits.shape[-1])
  y = labels.reshape(-1)
  keep = y != 255
  safe = np.where(keep, y, 0)
  log_z = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
  losses = log_z - x[np.arange(len(y)), safe]
  w = np.ones(logits.shape[-1]) if weights is None else np.asarray(weights, np.float64)
  losses = losses * w[safe] * keep
  if top_k == 1.0:
    return losses.sum() / max(keep.sum(), 1e-5)
  if mining_step == 0:
    share = np.float32(top_k)
  else:
    ratio = np.minimum(np.float32(1.0), np.float32(step) / np.float32(mining_step))
    share = ratio * np.float32(top_k) + (np.float32(1.0) - ratio)
  k = int(np.float32(share) * np.float32(len(losses)))
  top = np.sort(losses)[::-1][:k]
  present = np.count_nonzero(top)
  return top.sum() / max(present, 1e-5) if present else 0.0


def _batch(seed, shape=(4, 6, 7, 5), ties=False):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, 2, shape).astype(np.float32)
  labels = rng.integers(0, shape[-1], shape[:-1]).astype(np.int32)
  labels[0, :2] = 255
  labels[2, :, 5:] = 255
  if ties:   # image 1: identical pixels, all wrong by far: the largest losses, all equal
    logits[1] = 10.0
    logits[1, ..., 0] = -10.0
    labels[1] = 0
  return logits, labels


def _straddles(logits, labels, weights, share):
  """Whether the k-th largest loss is image 1's tied value with more of them than places."""
  losses = np.asarray(pixel_losses(jnp.asarray(logits), jnp.asarray(labels), 255, weights)[0])
  k = int(np.float32(share) * np.float32(losses.size))
  ordered = np.sort(losses.ravel())[::-1]
  tie = ordered[k - 1]
  return tie > 0 and tie == losses[1, 0, 0] and (ordered >= tie).sum() > k


def _mined(logits, labels, weights, share):
  losses, _ = pixel_losses(jnp.asarray(logits), jnp.asarray(labels), 255, weights)
  total, count = hardest_pixels_sum(losses, jnp.float32(share))
  return float(total / jnp.maximum(count, 1.0))


def test_label_weights_weigh_each_pixel_by_its_class_over_the_labelled_pixels():
  logits, labels = _batch(0)
  weights = (1.0, 0.25, 3.0, 0.0, 2.0)
  total, count = cross_entropy_sum(jnp.asarray(logits), jnp.asarray(labels), 255, weights)
  np.testing.assert_allclose(float(total / count), _numpy_deeplab_loss(logits, labels, weights),
                             rtol=1e-5)
  # Divided by the labelled pixels, not by the sum of their weights (DeepLab's num_present).
  assert int(count) == int((labels != 255).sum())
  plain, _ = cross_entropy_sum(jnp.asarray(logits), jnp.asarray(labels), 255)
  assert abs(float(total) - float(plain)) > 0.1 * float(plain)


@pytest.mark.parametrize('share', [0.05, 0.25, 0.5, 0.9])
@pytest.mark.parametrize('ties', [False, True])
def test_hard_pixel_mining_is_deeplabs_top_k(share, ties):
  logits, labels = _batch(1, ties=ties)
  weights = (1.0, 0.5, 2.0, 1.0, 0.0)
  assert _straddles(logits, labels, weights, share) == (ties and share < 0.25)
  expected = _numpy_deeplab_loss(logits, labels, weights, top_k=share)
  np.testing.assert_allclose(_mined(logits, labels, weights, share), expected, rtol=1e-5)
  # Mining changes the loss (the check can fail): the hardest pixels weigh more.
  assert _mined(logits, labels, weights, share) > _numpy_deeplab_loss(logits, labels, weights)


def test_mining_past_the_labelled_pixels_counts_only_the_non_zero_losses():
  # 160 pixels, 110 labelled, 33 of them with weight 0: a share of 0.9 (k=144) takes every
  # positive loss and some zeros, which DeepLab neither adds nor counts.
  logits, labels = _batch(2, shape=(4, 5, 8, 3))
  weights = (1.0, 0.0, 2.0)
  positive = int(((labels != 255) & (labels != 1)).sum())
  assert positive < int(0.9 * labels.size)
  losses, _ = pixel_losses(jnp.asarray(logits), jnp.asarray(labels), 255, weights)
  total, count = hardest_pixels_sum(losses, jnp.float32(0.9))
  assert float(count) == positive
  np.testing.assert_allclose(float(total / count),
                             _numpy_deeplab_loss(logits, labels, weights, top_k=0.9), rtol=1e-5)


def test_the_mining_share_falls_linearly_to_top_k_over_the_mining_steps():
  logits, labels = _batch(3)
  for step in (0, 1, 5, 10, 40):
    share = mining_fraction(jnp.int32(step), 0.25, 10)
    np.testing.assert_allclose(float(share), 1 - 0.75 * min(step / 10, 1.0), rtol=1e-6)
    np.testing.assert_allclose(
        _mined(logits, labels, None, share),
        _numpy_deeplab_loss(logits, labels, None, top_k=0.25, mining_step=10, step=step),
        rtol=1e-5)
  assert float(mining_fraction(jnp.int32(3), 0.25, 0)) == 0.25


def test_the_gradient_reaches_only_the_mined_pixels_as_softmax_minus_one_hot():
  logits, labels = _batch(4)
  weights = (1.0, 0.5, 2.0, 1.0, 3.0)
  share = 0.3

  def loss(x):
    losses, _ = pixel_losses(x, jnp.asarray(labels), 255, weights)
    total, count = hardest_pixels_sum(losses, jnp.float32(share))
    return total / count

  grad = np.asarray(jax.grad(loss)(jnp.asarray(logits))).reshape(-1, 5)
  # d/dlogits of w * CE is w * (softmax - one_hot), on the k pixels of largest w * CE only.
  x = logits.astype(np.float64).reshape(-1, 5)
  y = labels.reshape(-1)
  keep = y != 255
  safe = np.where(keep, y, 0)
  p = np.exp(x - x.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  w = np.asarray(weights)[safe] * keep
  pixel = -np.log(p[np.arange(len(y)), safe]) * w
  k = int(np.float32(share) * np.float32(len(y)))
  chosen = np.zeros(len(y), bool)
  chosen[np.argsort(-pixel)[:k]] = True
  one_hot = np.eye(5)[safe]
  expected = (p - one_hot) * (w * chosen)[:, None] / k
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)
  assert np.all(grad[~chosen] == 0) and np.any(grad[chosen] != 0)


def test_mining_on_several_devices_is_the_whole_batch_mined_at_once():
  # One threshold over every device's pixels: a split of the batch changes nothing, though
  # the devices hold unequally many of the hardest pixels (image 1's, on device 0, tie at the
  # threshold).
  n = jax.local_device_count()
  assert n == 4
  logits, labels = _batch(5, shape=(8, 6, 7, 5), ties=True)
  weights = (1.0, 0.5, 2.0, 1.0, 0.0)
  assert _straddles(logits, labels, weights, 0.1)

  def loss(x, y):
    losses, _ = pixel_losses(x, y, 255, weights)
    total, count = hardest_pixels_sum(losses, jnp.float32(0.1), 'i')
    return total / jax.lax.psum(count, 'i')

  def local_grad(x, y):
    value, grad = jax.value_and_grad(loss)(x, y)
    return jax.lax.psum(value, 'i'), grad

  split = lambda a: a.reshape(n, -1, *a.shape[1:])
  value, grads = jax.pmap(local_grad, axis_name='i')(split(logits), split(labels))
  whole = functools.partial(_mined, weights=weights, share=0.1)
  np.testing.assert_allclose(float(value[0]), whole(logits, labels), rtol=1e-5)
  np.testing.assert_allclose(float(value[0]),
                             _numpy_deeplab_loss(logits, labels, weights, top_k=0.1), rtol=1e-5)

  def one_device(x):
    losses, _ = pixel_losses(x, jnp.asarray(labels), 255, weights)
    total, count = hardest_pixels_sum(losses, jnp.float32(0.1))
    return total / count

  expected = jax.grad(one_device)(jnp.asarray(logits))
  np.testing.assert_allclose(np.asarray(grads).reshape(logits.shape), np.asarray(expected),
                             rtol=1e-5, atol=1e-8)


def _tf_multipliers(names, last_layer_multiplier, logits_only):
  """get_model_gradient_multipliers over TF's variable names: 'biases' 2x; in the last layers
  (DeepLab's scopes logits, image_pooling, aspp, concat_projection; or logits alone) the
  multiplier, 2x that for their biases. BatchNorm's offset is TF's 'beta', not 'biases'."""
  last = ['logits'] if logits_only else ['logits', 'image_pooling', 'aspp', 'concat_projection']
  out = {}
  for name, tf_name in names.items():
    out[name] = 2.0 if 'biases' in tf_name else 1.0
    for layer in last:
      if layer in tf_name:
        out[name] = (2.0 if 'biases' in tf_name else 1.0) * last_layer_multiplier
        break
  return out


# Flax path -> the TF variable DeepLab names it (seg/weights/mapping.py's correspondence).
PARAMS = {
    ('MobilenetV2', 'expanded_conv_3', 'project', 'conv', 'kernel'):
        'MobilenetV2/expanded_conv_3/project/weights',
    ('MobilenetV2', 'Conv', 'BatchNorm', 'bias'): 'MobilenetV2/Conv/BatchNorm/beta',
    ('head', 'aspp0', 'conv', 'kernel'): 'aspp0/weights',
    ('head', 'aspp0', 'BatchNorm', 'bias'): 'aspp0/BatchNorm/beta',
    ('head', 'image_pooling', 'BatchNorm', 'scale'): 'image_pooling/BatchNorm/gamma',
    ('head', 'concat_projection', 'conv', 'kernel'): 'concat_projection/weights',
    ('head', 'logits', 'kernel'): 'logits/semantic/weights',
    ('head', 'logits', 'bias'): 'logits/semantic/biases',
}


@pytest.mark.parametrize('multiplier,logits_only', [(1.0, False), (10.0, False), (4.0, True)])
def test_one_sgd_update_applies_deeplabs_gradient_multipliers(tiny_config, multiplier,
                                                              logits_only):
  cfg = tiny_config.train
  cfg.steps, cfg.learning_rate, cfg.lr_power, cfg.momentum, cfg.weight_decay = \
      10, 0.05, 0.9, 0.9, 0.01
  cfg.last_layer_gradient_multiplier = multiplier
  cfg.last_layers_contain_logits_only = logits_only
  values, grads, got = optimizer_updates(cfg, {k: k for k in PARAMS})

  factor = _tf_multipliers(PARAMS, multiplier, logits_only)
  decayed = {k for k, v in PARAMS.items() if v.endswith('/weights')}
  w = {k: v.astype(np.float64) for k, v in values.items()}
  accum = {k: np.zeros_like(v) for k, v in w.items()}
  for step, g in enumerate(grads):
    rate = 0.05 * (1 - step / 10) ** 0.9
    for k in PARAMS:   # the gradient of loss + L2, then multiplied, then momentum
      accum[k] = 0.9 * accum[k] + factor[k] * (g[k] + (0.01 * w[k] if k in decayed else 0.0))
      w[k] = w[k] - rate * accum[k]
  for k in PARAMS:
    np.testing.assert_allclose(got[k], w[k], rtol=1e-5, atol=1e-6, err_msg=str(k))
  assert factor[('head', 'logits', 'bias')] == 2 * multiplier


def test_the_multipliers_leave_the_optimiser_state_of_older_checkpoints_unchanged(tiny_config):
  # Checkpoints written before the multipliers hold chain(add_decayed_weights, sgd)'s state.
  params = {'head': {'logits': {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones(3)}}}
  before = optax.chain(optax.add_decayed_weights(4e-5, mask=step_lib.weight_decay_mask),
                       optax.sgd(lambda _: 0.1, momentum=0.9))
  now = step_lib.create_optimizer(tiny_config.train, lambda _: 0.1)
  assert (jax.tree.structure(now.init(params)) == jax.tree.structure(before.init(params)))


def test_the_loss_fields_are_checked_before_anything_runs(tiny_config):
  config = tiny_config
  config.model.num_classes = 3
  for field, value, message in (
      ('label_weights', (1.0, 2.0), 'has 2 weights, config.model.num_classes is 3'),
      ('label_weights', (1.0, -1.0, 1.0), 'not negative'),
      ('label_weights', (0.0, 0.0, 0.0), 'not all zero'),
      ('label_weights', ('a', 1, 1), 'must be numbers'),
      ('top_k_percent_pixels', 0.0, r'in \(0, 1\]'),
      ('top_k_percent_pixels', 25.0, r'in \(0, 1\]'),
      ('hard_example_mining_step', -1, 'not be negative'),
      ('last_layer_gradient_multiplier', -2.0, '>= 0')):
    changed = config_lib.default_config()
    changed.model.num_classes = 3
    changed.train[field] = value
    with pytest.raises(ValueError, match=message):
      config_lib.validate(changed)
  config.train.label_weights = (1, 1, 5)
  config_lib.validate(config)


def test_an_override_sets_the_weights_as_numbers():
  config = config_lib.default_config()
  config.lock()
  config_lib.apply_overrides(config, [('train.label_weights', '1, 0.5, 3'),
                                      ('model.num_classes', '3')])
  assert tuple(config.train.label_weights) == (1, 0.5, 3)
  config_lib.validate(config)


def test_a_run_checkpointed_before_the_bias_multiplier_resumes_with_it_at_one(tmp_path,
                                                                             tiny_config):
  old = config_lib.default_config().to_dict()
  del old['train']['bias_gradient_multiplier']
  (tmp_path / 'config.json').write_text(json.dumps(old))
  logged = []
  loop.keep_bias_rule_of_old_run(tiny_config, str(tmp_path), logged.append)
  assert tiny_config.train.bias_gradient_multiplier == 2.0 and not logged  # no checkpoint yet
  os.makedirs(tmp_path / 'checkpoints' / '100')
  loop.keep_bias_rule_of_old_run(tiny_config, str(tmp_path), logged.append)
  assert tiny_config.train.bias_gradient_multiplier == 1.0
  assert 'resuming with 1.0' in logged[0]
  # A run that has the field keeps what it asks for; eval and predict read the old one as 1.
  tiny_config.train.bias_gradient_multiplier = 2.0
  (tmp_path / 'config.json').write_text(tiny_config.to_json())
  loop.keep_bias_rule_of_old_run(tiny_config, str(tmp_path), logged.append)
  assert tiny_config.train.bias_gradient_multiplier == 2.0 and len(logged) == 1
  import ml_collections
  assert config_lib.with_defaults(
      ml_collections.ConfigDict(old)).train.bias_gradient_multiplier == 1.0


def test_train_names_the_options_that_differ_from_deeplabs_in_its_first_line(tiny_config):
  cfg = tiny_config.train
  assert step_lib.describe_loss(cfg) == ''
  cfg.label_weights, cfg.top_k_percent_pixels, cfg.hard_example_mining_step = (1, 0.5, 4), 0.25, 90
  cfg.last_layer_gradient_multiplier, cfg.last_layers_contain_logits_only = 10.0, True
  assert step_lib.describe_loss(cfg) == ('label weights 1, 0.5, 4, hardest 25% of pixels '
                                         '(reached at step 90), logits gradients x10')


def test_a_non_finite_pixel_loss_makes_the_mined_loss_nan_not_invisible():
  # NaN sorts last and fails every comparison: without a check it would drop out of the
  # top k, and the step's non-finite guard would never see it.
  losses = jnp.asarray(np.r_[np.linspace(0.1, 2.0, 19), np.nan].astype(np.float32))
  total, _ = hardest_pixels_sum(losses, jnp.float32(0.5))
  assert np.isnan(float(total))
  total, count = hardest_pixels_sum(losses[:19], jnp.float32(0.5))
  assert np.isfinite(float(total)) and float(count) == 9
