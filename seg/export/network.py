"""The inference network written once against a small set of layer operations, for exporters.

`seg.inference.forward` is the network as JAX computes it. The exporters re-express the same
function in other frameworks' operations (TensorFlow ops for LiteRT, ONNX nodes), and
`network` is the one description of its layers they all walk, so they cannot drift from each
other: an exporter implements `Ops` (a convolution, a depthwise convolution, a pointwise
convolution, activations, a spatial mean, ...) and `network` calls them in the order and with
the strides, dilations and weights of `forward`.

What it keeps of `forward` (and what each `Ops` must honour):
- TensorFlow 'SAME' padding everywhere: `total = max((out - 1) * stride + (k - 1) * dilation
  + 1 - size, 0)`, `total // 2` before and the rest after (`seg.model.layers.same_padding`),
  for strided and dilated layers alike.
- The image-pooling branch is a spatial mean, a 1x1 convolution + ReLU, then its share of the
  concat projection: a per-image [256] vector added to the projection of the other branches
  (a bias), not a broadcast 256-channel map concatenated at every pixel.
- Logits at the feature resolution; the exporter resizes them (aligned corners) and takes
  the argmax.
"""

from typing import Any, Dict, Optional, Protocol

import numpy as np

from seg.model import block_specs

ASPP_RATES = (6, 12, 18)  # at output stride 16, scaled by 16 / output_stride (as `forward`)


class Ops(Protocol):
  """The operations `network` needs; `x` is whatever tensor type the exporter builds.

  Weights are float32 NumPy arrays in the folded layout (`seg.inference.fold`).
  """

  def conv(self, x, w: np.ndarray, b: np.ndarray, stride: int, dilation: int):
    """Dense 'SAME' convolution + bias. w: [kh, kw, in, out], b: [out]."""

  def depthwise(self, x, w: np.ndarray, b: np.ndarray, stride: int, dilation: int):
    """Depthwise 'SAME' convolution + bias. w: [kh, kw, channels], b: [channels]."""

  def pointwise(self, x, w: np.ndarray, b: Optional[np.ndarray]):
    """1x1 convolution (+ bias unless None). w: [in, out]."""

  def relu(self, x):
    """max(x, 0)."""

  def relu6(self, x):
    """min(max(x, 0), 6)."""

  def add(self, x, y):
    """x + y; y may be a per-image [1 x 1] map broadcast over space."""

  def concat(self, xs):
    """Concatenation over channels."""

  def spatial_mean(self, x):
    """Mean over height and width, kept as a 1 x 1 map."""


def network(ops: Ops, folded: Dict[str, Any], x, *, width: float, output_stride: int):
  """The logits at the feature resolution of the preprocessed images `x` ([-1, 1], 0 = pad).

  Args:
    ops: the exporter's operations.
    folded: `seg.inference.fold.fold_variables(..., xp=np)`, float32.
    x: the exporter's tensor of images [n, h, w, 3] (in its own layout).
    width, output_stride: `config.model`'s.

  Returns:
    the exporter's tensor of logits, [n, ceil(h / output_stride), ..., classes].
  """
  f32 = lambda a: np.asarray(a, np.float32)
  x = ops.relu6(ops.conv(x, f32(folded['stem']['w']), f32(folded['stem']['b']), 2, 1))
  # Strides and dilations from the architecture; channel counts from the weights (they
  # depend on model.divisible_by too).
  for block, (_, _, stride, dilation) in zip(folded['blocks'], block_specs(width, output_stride)):
    channels = (block['expand']['w'].shape[0] if 'expand' in block
                else block['depthwise']['w'].shape[-1])
    out = block['project']['w'].shape[-1]
    y = x
    if 'expand' in block:
      y = ops.relu6(ops.pointwise(y, f32(block['expand']['w']), f32(block['expand']['b'])))
    y = ops.relu6(ops.depthwise(y, f32(block['depthwise']['w']), f32(block['depthwise']['b']),
                                stride, dilation))
    y = ops.pointwise(y, f32(block['project']['w']), f32(block['project']['b']))
    x = ops.add(y, x) if stride == 1 and channels == out else y

  head = folded['head']
  pooled = ops.spatial_mean(x)
  pooled = ops.relu(ops.pointwise(pooled, f32(head['pool']['w']), f32(head['pool']['b'])))
  pooled_term = ops.pointwise(pooled, f32(head['proj_pool']), None)  # [n, 1, 1, 256]
  branches = [ops.relu(ops.pointwise(x, f32(head['aspp0']['w']), f32(head['aspp0']['b'])))]
  for i, rate in enumerate(ASPP_RATES, start=1):
    if f'aspp{i}' in head:
      branches.append(ops.relu(ops.conv(x, f32(head[f'aspp{i}']['w']), f32(head[f'aspp{i}']['b']),
                                        1, rate * 16 // output_stride)))
  y = ops.concat(branches) if len(branches) > 1 else branches[0]
  y = ops.pointwise(y, f32(head['proj_branches']), f32(head['proj_b']))
  y = ops.relu(ops.add(y, pooled_term))
  return ops.pointwise(y, f32(head['logits']['w']), f32(head['logits']['b']))
