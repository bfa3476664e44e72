"""ONNX export: the folded network written node by node with the `onnx` package's helpers.

    python main.py export --workdir runs/qs --format onnx --output model.onnx
    python main.py export --workdir runs/qs --format onnx --output model.int8.onnx \\
        --quantize int8 --calibration train

The graph is `seg.export.network` walked with ONNX nodes (`OnnxOps`, NCHW inside): Conv for
the dense, depthwise (group = channels) and 1x1 layers, Clip for ReLU6, ReduceMean + two 1x1
Convs for the image-pooling bias, then a channels-last Resize (linear, align_corners) and
ArgMax. TensorFlow's 'SAME' padding becomes explicit pads where it does not depend on the
input size (stride 1, dilated or not) and auto_pad SAME_UPPER where it does (the strided
layers: ONNX's SAME_UPPER puts the odd pixel after, as TensorFlow does). Opset 17; no framework is needed
to build it, only `onnx` (and onnxruntime to quantise).

The model:
  input  images   uint8 [N, H, W, 3] RGB; N, H and W dynamic unless `--size` fixes H x W
  output classes  uint8 [N, H, W] class ids
         logits   float32 [N, H, W, classes], with `logits=True` only (upsampled)

int8: onnxruntime.quantization.quantize_static in QDQ format, weights int8 (7-bit range) per output
channel, activations uint8 per tensor (ONNX Runtime's choice for x86 CPUs), MinMax ranges
from the calibration canvases (`seg.export.inputs`). ONNX Runtime fuses each
DequantizeLinear -> Conv -> QuantizeLinear into one integer convolution.
"""

import contextlib
import logging
import os
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from seg.export.network import network
from seg.model.layers import same_padding
from seg.preprocessing import MEAN_PIXEL

OPSET = 17


class OnnxOps:
  """`seg.export.network.Ops` as ONNX nodes on NCHW tensors (tensor = its name)."""

  def __init__(self):
    from onnx import helper, numpy_helper
    self.helper, self.numpy_helper = helper, numpy_helper
    self.nodes: List[Any] = []
    self.initializers: List[Any] = []
    self._count: Dict[str, int] = {}

  def name(self, prefix: str) -> str:
    self._count[prefix] = self._count.get(prefix, 0) + 1
    return f'{prefix}_{self._count[prefix]}'

  def constant(self, array: np.ndarray, prefix: str) -> str:
    name = self.name(prefix)
    self.initializers.append(self.numpy_helper.from_array(np.asarray(array), name))
    return name

  def node(self, op: str, inputs: Sequence[str], **attributes) -> str:
    output = self.name(op.lower())
    self.nodes.append(self.helper.make_node(op, list(inputs), [output], name=output,
                                            **attributes))
    return output

  def _conv(self, x, w_oihw, b, stride, dilation, group):
    kh, kw = w_oihw.shape[2:]
    inputs = [x, self.constant(w_oihw, 'w')] + ([self.constant(b, 'b')] if b is not None else [])
    attributes = dict(kernel_shape=[kh, kw], strides=[stride, stride],
                      dilations=[dilation, dilation], group=group)
    if stride == 1:  # 'SAME' independent of the size: (k - 1) * dilation, split floor / ceil
      (top, bottom), (left, right) = (same_padding(1, kh, 1, dilation),
                                      same_padding(1, kw, 1, dilation))
      attributes['pads'] = [top, left, bottom, right]
    else:
      attributes['auto_pad'] = 'SAME_UPPER'
    return self.node('Conv', inputs, **attributes)

  def conv(self, x, w, b, stride, dilation):
    return self._conv(x, w.transpose(3, 2, 0, 1), b, stride, dilation, 1)

  def depthwise(self, x, w, b, stride, dilation):
    return self._conv(x, w.transpose(2, 0, 1)[:, None], b, stride, dilation, w.shape[-1])

  def pointwise(self, x, w, b):
    return self._conv(x, w.T[:, :, None, None], b, 1, 1, 1)

  def relu(self, x):
    return self.node('Relu', [x])

  def relu6(self, x):
    if not hasattr(self, '_six'):
      self._zero = self.constant(np.float32(0), 'zero')
      self._six = self.constant(np.float32(6), 'six')
    return self.node('Clip', [x, self._zero, self._six])

  def add(self, x, y):
    return self.node('Add', [x, y])

  def concat(self, xs):
    return self.node('Concat', xs, axis=1)

  def spatial_mean(self, x):
    return self.node('ReduceMean', [x], axes=[2, 3], keepdims=1)


def build(folded: Dict[str, Any], model_config, size: Optional[Tuple[int, int]] = None,
          logits: bool = False, description: str = '', upsample: bool = True):
  """The float32 ONNX ModelProto (see the module docstring); `size` fixes H x W.

  `upsample=False`: the network alone, output `logits` float32 [N, fh, fw, classes] at the
  feature resolution, no resize and no argmax (what benchmarks/export_speed.py times).
  """
  from onnx import TensorProto, helper
  ops = OnnxOps()
  height, width = size if size else ('height', 'width')
  images = helper.make_tensor_value_info('images', TensorProto.UINT8, ['batch', height, width, 3])
  x = ops.node('Cast', ['images'], to=TensorProto.FLOAT)
  x = ops.node('Div', [x, ops.constant(np.float32(MEAN_PIXEL), 'mean_pixel')])
  x = ops.node('Sub', [x, ops.constant(np.float32(1), 'one')])   # seg.preprocessing.preprocess
  x = ops.node('Transpose', [x], perm=[0, 3, 1, 2])
  y = network(ops, folded, x, width=model_config.width, output_stride=model_config.output_stride)
  if not upsample:
    ops.nodes.append(helper.make_node('Transpose', [y], ['logits'], perm=[0, 2, 3, 1],
                                      name='logits'))
    outputs = [helper.make_tensor_value_info(
        'logits', TensorProto.FLOAT, ['batch', 'feature_height', 'feature_width',
                                      model_config.num_classes])]
    return _model(ops, images, outputs, description)
  # The upsampling and the argmax channels-last (the Transpose is of the small logits): ONNX
  # Runtime then resizes with its channels-last kernel and the argmax reads contiguous
  # channels instead of 21 planes of H x W (the speed-up is still to be measured under the
  # CPU lock: docs/export.md#speed).
  y = ops.node('Transpose', [y], perm=[0, 2, 3, 1])
  # Resize to the input's own height and width (aligned corners, as the model upsamples).
  sizes = ops.node('Concat', [
      ops.node('Slice', [ops.node('Shape', ['images']), ops.constant(np.array([0]), 'i'),
                         ops.constant(np.array([3]), 'i')]),
      ops.node('Slice', [ops.node('Shape', [y]), ops.constant(np.array([3]), 'i'),
                         ops.constant(np.array([4]), 'i')])], axis=0)
  y_name = 'logits' if logits else ops.name('resize')
  ops.nodes.append(helper.make_node('Resize', [y, '', '', sizes], [y_name], name='resize',
                                    mode='linear', coordinate_transformation_mode='align_corners'))
  classes = ops.node('ArgMax', [y_name], axis=3, keepdims=0)
  ops.nodes.append(helper.make_node('Cast', [classes], ['classes'], to=TensorProto.UINT8,
                                    name='classes'))
  outputs = [helper.make_tensor_value_info('classes', TensorProto.UINT8,
                                           ['batch', height, width])]
  if logits:
    outputs.append(helper.make_tensor_value_info(
        'logits', TensorProto.FLOAT, ['batch', height, width, model_config.num_classes]))
  return _model(ops, images, outputs, description)


def _model(ops: OnnxOps, images, outputs, description: str):
  """The checked ModelProto of the graph `ops` built from `images` to `outputs`."""
  from onnx import checker, helper
  graph = helper.make_graph(ops.nodes, 'deeplabv3_mobilenetv2', [images], outputs,
                            ops.initializers)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', OPSET)],
                            producer_name='seg', doc_string=description)
  model.ir_version = 8  # what opset 17 needs; readable by ONNX Runtime >= 1.13
  checker.check_model(model, full_check=True)
  return model


@contextlib.contextmanager
def _without_preprocessing_advice():
  """quantize_static without its two warnings to run ONNX Runtime's pre-processing first.

  That pre-processing folds BatchNorm into convolutions and infers shapes; the exported
  graph has its BatchNorm folded already, and quantize_static infers the shapes itself.
  """
  advice = lambda record: 'pre-processing before quantization' not in record.getMessage()
  root = logging.getLogger()
  root.addFilter(advice)
  try:
    yield
  finally:
    root.removeFilter(advice)


def quantize_int8(model, calibration: Sequence[np.ndarray], log=print):
  """The QDQ int8 model of a float32 ModelProto, calibrated on uint8 canvases [h, w, 3]."""
  import onnx
  from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                        QuantType, quantize_static)
  if not len(calibration):
    raise ValueError('--quantize int8 needs calibration images (--calibration)')

  class Reader(CalibrationDataReader):
    def __init__(self):
      self.i = 0

    def get_next(self):
      if self.i == len(calibration):
        return None
      if self.i % 50 == 0:
        log(f'  calibrating: {self.i}/{len(calibration)} images')
      self.i += 1
      return {'images': calibration[self.i - 1][None]}

  with tempfile.TemporaryDirectory() as tmp:
    source, target = os.path.join(tmp, 'float32.onnx'), os.path.join(tmp, 'int8.onnx')
    onnx.save(model, source)
    # reduce_range: 7-bit weights. x86 CPUs without VNNI multiply uint8 x int8 pairs into
    # int16 sums (vpmaddubsw) that saturate with 8-bit weights (255 * 127 * 2 > 32767);
    # ONNX Runtime gives wrong classes there (54% agreement with float32 on the test model
    # on an AVX2 AMD EPYC, against 75% on an Intel Xeon with VNNI).
    with _without_preprocessing_advice():
      quantize_static(source, target, Reader(), quant_format=QuantFormat.QDQ,
                      per_channel=True, reduce_range=True,
                      activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                      calibrate_method=CalibrationMethod.MinMax,
                      op_types_to_quantize=['Conv', 'Clip', 'Relu', 'Add', 'Concat',
                                            'ReduceMean', 'Transpose', 'Resize'],
                      extra_options={'ActivationSymmetric': False, 'WeightSymmetric': True})
    return _argmax_on_integers(onnx.load(target))


def _argmax_on_integers(model):
  """The ArgMax reads the quantized upsampled logits instead of their dequantized copy.

  Dequantizing ((q - zero point) * scale, scale > 0) is strictly increasing, so the argmax
  (first maximum included) is the same; it saves a float32 copy of the full-resolution
  logits and runs ArgMax on uint8.
  """
  nodes = model.graph.node
  producers = {output: node for node in nodes for output in node.output}
  for node in nodes:
    source = producers.get(node.input[0]) if node.op_type == 'ArgMax' else None
    if source is not None and source.op_type == 'DequantizeLinear':
      node.input[0] = source.input[0]
      if not any(source.output[0] in n.input for n in nodes) and source.output[0] not in {
          o.name for o in model.graph.output}:
        nodes.remove(source)
  return model
