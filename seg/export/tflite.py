"""LiteRT (TFLite) export: the folded network re-expressed in TensorFlow ops, then converted.

    python main.py export --workdir runs/qs --format tflite --output model.tflite [--size 257x257]
    python main.py export --workdir runs/qs --format tflite --output model.int8.tflite \\
        --quantize int8 --calibration train

The route: `seg.export.network` walked with TensorFlow ops (`TFOps`: `tf.nn.conv2d` and
`tf.nn.depthwise_conv2d` with padding 'SAME', which is TensorFlow's own rule, strided and
dilated alike; the image-pooling branch as a `reduce_mean` and a bias; the upsampling as
`resize_bilinear(align_corners=True)`; `argmax`), traced into a `tf.function` and given to
`tf.lite.TFLiteConverter`. Every op maps onto a LiteRT builtin (CONV_2D, DEPTHWISE_CONV_2D,
MEAN, ADD, CONCATENATION, RESIZE_BILINEAR, ARG_MAX, CAST), float32 and int8 alike, and
XNNPACK runs them. (`jax2tf` would hand the converter one XlaCallModule of StableHLO, which
it does not turn into builtins: docs/export.md.)

The model (signature 'serving_default'):
  input  images   uint8 [1, H, W, 3] RGB, H x W fixed at export (`seg.export.inputs` says how
                  to fit an image of another size)
  output classes  uint8 [1, H, W] class ids
         logits   float32 [1, H, W, classes], with `logits=True` only (the upsampled logits)

int8: full-integer post-training quantization (weights int8 per channel, activations int8
per tensor, ranges from the calibration canvases); the input stays the uint8 pixels: the
calibration set includes one canvas that spans 0..255, so the input's quantization is
exactly scale 1, zero point 0, which `convert` checks.

TensorFlow is imported only inside these functions (the rest of the project runs without it).
"""

import warnings
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from seg.export.network import network
from seg.preprocessing import MEAN_PIXEL


# The message of the UserWarning that TensorFlow's tf.lite.Interpreter gives when made.
_INTERPRETER_DEPRECATED = r'\s*Warning: tf.lite.Interpreter is deprecated'


def _tf():
  from seg.data.tf_quiet import tf  # only the LiteRT export needs TensorFlow
  return tf


class TFOps:
  """`seg.export.network.Ops` as TensorFlow ops on NHWC float32 tensors."""

  def __init__(self):
    self.tf = _tf()

  def conv(self, x, w, b, stride, dilation):
    tf = self.tf
    y = tf.nn.conv2d(x, tf.constant(w), strides=stride, padding='SAME', dilations=dilation)
    return tf.nn.bias_add(y, tf.constant(b))

  def depthwise(self, x, w, b, stride, dilation):
    tf = self.tf
    y = tf.nn.depthwise_conv2d(x, tf.constant(w[..., None]), strides=(1, stride, stride, 1),
                               padding='SAME', dilations=(dilation, dilation))
    return tf.nn.bias_add(y, tf.constant(b))

  def pointwise(self, x, w, b):
    tf = self.tf
    y = tf.nn.conv2d(x, tf.constant(w[None, None]), strides=1, padding='VALID')
    return y if b is None else tf.nn.bias_add(y, tf.constant(b))

  def relu(self, x):
    return self.tf.nn.relu(x)

  def relu6(self, x):
    return self.tf.nn.relu6(x)

  def add(self, x, y):
    return self.tf.add(x, y)

  def concat(self, xs):
    return self.tf.concat(xs, axis=-1)

  def spatial_mean(self, x):
    return self.tf.reduce_mean(x, axis=(1, 2), keepdims=True)


def tf_module(folded: Dict[str, Any], model_config, height: int, width: int,
              logits: bool = False, float_input: bool = False, upsample: bool = True):
  """A tf.Module whose `serve` is the whole prediction function on one fixed-size image.

  serve(images [1, height, width, 3] uint8 (float32 in [0, 255] if `float_input`)) ->
  {'classes': uint8 [1, height, width], 'logits': float32 [1, height, width, C] if `logits`};
  with `upsample=False` the network alone: {'logits': float32 [1, fh, fw, C]} at the feature
  resolution, no resize and no argmax (what benchmarks/export_speed.py times to split the cost).
  """
  tf = _tf()
  ops = TFOps()
  dtype = tf.float32 if float_input else tf.uint8

  class Exported(tf.Module):

    @tf.function(input_signature=[tf.TensorSpec((1, height, width, 3), dtype, name='images')],
                 autograph=False)
    def serve(self, images):
      x = tf.cast(images, tf.float32) / MEAN_PIXEL - 1.0   # seg.preprocessing.preprocess
      y = network(ops, folded, x, width=model_config.width,
                  output_stride=model_config.output_stride)
      if not upsample:
        return {'logits': y}
      # TF1's resize with aligned corners (RESIZE_BILINEAR in LiteRT); the raw op, as
      # tf.compat.v1.image.resize_bilinear warns that it is deprecated.
      y = tf.raw_ops.ResizeBilinear(images=y, size=(height, width), align_corners=True,
                                    half_pixel_centers=False)
      outputs = {'classes': tf.cast(tf.argmax(y, axis=-1, output_type=tf.int32), tf.uint8)}
      if logits:
        outputs['logits'] = y
      return outputs

  return Exported()


def _full_range_canvas(height: int, width: int) -> np.ndarray:
  """A canvas whose pixels span 0..255: pins the int8 input's range to the uint8 pixels."""
  ramp = np.linspace(0, 255, height * width * 3).round().reshape(height, width, 3)
  return ramp.astype(np.uint8)


def convert(folded: Dict[str, Any], model_config, height: int, width: int,
            quantize: Optional[str] = None, calibration: Sequence[np.ndarray] = (),
            logits: bool = False, upsample: bool = True, log=print) -> bytes:
  """The LiteRT flatbuffer (see the module docstring).

  Args:
    folded: `seg.inference.fold.fold_variables(..., xp=np)`.
    quantize: None (float32) or 'int8'.
    calibration: for int8, uint8 canvases [height, width, 3] (`seg.export.inputs`).
    upsample: False for the network alone (`tf_module`).
  """
  tf = _tf()
  if quantize not in (None, 'int8'):
    raise ValueError(f'--quantize must be int8 (or absent), got {quantize!r}')
  int8 = quantize == 'int8'
  if int8 and not len(calibration):
    raise ValueError('--quantize int8 needs calibration images (--calibration)')
  module = tf_module(folded, model_config, height, width, logits, float_input=int8,
                     upsample=upsample)
  function = module.serve.get_concrete_function()
  converter = tf.lite.TFLiteConverter.from_concrete_functions([function], module)
  if int8:
    canvases: List[np.ndarray] = [_full_range_canvas(height, width)] + list(calibration)

    def representative():
      for i, canvas in enumerate(canvases):
        if i % 50 == 0:
          log(f'  calibrating: {i}/{len(canvases)} images')
        yield {'images': canvas[None].astype(np.float32)}

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.float32
  from seg.data.tf_quiet import filtered_stderr
  # Without the converter's lines of noise at every conversion, and the deprecation warning
  # of TensorFlow's interpreter that its int8 calibration runs.
  with filtered_stderr(), warnings.catch_warnings():
    warnings.filterwarnings('ignore', _INTERPRETER_DEPRECATED)
    blob = converter.convert()
  if int8:
    _check_uint8_input(blob)
  return blob


def _check_uint8_input(blob: bytes) -> None:
  """The int8 model's input must read raw pixels: uint8, scale 1, zero point 0."""
  try:
    from ai_edge_litert.interpreter import Interpreter
  except ImportError:  # the runtime is not needed to export: TensorFlow's copy reads it too
    Interpreter = _tf().lite.Interpreter
  with warnings.catch_warnings():  # TensorFlow's copy warns that it is deprecated
    warnings.filterwarnings('ignore', _INTERPRETER_DEPRECATED)
    detail = Interpreter(model_content=blob).get_input_details()[0]
  scale, zero = detail['quantization']
  if detail['dtype'] != np.uint8 or abs(scale - 1.0) > 1e-6 or zero != 0:
    raise RuntimeError(f'the int8 model\'s input is {detail["dtype"]} scale {scale} zero point '
                       f'{zero}, not the uint8 pixels')
