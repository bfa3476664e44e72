"""Convolutions with TF 'SAME' padding and aligned-corner resizes against TensorFlow and lax;
BatchNorm (synchronised in one collective) against NumPy and flax's own BatchNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest
import tensorflow as tf
from jax import lax

from seg.model.layers import BatchNorm, conv, depthwise_conv, resize_bilinear, same_padding

RNG = np.random.default_rng(0)


def _rand(*shape):
  return RNG.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize('size', [7, 8, 15, 16, 33])
@pytest.mark.parametrize('stride,dilation', [(1, 1), (2, 1), (1, 2), (1, 4)])
def test_depthwise_matches_tensorflow(size, stride, dilation):
  x, w = _rand(2, size, size + 1, 5), _rand(3, 3, 1, 5)
  expected = tf.nn.depthwise_conv2d(x, np.transpose(w, (0, 1, 3, 2)), [1, stride, stride, 1],
                                    'SAME', dilations=[dilation, dilation]).numpy()
  got = np.asarray(depthwise_conv(jnp.asarray(x), jnp.asarray(w), stride, dilation))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('size', [8, 9, 16, 17])
def test_depthwise_strided_and_dilated_matches_lax(size):
  # TensorFlow refuses stride > 1 with dilation > 1; lax's 'SAME' uses TF's formula.
  x, w = _rand(1, size, size, 4), _rand(3, 3, 1, 4)
  expected = lax.conv_general_dilated(x, w, (2, 2), 'SAME', rhs_dilation=(2, 2),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      feature_group_count=4)
  np.testing.assert_allclose(depthwise_conv(x, w, 2, 2), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('size', [7, 8, 16, 17])
@pytest.mark.parametrize('kernel,stride,dilation', [(3, 2, 1), (3, 1, 1), (3, 1, 6), (1, 1, 1),
                                                    (1, 2, 1)])
def test_dense_conv_matches_tensorflow(size, kernel, stride, dilation):
  x, w = _rand(2, size, size, 3), _rand(kernel, kernel, 3, 6)
  expected = tf.nn.conv2d(x, w, stride, 'SAME', dilations=dilation).numpy()
  np.testing.assert_allclose(conv(x, w, stride, dilation), expected, rtol=1e-4, atol=1e-4)


def test_depthwise_gradients_match_grouped_conv():
  x, w = _rand(2, 9, 10, 3), _rand(3, 3, 1, 3)

  def reference(x, w):
    return lax.conv_general_dilated(x, w, (2, 2), 'SAME',
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                    feature_group_count=3)

  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  ours = jax.grad(loss(lambda x, w: depthwise_conv(x, w, 2)), argnums=(0, 1))(x, w)
  theirs = jax.grad(loss(reference), argnums=(0, 1))(x, w)
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('kernel,stride,dilation', [(3, 1, 1), (3, 2, 1), (1, 2, 1), (3, 1, 2),
                                                    (3, 1, 6), (5, 2, 1)])
def test_same_padding_formula_against_tensorflow_output_sizes(kernel, stride, dilation):
  # Explicit padding by the formula, then a VALID convolution, gives what TensorFlow's own
  # 'SAME' gives: the output size ceil(size / stride) and the values (so the extra row and
  # column sit on the far side, as TF puts them).
  for size in range(5, 20):
    x, w = _rand(1, size, size + 1, 2), _rand(kernel, kernel, 2, 3)
    rows, cols = same_padding(size, kernel, stride, dilation), same_padding(size + 1, kernel,
                                                                            stride, dilation)
    padded = np.pad(x, [(0, 0), rows, cols, (0, 0)])
    got = tf.nn.conv2d(padded, w, stride, 'VALID', dilations=dilation).numpy()
    expected = tf.nn.conv2d(x, w, stride, 'SAME', dilations=dilation).numpy()
    assert got.shape == expected.shape, (size, got.shape, expected.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('in_hw,out_hw', [((5, 7), (17, 25)), ((33, 33), (513, 513)),
                                          ((9, 4), (3, 2)), ((1, 1), (5, 5))])
def test_resize_bilinear_matches_tf1_align_corners(in_hw, out_hw):
  x = _rand(2, *in_hw, 3)
  expected = tf.compat.v1.image.resize_bilinear(x, out_hw, align_corners=True).numpy()
  np.testing.assert_allclose(resize_bilinear(jnp.asarray(x), out_hw), expected,
                             rtol=1e-4, atol=1e-4)


def _bn_inputs(devices):
  # Per-device means far apart (3 and -2 on channel 0), so that the global variance holds a
  # large between-device part that a mean of per-device variances would miss.
  x = RNG.standard_normal((devices, 2, 5, 5, 3)) * [1.0, 0.5, 2.0] + [0.3, -1.0, 4.0]
  x[:, :, :, :, 0] += np.linspace(3, -2, devices)[:, None, None, None]
  return x.astype(np.float32)


def _bn_variables(c):
  # Running statistics and affine terms away from their initial values.
  return {'params': {'scale': np.linspace(0.5, 2, c).astype(np.float32),
                     'bias': np.linspace(-1, 1, c).astype(np.float32)},
          'batch_stats': {'mean': np.full(c, 0.2, np.float32), 'var': np.full(c, 1.5, np.float32)}}


def _numpy_bn(x, variables, momentum, eps):
  """Training-mode BatchNorm of the whole batch (all devices), in float64."""
  flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
  mean, var = flat.mean(0), flat.var(0)
  p, s = variables['params'], variables['batch_stats']
  y = (x - mean) / np.sqrt(var + eps) * p['scale'] + p['bias']
  return y, momentum * s['mean'] + (1 - momentum) * mean, momentum * s['var'] + (1 - momentum) * var


@pytest.mark.parametrize('devices', [1, 2, 4])
def test_synchronised_batchnorm_is_the_whole_batch_in_one_collective(devices):
  x, variables, momentum, eps = _bn_inputs(devices), _bn_variables(3), 0.9, 1e-3
  ours = BatchNorm(momentum=momentum, epsilon=eps, axis_name='batch')
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=momentum, epsilon=eps,
                         axis_name='batch', use_fast_variance=False)

  def train(module):
    def f(x):
      kwargs = {'train': True} if module is ours else {}
      return module.apply(variables, x, mutable=['batch_stats'], **kwargs)
    return f

  y, new = jax.pmap(train(ours), axis_name='batch', devices=jax.devices()[:devices])(x)
  want_y, want_mean, want_var = _numpy_bn(x, variables, momentum, eps)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  for d in range(devices):  # every device keeps the global statistics
    np.testing.assert_allclose(new['batch_stats']['mean'][d], want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new['batch_stats']['var'][d], want_var, rtol=1e-5, atol=1e-6)

  # flax's two-pass BatchNorm: the same numbers, with two collectives in sequence where ours
  # has one.
  fy, fnew = jax.pmap(train(flax_bn), axis_name='batch', devices=jax.devices()[:devices])(x)
  np.testing.assert_allclose(y, fy, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new['batch_stats']['var'], fnew['batch_stats']['var'], rtol=1e-5)

  def collectives(module):
    jaxpr = jax.make_jaxpr(jax.pmap(train(module), axis_name='batch',
                                    devices=jax.devices()[:devices]))(x)
    return str(jaxpr).count('psum')
  assert (collectives(ours), collectives(flax_bn)) == (1, 2)


def test_batchnorm_evaluation_uses_the_running_statistics_and_gradients_match_flax():
  x, variables = _bn_inputs(1)[0], _bn_variables(3)
  y = BatchNorm(epsilon=1e-3).apply(variables, x, train=False)
  s, p = variables['batch_stats'], variables['params']
  np.testing.assert_allclose(y, (x - s['mean']) / np.sqrt(s['var'] + 1e-3) * p['scale'] + p['bias'],
                             rtol=1e-6, atol=1e-6)

  def loss(module, **kwargs):
    def f(params, x):
      out, _ = module.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                            mutable=['batch_stats'], **kwargs)
      return jnp.sum(out * jnp.arange(out.size, dtype=out.dtype).reshape(out.shape) / out.size)
    return jax.grad(f, argnums=(0, 1))(variables['params'], x)
  ours = loss(BatchNorm(epsilon=1e-3), train=True)
  theirs = loss(nn.BatchNorm(use_running_average=False, epsilon=1e-3, use_fast_variance=False))
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
