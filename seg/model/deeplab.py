"""DeepLabv3 on a MobileNetV2 encoder, as in the MobileNetV2 paper (Sandler et al., 2018).

Variable names follow DeepLab (`image_pooling`, `aspp0`, `concat_projection`, `logits`) so
that the official checkpoints map onto them one to one.
"""

import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from seg.model.layers import Conv, ConvBN, resize_bilinear
from seg.model.mobilenet_v2 import BACKBONE_SCOPE, MobileNetV2
from seg.parallel import AXIS_NAME
from seg.preprocessing import PREPROCESSINGS

HEAD_CHANNELS = 256
HEADS = ('reduced', 'aspp')


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
  backbone_bn_momentum: float = 0.997
  head_bn_momentum: float = 0.9997
  backbone_bn_epsilon: float = 1e-3
  head_bn_epsilon: float = 1e-5
  divisible_by: int = 8
  axis_name: Optional[str] = AXIS_NAME

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False,
               upsample: bool = True) -> jax.Array:
    """images: [batch, height, width, 3] float in [-1, 1].

    Returns logits [batch, height, width, num_classes] (or at the feature
    resolution when `upsample` is False).
    """
    features = MobileNetV2(self.width, self.output_stride, self.backbone_bn_momentum,
                           self.backbone_bn_epsilon, self.axis_name, self.divisible_by,
                           name=BACKBONE_SCOPE)(images, train)
    # DeepLab doubles the atrous rates at output stride 8.
    rates = tuple(r * 16 // self.output_stride for r in (6, 12, 18))
    logits = DeepLabV3(self.num_classes, self.head, rates, self.dropout_rate,
                       self.head_bn_momentum, self.head_bn_epsilon, self.axis_name,
                       name='head')(features, train)
    if upsample:
      logits = resize_bilinear(logits, images.shape[1:3])
    return logits


def create_model(model_config) -> DeepLabV3MobileNetV2:
  """Builds the network from `config.model` (fields: `seg.config`).

  Refuses a `model.preprocessing` other than the one `preprocess` applies, so
  that weights expecting other inputs are never run on [-1, 1] images.
  """
  preprocessing = model_config.preprocessing
  if preprocessing not in PREPROCESSINGS:
    raise ValueError(f'model.preprocessing={preprocessing!r} is not implemented '
                     f'(only {PREPROCESSINGS}: [0, 255] -> [-1, 1])')
  return DeepLabV3MobileNetV2(
      num_classes=model_config.num_classes, width=model_config.width,
      output_stride=model_config.output_stride, head=model_config.head,
      dropout_rate=model_config.dropout_rate,
      backbone_bn_momentum=model_config.backbone_bn_momentum,
      head_bn_momentum=model_config.head_bn_momentum,
      backbone_bn_epsilon=model_config.backbone_bn_epsilon,
      head_bn_epsilon=model_config.head_bn_epsilon, divisible_by=model_config.divisible_by)
