"""DeepLabv3 on a MobileNetV2 encoder, as in the MobileNetV2 paper (Sandler et al., 2018).

Variable names follow TF-slim and DeepLab (`Conv`, `expanded_conv_N/{expand,
depthwise,project}`, `image_pooling`, `aspp0`, `concat_projection`, `logits`)
so that the official checkpoints map onto them one to one.
"""

import functools
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seg.layers import Conv, ConvBN, resize_bilinear

AXIS_NAME = 'batch'  # the one pmap axis: gradients, BatchNorm statistics, metrics
MEAN_PIXEL = 127.5   # pads images (DeepLab's mean value); 0 after `preprocess`

# (expansion t, output channels c, repeats n, first stride s) from the paper's Table 2.
MOBILENET_V2_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STEM_CHANNELS = 32
HEAD_CHANNELS = 256
OUTPUT_STRIDES = (8, 16, 32)
HEADS = ('reduced', 'aspp')
BACKBONE_SCOPE = 'MobilenetV2'  # the backbone's variable scope, as in DeepLab's checkpoints
# The input convention the weights expect, recorded as `config.model.preprocessing`:
# DeepLab's `_preprocess_zero_mean_unit_range`, [0, 255] -> [-1, 1] (`preprocess` below).
DEFAULT_PREPROCESSING = 'zero_mean_unit_range'
PREPROCESSINGS = (DEFAULT_PREPROCESSING,)


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
  """Rounds a channel count to a multiple of `divisor` as TF-slim does (never down by >10%)."""
  min_value = min_value or divisor
  rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return rounded


def block_specs(width: float, output_stride: int) -> Tuple[Tuple[int, int, int, int], ...]:
  """Per inverted-residual block: (expanded channels, out channels, stride, dilation).

  Once the running stride reaches `output_stride`, later strides become 1 and
  the dilation rate grows instead (atrous convolution), as in TF-slim.
  """
  if output_stride not in OUTPUT_STRIDES:
    raise ValueError(f'output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}')
  specs = []
  channels = make_divisible(STEM_CHANNELS * width)
  current_stride, rate = 2, 1  # the stem conv has stride 2
  for t, c, n, s in MOBILENET_V2_BLOCKS:
    out = make_divisible(c * width)
    for i in range(n):
      stride = s if i == 0 else 1
      if current_stride == output_stride:
        layer_stride, layer_rate = 1, rate
        rate *= stride
      else:
        layer_stride, layer_rate = stride, 1
        current_stride *= stride
      specs.append((make_divisible(channels * t), out, layer_stride, layer_rate))
      channels = out
  return tuple(specs)


class InvertedResidual(nn.Module):
  """Expand 1x1 (ReLU6) -> depthwise 3x3 (ReLU6) -> linear 1x1 projection, + residual."""
  expanded: int
  features: int
  stride: int
  dilation: int
  bn: dict

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    inputs = x
    if self.expanded > x.shape[-1]:
      x = ConvBN(self.expanded, activation=nn.relu6, name='expand', **self.bn)(x, train)
    x = ConvBN(x.shape[-1], 3, self.stride, self.dilation, depthwise=True,
               activation=nn.relu6, name='depthwise', **self.bn)(x, train)
    x = ConvBN(self.features, name='project', **self.bn)(x, train)
    if self.stride == 1 and inputs.shape[-1] == self.features:
      x = x + inputs
    return x


class MobileNetV2(nn.Module):
  """MobileNetV2 up to the last inverted-residual block (320 channels at width 1.0).

  The final 1x1 conv to 1280 channels is left out, as in DeepLab.
  """
  width: float = 1.0
  output_stride: int = 16
  bn_momentum: float = 0.9997
  bn_epsilon: float = 1e-3
  axis_name: Optional[str] = AXIS_NAME

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: [batch, height, width, 3] in [-1, 1] -> [batch, h/os, w/os, channels]."""
    bn = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, axis_name=self.axis_name)
    x = ConvBN(make_divisible(STEM_CHANNELS * self.width), 3, 2, activation=nn.relu6,
               name='Conv', **bn)(x, train)
    for i, (expanded, out, stride, dilation) in enumerate(
        block_specs(self.width, self.output_stride)):
      name = 'expanded_conv' if i == 0 else f'expanded_conv_{i}'
      x = InvertedResidual(expanded, out, stride, dilation, bn, name=name)(x, train)
    return x


class DeepLabV3(nn.Module):
  """DeepLabv3 head: image pooling + 1x1 branch (+ three atrous 3x3 branches for 'aspp')."""
  num_classes: int
  head: str = 'reduced'
  atrous_rates: Sequence[int] = (6, 12, 18)
  dropout_rate: float = 0.1
  bn_momentum: float = 0.9997
  bn_epsilon: float = 1e-5
  axis_name: Optional[str] = AXIS_NAME

  @nn.compact
  def __call__(self, features: jax.Array, train: bool = False) -> jax.Array:
    """features: [batch, h, w, c] -> logits [batch, h, w, num_classes]."""
    if self.head not in HEADS:
      raise ValueError(f'head must be one of {HEADS}, got {self.head!r}')
    branch = functools.partial(ConvBN, HEAD_CHANNELS, activation=nn.relu,
                               bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
                               axis_name=self.axis_name)
    size = features.shape[1:3]
    pooled = jnp.mean(features, axis=(1, 2), keepdims=True)
    pooled = branch(name='image_pooling')(pooled, train)
    # Upsampling a 1x1 map bilinearly is a broadcast.
    branches = [jnp.broadcast_to(pooled, pooled.shape[:1] + size + pooled.shape[3:]),
                branch(name='aspp0')(features, train)]
    if self.head == 'aspp':
      for i, rate in enumerate(self.atrous_rates, start=1):
        branches.append(branch(kernel_size=3, dilation=rate, name=f'aspp{i}')(features, train))
    x = jnp.concatenate(branches, axis=-1)
    x = branch(name='concat_projection')(x, train)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return Conv(self.num_classes, use_bias=True, kernel_init=nn.initializers.normal(0.01),
                name='logits')(x)


class DeepLabV3MobileNetV2(nn.Module):
  """The whole network: images in, logits at the input resolution out.

  Attributes mirror `config.model` (see `create_model`).
  """
  num_classes: int = 21
  width: float = 1.0
  output_stride: int = 16
  head: str = 'reduced'
  dropout_rate: float = 0.1
  bn_momentum: float = 0.9997
  backbone_bn_epsilon: float = 1e-3
  head_bn_epsilon: float = 1e-5
  axis_name: Optional[str] = AXIS_NAME

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False,
               upsample: bool = True) -> jax.Array:
    """images: [batch, height, width, 3] float in [-1, 1].

    Returns logits [batch, height, width, num_classes] (or at the feature
    resolution when `upsample` is False).
    """
    features = MobileNetV2(self.width, self.output_stride, self.bn_momentum,
                           self.backbone_bn_epsilon, self.axis_name,
                           name=BACKBONE_SCOPE)(images, train)
    # DeepLab doubles the atrous rates at output stride 8.
    rates = tuple(r * 16 // self.output_stride for r in (6, 12, 18))
    logits = DeepLabV3(self.num_classes, self.head, rates, self.dropout_rate,
                       self.bn_momentum, self.head_bn_epsilon, self.axis_name,
                       name='head')(features, train)
    if upsample:
      logits = resize_bilinear(logits, images.shape[1:3])
    return logits


def create_model(model_config) -> DeepLabV3MobileNetV2:
  """Builds the network from `config.model` (see experiments/base.py).

  Refuses a `model.preprocessing` other than the one `preprocess` applies, so
  that weights expecting other inputs are never run on [-1, 1] images.
  """
  preprocessing = model_config.get('preprocessing', DEFAULT_PREPROCESSING)
  if preprocessing not in PREPROCESSINGS:
    raise ValueError(f'model.preprocessing={preprocessing!r} is not implemented '
                     f'(only {PREPROCESSINGS}: [0, 255] -> [-1, 1])')
  return DeepLabV3MobileNetV2(
      num_classes=model_config.num_classes, width=model_config.width,
      output_stride=model_config.output_stride, head=model_config.head,
      dropout_rate=model_config.dropout_rate, bn_momentum=model_config.bn_momentum,
      backbone_bn_epsilon=model_config.backbone_bn_epsilon,
      head_bn_epsilon=model_config.head_bn_epsilon)


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 or float [0, 255] RGB -> [-1, 1], DeepLab's MobileNetV2 convention.

  Integer images become float32; float64 stays float64 (used by exactness tests).
  """
  return images.astype(jnp.promote_types(images.dtype, jnp.float32)) / 127.5 - 1.0
