"""Convolution, BatchNorm and resize primitives shared by the encoder and the head.

Why not `flax.linen.Conv`: XLA's CPU backend lowers a grouped convolution
(`feature_group_count=C`) to a slow loop, while the same layer written as `k*k` shifted
multiply-adds fuses into one elementwise kernel (measured in docs/performance.md). Padding is
TensorFlow's 'SAME' computed explicitly, so that checkpoints trained with
TensorFlow give the same outputs here, also for strided and dilated layers.

Parameters keep Flax's layout: `kernel` is [kh, kw, in / groups, out] and
`bias` is [out], so that the variables look exactly like `nn.Conv`'s.
"""

import os
from typing import Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# He initialisation: the network is trained from scratch with BatchNorm.
DEFAULT_KERNEL_INIT = nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> Tuple[int, int]:
  """TensorFlow's 'SAME' padding (before, after) for one spatial dimension."""
  effective = (kernel - 1) * dilation + 1
  out = -(-size // stride)
  total = max((out - 1) * stride + effective - size, 0)
  return total // 2, total - total // 2


DEPTHWISE_FORMS = ('shifted', 'grouped')


def depthwise_form() -> str:
  """How depthwise convolutions are written, for training and the engine alike.

  'shifted': k*k shifted multiply-adds (fast on XLA's CPU backend, which lowers a grouped
  convolution to a slow loop; docs/performance.md); 'grouped':
  `lax.conv_general_dilated(feature_group_count=C)` (cuDNN's depthwise kernels). The
  environment variable SEG_DEPTHWISE chooses; unset or 'auto': 'shifted' on a CPU,
  'grouped' on accelerators (not measured yet: `benchmarks/gpu_check.py` times both).
  Read when a function is traced.
  """
  form = os.environ.get('SEG_DEPTHWISE', 'auto') or 'auto'
  if form == 'auto':
    return 'shifted' if jax.default_backend() == 'cpu' else 'grouped'
  if form not in DEPTHWISE_FORMS:
    raise ValueError(f'SEG_DEPTHWISE must be auto or one of {DEPTHWISE_FORMS}, got {form!r}')
  return form


def grouped_depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int = 1,
                           dilation: int = 1, preferred_element_type=None) -> jax.Array:
  """`depthwise_conv` as one grouped convolution (feature_group_count = channels)."""
  kh, kw = kernel.shape[:2]
  pads = (same_padding(x.shape[1], kh, stride, dilation),
          same_padding(x.shape[2], kw, stride, dilation))
  return lax.conv_general_dilated(
      x, kernel.reshape(kh, kw, 1, x.shape[-1]), (stride, stride), pads,
      rhs_dilation=(dilation, dilation), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=x.shape[-1], preferred_element_type=preferred_element_type)


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int = 1,
                   dilation: int = 1, form: Optional[str] = None) -> jax.Array:
  """Depthwise convolution with 'SAME' padding, written as `form` (default `depthwise_form()`).

  Args:
    x: [batch, height, width, channels].
    kernel: [kh, kw, 1, channels].
    stride, dilation: the same in both spatial dimensions.

  Returns:
    [batch, ceil(height / stride), ceil(width / stride), channels].
  """
  if (form or depthwise_form()) == 'grouped':
    return grouped_depthwise_conv(x, kernel, stride, dilation)
  kh, kw = kernel.shape[:2]
  n, h, w, c = x.shape
  pad_h = same_padding(h, kh, stride, dilation)
  pad_w = same_padding(w, kw, stride, dilation)
  xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
  out_h, out_w = -(-h // stride), -(-w // stride)
  out = None
  for i in range(kh):
    for j in range(kw):
      tap = lax.slice(
          xp, (0, i * dilation, j * dilation, 0),
          (n, i * dilation + (out_h - 1) * stride + 1,
           j * dilation + (out_w - 1) * stride + 1, c),
          (1, stride, stride, 1))
      term = tap * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


def conv(x: jax.Array, kernel: jax.Array, stride: int = 1, dilation: int = 1) -> jax.Array:
  """Dense convolution with TensorFlow 'SAME' padding; 1x1 convolutions are matmuls.

  Args:
    x: [batch, height, width, in].
    kernel: [kh, kw, in, out].
  """
  kh, kw = kernel.shape[:2]
  if kh == kw == 1 and stride == 1:
    return jnp.einsum('nhwc,cd->nhwd', x, kernel[0, 0])
  pads = (same_padding(x.shape[1], kh, stride, dilation),
          same_padding(x.shape[2], kw, stride, dilation))
  return lax.conv_general_dilated(
      x, kernel, (stride, stride), pads, rhs_dilation=(dilation, dilation),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


class Conv(nn.Module):
  """A 2D convolution, dense or depthwise, with TensorFlow 'SAME' padding.

  Records its multiply-adds per image in the `madds` collection when that
  collection is mutable (used by `seg.model.complexity`).
  """
  features: int
  kernel_size: int = 1
  stride: int = 1
  dilation: int = 1
  depthwise: bool = False
  use_bias: bool = False
  kernel_init: Callable = DEFAULT_KERNEL_INIT

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin = x.shape[-1]
    if self.depthwise and self.features != cin:
      raise ValueError(f'depthwise conv keeps channels: {cin} in, {self.features} asked')
    k = self.kernel_size
    kernel = self.param('kernel', self.kernel_init,
                        (k, k, 1 if self.depthwise else cin, self.features))
    kernel = kernel.astype(x.dtype)
    if self.depthwise:
      y = depthwise_conv(x, kernel, self.stride, self.dilation)
    else:
      y = conv(x, kernel, self.stride, self.dilation)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,)).astype(y.dtype)
    if not self.is_initializing():  # keep the counts out of the model's variables
      per_tap = 1 if self.depthwise else cin
      self.sow('madds', 'conv', int(np.prod(y.shape[1:])) * per_tap * k * k)
    return y


class ConvBN(nn.Module):
  """Conv -> BatchNorm -> optional activation, named as in TF-slim (`conv`/`BatchNorm`).

  `axis_name` makes BatchNorm average its batch statistics over every device
  of that pmap axis during training (synchronised BatchNorm).
  """
  features: int
  kernel_size: int = 1
  stride: int = 1
  dilation: int = 1
  depthwise: bool = False
  activation: Optional[Callable[[jax.Array], jax.Array]] = None
  bn_momentum: float = 0.9997
  bn_epsilon: float = 1e-3
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = Conv(self.features, self.kernel_size, self.stride, self.dilation,
             self.depthwise, name='depthwise' if self.depthwise else 'conv')(x)
    x = BatchNorm(momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                  axis_name=self.axis_name, name='BatchNorm')(x, train)
    return self.activation(x) if self.activation is not None else x


def batch_moments(x: jax.Array, axis_name: Optional[str] = None) -> Tuple[jax.Array, jax.Array]:
  """Mean and (biased) variance of `x` over all but its last axis, in float32.

  With `axis_name` (inside `pmap`), of the whole batch across that axis's devices in one
  collective: each device reduces its own mean m_d and centred second moment v_d (two
  passes, as stable as `np.var`), and one `pmean` of [m_d, v_d, m_d^2] gives the global
  mean and, by the law of total variance over equal per-device shares,
  var = mean(v_d) + (mean(m_d^2) - mean(m_d)^2). On one device the between-device term is
  exactly 0, so the statistics are the two-pass ones bit for bit.
  """
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  axes = tuple(range(x.ndim - 1))
  mean = x.mean(axes)
  var = jnp.square(x - mean).mean(axes)
  if axis_name is None:
    return mean, var
  mean, within, mean_sq = lax.pmean(jnp.stack([mean, var, jnp.square(mean)]), axis_name)
  return mean, within + jnp.maximum(mean_sq - jnp.square(mean), 0.0)


class BatchNorm(nn.Module):
  """BatchNorm over N, H, W with `flax.linen.BatchNorm`'s variables (params `scale`, `bias`;
  batch_stats `mean`, `var`) and its arithmetic, synchronised across `axis_name` in one
  collective per layer (`batch_moments`) where flax's two-pass variance needs two in
  sequence. Running statistics: new = momentum * old + (1 - momentum) * batch.
  """
  momentum: float = 0.99
  epsilon: float = 1e-3
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32)
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    if not train:
      mean, var = ra_mean.value, ra_var.value
    elif self.is_initializing():
      mean, var = batch_moments(x)
    else:
      mean, var = batch_moments(x, self.axis_name)
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    y = (x - mean) * (lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.astype(jnp.result_type(x, scale, bias))


def align_corners_taps(out_size: int, in_size: int,
                       span: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray]:
  """The aligned-corner bilinear rule as taps: (lo [out_size] int64, frac [out_size] float32).

  Output pixel o reads input position p = o * span / (out_size - 1) (span defaults to
  in_size - 1: corner pixels map to corner pixels), as (1 - frac) * x[lo] + frac * x[lo + 1]
  (lo <= in_size - 2; with one input pixel, lo = 0 and frac = 0). A smaller `span` maps the
  output onto the first `span + 1` input pixels: `seg.predict.upsampling` takes an image's
  logits from the feature grid of its padded canvas straight to its original size with it.
  """
  if in_size == 1 or out_size == 1:
    return np.zeros(out_size, np.int64), np.zeros(out_size, np.float32)
  span = in_size - 1 if span is None else span
  src = np.arange(out_size) * span / (out_size - 1)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 2)
  return lo, (src - lo).astype(np.float32)


def align_corners_matrix(out_size: int, in_size: int, span: Optional[float] = None) -> np.ndarray:
  """[out_size, in_size] bilinear interpolation weights with aligned corners
  (`align_corners_taps`)."""
  m = np.zeros((out_size, in_size), np.float32)
  lo, frac = align_corners_taps(out_size, in_size, span)
  rows = np.arange(out_size)
  m[rows, lo] = 1.0 - frac
  if in_size > 1:
    m[rows, lo + 1] += frac
  return m


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinear resize with aligned corners, as TF1's `resize_bilinear(align_corners=True)`.

  DeepLab uses this convention throughout; it maps corner pixels to corner
  pixels, which lines up with output stride grids for sizes of the form
  `k * output_stride + 1` (513 = 32 * 16 + 1).

  Args:
    x: [batch, height, width, channels].
    size: (new_height, new_width).
  """
  mh = jnp.asarray(align_corners_matrix(size[0], x.shape[1]), x.dtype)
  mw = jnp.asarray(align_corners_matrix(size[1], x.shape[2]), x.dtype)
  x = jnp.einsum('oh,nhwc->nowc', mh, x)
  return jnp.einsum('pw,nowc->nopc', mw, x)
