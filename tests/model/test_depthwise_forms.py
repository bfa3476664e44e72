"""The two ways of writing a depthwise convolution (SEG_DEPTHWISE) compute the same thing:
shifted multiply-adds and one grouped convolution, in training's layer and in the engine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seg.inference import forward
from seg.model import layers


def _numpy_depthwise(x, k, stride, dilation):
  """Direct 'SAME' depthwise convolution in float64, pixel by pixel of the output."""
  n, h, w, c = x.shape
  kh, kw = k.shape[:2]
  (pt, _), (pl, _) = (layers.same_padding(h, kh, stride, dilation),
                      layers.same_padding(w, kw, stride, dilation))
  oh, ow = -(-h // stride), -(-w // stride)
  out = np.zeros((n, oh, ow, c))
  for i in range(oh):
    for j in range(ow):
      for a in range(kh):
        for b in range(kw):
          y, z = i * stride - pt + a * dilation, j * stride - pl + b * dilation
          if 0 <= y < h and 0 <= z < w:
            out[:, i, j] += x[:, y, z].astype(np.float64) * k[a, b, 0]
  return out


@pytest.mark.parametrize('stride,dilation', [(1, 1), (2, 1), (1, 2), (1, 4)])
def test_layer_forms_agree_forward_and_backward(stride, dilation):
  rng = np.random.default_rng(stride * 10 + dilation)
  x = rng.normal(size=(2, 9, 11, 6)).astype(np.float32)
  k = rng.normal(size=(3, 3, 1, 6)).astype(np.float32)
  want = _numpy_depthwise(x, k, stride, dilation)
  outs, grads = {}, {}
  for form in layers.DEPTHWISE_FORMS:
    fn = lambda x, k: layers.depthwise_conv(x, k, stride, dilation, form=form)
    outs[form] = np.asarray(fn(x, k))
    grads[form] = jax.grad(lambda x, k: jnp.sum(fn(x, k) ** 2), argnums=(0, 1))(x, k)
    np.testing.assert_allclose(outs[form], want, rtol=1e-5, atol=1e-5)
  for a, b in zip(grads['shifted'], grads['grouped']):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_engine_forms_agree(dtype, tol):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 10, 10, 8)), dtype)
  w = jnp.asarray(rng.normal(size=(3, 3, 8)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(8,)), jnp.float32)
  for stride, dilation in ((1, 1), (2, 1), (1, 2)):
    shifted = forward._depthwise(x, w, b, stride, dilation, form='shifted')
    grouped = forward._depthwise(x, w, b, stride, dilation, form='grouped')
    assert shifted.dtype == grouped.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(grouped), np.asarray(shifted), rtol=tol, atol=tol)


def test_the_setting_and_its_platform_default(monkeypatch):
  monkeypatch.delenv('SEG_DEPTHWISE', raising=False)
  assert jax.default_backend() == 'cpu' and layers.depthwise_form() == 'shifted'
  monkeypatch.setenv('SEG_DEPTHWISE', 'grouped')
  assert layers.depthwise_form() == 'grouped'
  monkeypatch.setenv('SEG_DEPTHWISE', 'cudnn')
  with pytest.raises(ValueError, match='SEG_DEPTHWISE'):
    layers.depthwise_form()
