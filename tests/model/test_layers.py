"""Convolutions with TF 'SAME' padding and aligned-corner resizes against TensorFlow and lax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from jax import lax

from seg.model.layers import conv, depthwise_conv, resize_bilinear, same_padding

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
