"""MobileNetV2 (Sandler et al., 2018) as DeepLab's encoder: atrous output stride, TF-slim names.

Variable names follow TF-slim (`Conv`, `expanded_conv_N/{expand,depthwise,project}`) so that
the official checkpoints map onto them one to one.
"""

from typing import Optional, Tuple

import flax.linen as nn
import jax

from seg.model.layers import ConvBN
from seg.parallel import AXIS_NAME

# (expansion t, output channels c, repeats n, first stride s) from the paper's Table 2.
MOBILENET_V2_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STEM_CHANNELS = 32
OUTPUT_STRIDES = (8, 16, 32)
BACKBONE_SCOPE = 'MobilenetV2'  # the backbone's variable scope, as in DeepLab's checkpoints


# model.divisible_by: what the width-multiplied channel counts are rounded to.
#   8  TF-slim's rule (nets/mobilenet/mobilenet.py `depth_multiplier`: divisible_by=8,
#      min_depth=8), hence its ImageNet checkpoints mobilenet_v2_<width>_224;
#   1  DeepLab's feature extractor for depth_multiplier != 1 (deeplab/core/feature_extractor.py
#      `_mobilenet_v2`: divisible_by=1, min_depth=1), hence DeepLab's own width-0.5 models.
# Both agree at width 1.0. The expansions (6x) are multiples of 8 under both rules
# (nets/mobilenet/conv_blocks.py `expand_input_by_factor`); the first block's (1x) none.
DIVISIBLE_BY = (8, 1)


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
  """Rounds a channel count to a multiple of `divisor` as TF-slim does (never down by >10%)."""
  min_value = min_value or divisor
  rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return rounded


def stem_channels(width: float, divisible_by: int = 8) -> int:
  """Output channels of the stem conv (`Conv`) at `width` (see DIVISIBLE_BY)."""
  if divisible_by not in DIVISIBLE_BY:
    raise ValueError(f'model.divisible_by must be one of {DIVISIBLE_BY}, got {divisible_by}')
  return make_divisible(STEM_CHANNELS * width, divisible_by)


def block_specs(width: float, output_stride: int,
                divisible_by: int = 8) -> Tuple[Tuple[int, int, int, int], ...]:
  """Per inverted-residual block: (expanded channels, out channels, stride, dilation).

  Once the running stride reaches `output_stride`, later strides become 1 and
  the dilation rate grows instead (atrous convolution), as in TF-slim.
  `divisible_by`: the rounding of the channel counts (DIVISIBLE_BY).
  """
  if output_stride not in OUTPUT_STRIDES:
    raise ValueError(f'output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}')
  specs = []
  channels = stem_channels(width, divisible_by)
  current_stride, rate = 2, 1  # the stem conv has stride 2
  for t, c, n, s in MOBILENET_V2_BLOCKS:
    out = make_divisible(c * width, divisible_by)
    for i in range(n):
      stride = s if i == 0 else 1
      if current_stride == output_stride:
        layer_stride, layer_rate = 1, rate
        rate *= stride
      else:
        layer_stride, layer_rate = stride, 1
        current_stride *= stride
      expanded = channels if t == 1 else make_divisible(channels * t)
      specs.append((expanded, out, layer_stride, layer_rate))
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
  bn_momentum: float = 0.997
  bn_epsilon: float = 1e-3
  axis_name: Optional[str] = AXIS_NAME
  divisible_by: int = 8

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: [batch, height, width, 3] in [-1, 1] -> [batch, h/os, w/os, channels]."""
    bn = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, axis_name=self.axis_name)
    x = ConvBN(stem_channels(self.width, self.divisible_by), 3, 2, activation=nn.relu6,
               name='Conv', **bn)(x, train)
    for i, (expanded, out, stride, dilation) in enumerate(
        block_specs(self.width, self.output_stride, self.divisible_by)):
      name = 'expanded_conv' if i == 0 else f'expanded_conv_{i}'
      x = InvertedResidual(expanded, out, stride, dilation, bn, name=name)(x, train)
    return x
