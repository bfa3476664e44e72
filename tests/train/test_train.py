"""The training step, the optimiser recipe, learning and checkpoint resumption."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import optimizer_updates
from seg import checkpoint, parallel
from seg.train import loop
from seg.train import step as step_lib
from seg.data import pipeline
from seg.model import DeepLabV3MobileNetV2, create_model
from seg.preprocessing import preprocess


def test_poly_learning_rate_with_warmup(tiny_config):
  cfg = tiny_config.train
  cfg.steps, cfg.learning_rate, cfg.warmup_steps, cfg.lr_power = 100, 0.01, 10, 0.9
  lr = step_lib.create_learning_rate_fn(cfg)
  for step in (0, 5, 10, 11, 50, 99, 100):
    if step < 10:
      expected = 0.01 * step / 10
    else:
      expected = 0.01 * (1 - (step - 10) / 90) ** 0.9
    assert np.isclose(float(lr(step)), expected, rtol=1e-5, atol=1e-9), step


def test_weight_decay_skips_depthwise_kernels_batchnorm_and_biases():
  variables = jax.eval_shape(lambda: DeepLabV3MobileNetV2(width=0.35).init(
      jax.random.key(0), jnp.zeros((1, 33, 33, 3))))
  mask = step_lib.weight_decay_mask(variables['params'])
  flat = {'/'.join(k.key for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert flat['MobilenetV2/expanded_conv_1/expand/conv/kernel']
  assert flat['MobilenetV2/expanded_conv_1/project/conv/kernel']
  assert flat['head/logits/kernel']
  assert not flat['MobilenetV2/expanded_conv_1/depthwise/depthwise/kernel']
  assert not flat['MobilenetV2/Conv/BatchNorm/scale']
  assert not flat['head/logits/bias']


# That a step on N devices equals one device with the whole batch (synchronised BatchNorm,
# gradients and the loss's global normalisation) is checked in float64 by
# tests/train/test_multihost.py: 2 processes x 2 devices against ONE device, with unequal
# valid pixels per device; BatchNorm's one-collective statistics by tests/model/test_layers.py.


def test_training_overfits_a_small_set(tiny_config):
  config = tiny_config
  config.train.steps, config.train.learning_rate, config.train.warmup_steps = 60, 0.05, 5
  model = create_model(config.model)
  lr = step_lib.create_learning_rate_fn(config.train)
  state = parallel.replicate(step_lib.create_train_state(jax.random.key(0), config, model, lr))
  p_step = step_lib.make_p_train_step(config, lr)
  batch = parallel.shard(next(pipeline.train_batches(config.data, 4, seed=0)))
  losses = []
  for step in range(config.train.steps):
    state, metrics = p_step(state, batch, parallel.replicate(jax.random.key(step)))
    losses.append(float(metrics['loss'][0]))
  assert losses[-1] < 0.3 * losses[0]
  assert float(metrics['pixel_accuracy'][0]) > 0.95


def test_resume_continues_at_the_saved_step(tiny_config, tmp_path):
  config = tiny_config
  workdir = str(tmp_path / 'run')
  logs = []
  config.train.steps = 4
  config.data.eval_split = 'val[:8]'  # resuming is the point here, not evaluation
  loop.train_and_evaluate(config, workdir, log=logs.append)
  assert checkpoint.create_manager(workdir).all_steps() == [2, 4]
  config.train.steps = 6
  loop.train_and_evaluate(config, workdir, log=logs.append)
  assert any('resuming at step 4' in line for line in logs)
  # It says, and keeps, that it resumed with another schedule: the poly rate at step 4 was 0
  # (the end of a 4-step run) and is now lr * (1 - 4 / 6) ** power (tiny: no warm-up).
  assert logs[logs.index('  train.steps: 4 -> 6') - 1].startswith(
      'WARNING: resuming at step 4 with a config that trains otherwise')
  expected = config.train.learning_rate * (1 - 4 / 6) ** config.train.lr_power
  assert f'  learning rate at step 4: 0 under the previous schedule, {expected:.3g} now' in logs
  [entry] = [json.loads(line) for line in open(os.path.join(workdir, 'config_changes.jsonl'))]
  assert entry['step'] == 4 and entry['changes'] == {'train.steps': [4, 6]}
  assert checkpoint.create_manager(workdir).all_steps() == [4, 6]   # keeps the last 2
  # The learning rate continued the schedule of a 6-step run from step 4.
  lr = step_lib.create_learning_rate_fn(config.train)
  logged = [line for line in logs if line.startswith('step      6/6')]
  assert logged and f'lr {float(lr(5)):.2e}' in logged[0]
  # Each run says once when its first step (the compilation) is done; that step is left out
  # of the rates of the progress lines.
  assert [line.split(' compiled')[0] for line in logs if 'compiled and started' in line] == [
      'step 1', 'step 5']
  # Asked for fewer steps than the workdir holds: nothing trained, the step held evaluated.
  config.train.steps = 5
  report = loop.train_and_evaluate(config, workdir, log=logs.append)
  assert report['step'] == 6 and checkpoint.create_manager(workdir).all_steps() == [4, 6]
  assert any('already trained to step 6 (train.steps=5)' in line for line in logs)


def test_restored_variables_predict_bit_identically(tiny_config, tmp_path):
  config = tiny_config
  model = create_model(config.model)
  lr = step_lib.create_learning_rate_fn(config.train)
  state = parallel.replicate(step_lib.create_train_state(jax.random.key(0), config, model, lr))
  p_step = step_lib.make_p_train_step(config, lr)
  batches = pipeline.train_batches(config.data, 4, seed=0)
  for step in range(3):
    state, _ = p_step(state, parallel.shard(next(batches)),
                      parallel.replicate(jax.random.key(step)))
  manager = checkpoint.create_manager(str(tmp_path))
  loop.save_state(manager, state)
  manager.wait_until_finished()
  restored, step = checkpoint.load_model_variables(str(tmp_path), model)
  assert step == 3
  host = parallel.unreplicate(state)
  images = preprocess(jnp.asarray(next(batches)['image']))
  before = model.apply({'params': host.params, 'batch_stats': host.batch_stats}, images)
  after = model.apply(restored, images)
  np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
  # Optimiser momentum comes back too.
  _, train_vars = checkpoint.restore(manager, {'params': host.params,
                                               'batch_stats': host.batch_stats},
                                     loop.train_vars(host))
  for x, y in zip(jax.tree.leaves(train_vars['opt_state']), jax.tree.leaves(host.opt_state)):
    np.testing.assert_array_equal(x, y)


def test_indivisible_batch_is_a_clear_error():
  with pytest.raises(ValueError, match='does not divide'):
    parallel.local_batch_size(6)   # 4 fake devices


def test_bfloat16_compute_keeps_float32_state_and_follows_float32(tiny_config):
  # tiny.py's model as it is (dropout draws the same mask in both dtypes from the same key):
  # its float32 step is the program that other tests compiled, from the session's cache.
  config = tiny_config
  model = create_model(config.model)
  lr = step_lib.create_learning_rate_fn(config.train)
  state = step_lib.create_train_state(jax.random.key(0), config, model, lr)
  batch = parallel.shard(next(pipeline.train_batches(config.data, 4, seed=0)))
  results = {}
  for dtype in ('float32', 'bfloat16'):
    config.train.compute_dtype = dtype
    new, metrics = step_lib.make_p_train_step(config, lr)(
        parallel.replicate(state), batch, parallel.replicate(jax.random.key(1)))
    results[dtype] = parallel.unreplicate(new), float(metrics['loss'][0])
  (f32, loss32), (bf16, loss16) = results['float32'], results['bfloat16']
  for tree in (bf16.params, bf16.batch_stats, bf16.opt_state):
    floats = [x for x in jax.tree.leaves(tree) if np.issubdtype(x.dtype, np.inexact)]
    assert floats and all(x.dtype == np.float32 for x in floats)  # (optax's count is int32)
  assert loss16 != loss32 and abs(loss16 - loss32) < 0.02 * loss32
  # The update of the logits layer (after the last BatchNorm) follows the float32 one. Deeper
  # in the encoder a first step from initialisation differs more: bf16's 8-bit mantissa is
  # amplified through 17 BatchNorm layers (over all parameters the cosine was about 0.5).
  d32 = np.ravel(f32.params['head']['logits']['kernel'] - state.params['head']['logits']['kernel'])
  d16 = np.ravel(bf16.params['head']['logits']['kernel']
                 - state.params['head']['logits']['kernel'])
  assert np.dot(d32, d16) / (np.linalg.norm(d32) * np.linalg.norm(d16)) > 0.95


def test_cross_entropy_against_numpy_with_ignored_pixels():
  from seg.train.loss import cross_entropy_sum
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (2, 5, 6, 4)).astype(np.float32)
  labels = rng.integers(0, 4, (2, 5, 6)).astype(np.int32)
  labels[0, :2] = 255
  labels[1, :, 4:] = 255
  loss_sum, count = cross_entropy_sum(jnp.asarray(logits), jnp.asarray(labels), 255)
  # -log softmax(logits)[label] over the pixels whose label is not 255, in float64.
  x = logits.astype(np.float64)
  log_z = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
  valid = labels != 255
  picked = np.take_along_axis(x, np.where(valid, labels, 0)[..., None], -1)[..., 0]
  expected = np.sum((log_z - picked)[valid])
  assert int(count) == valid.sum() == 2 * 30 - 12 - 10
  np.testing.assert_allclose(float(loss_sum), expected, rtol=1e-5)


def test_one_optimizer_update_is_tf_momentum_with_l2_on_the_poly_schedule(tiny_config):
  # TF-slim / DeepLab: loss + wd / 2 * |w|^2 over the non-depthwise conv kernels (gradient
  # g + wd * w), MomentumOptimizer: accum = momentum * accum + g; w -= lr * accum, with
  # lr = base * (1 - step / steps) ** power at the step before the update (TF's global_step);
  # the logits' bias with DeepLab's 2x gradient (tests/train/test_loss.py: the multipliers).
  cfg = tiny_config.train
  cfg.steps, cfg.learning_rate, cfg.lr_power, cfg.warmup_steps = 10, 0.05, 0.9, 0
  cfg.momentum, cfg.weight_decay = 0.9, 0.01
  names = {'kernel': ('MobilenetV2', 'expanded_conv_1', 'project', 'conv', 'kernel'),
           'depthwise': ('MobilenetV2', 'expanded_conv_1', 'depthwise', 'depthwise', 'kernel'),
           'scale': ('MobilenetV2', 'Conv', 'BatchNorm', 'scale'),
           'bias': ('head', 'logits', 'bias')}
  values, grads, got = optimizer_updates(cfg, names, seed=0, steps=2)

  w = {k: v.astype(np.float64) for k, v in values.items()}
  accum = {k: np.zeros_like(v) for k, v in w.items()}
  for step, g in enumerate(grads):
    rate = 0.05 * (1 - step / 10) ** 0.9
    for k in names:
      decayed = g[k] + (0.01 * w[k] if k == 'kernel' else 0.0)   # only the regular kernel
      accum[k] = 0.9 * accum[k] + (2.0 if k == 'bias' else 1.0) * decayed
      w[k] = w[k] - rate * accum[k]
  for k in names:
    np.testing.assert_allclose(got[k], w[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_the_adam_option_is_adam_with_l2_on_the_poly_schedule(tiny_config):
  # train.optimizer='adam' (the quickstart's): Kingma & Ba's update with bias correction
  # (beta1 0.9, beta2 0.999, eps 1e-8) of g + wd * w, the same L2 and schedule as SGD's.
  cfg = tiny_config.train
  cfg.optimizer, cfg.steps, cfg.learning_rate, cfg.lr_power, cfg.warmup_steps = \
      'adam', 10, 0.01, 0.9, 0
  cfg.weight_decay = 0.01
  names = {'kernel': ('head', 'logits', 'kernel'), 'bias': ('head', 'logits', 'bias')}
  values, grads, got = optimizer_updates(cfg, names, seed=1, steps=3)

  w = {k: v.astype(np.float64) for k, v in values.items()}
  m = {k: np.zeros_like(v) for k, v in w.items()}
  v2 = {k: np.zeros_like(v) for k, v in w.items()}
  for step, g in enumerate(grads):
    rate = 0.01 * (1 - step / 10) ** 0.9
    for k in names:
      d = (g[k] + (0.01 * w[k] if k == 'kernel' else 0.0)) * (2.0 if k == 'bias' else 1.0)
      m[k] = 0.9 * m[k] + 0.1 * d
      v2[k] = 0.999 * v2[k] + 0.001 * d * d
      m_hat, v_hat = m[k] / (1 - 0.9 ** (step + 1)), v2[k] / (1 - 0.999 ** (step + 1))
      w[k] = w[k] - rate * m_hat / (np.sqrt(v_hat) + 1e-8)
  for k in names:
    np.testing.assert_allclose(got[k], w[k], rtol=1e-5, atol=1e-6, err_msg=k)
  cfg.optimizer = 'lamb'
  with pytest.raises(ValueError, match="'sgd' or 'adam'"):
    step_lib.create_optimizer(cfg, lambda _: 1.0)
