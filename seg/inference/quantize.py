"""int8 inference: the folded network with int8 x int8 -> int32 products, calibrated once.

    scales = load_or_calibrate(workdir, config, variables)      # workdir/int8_scales.json
    params = quantize_folded(fold_variables(config.model, variables, xp=np), scales)
    logits = forward_int8(params, images, width=..., output_stride=...)

What is int8 (the rest stays float32, as in `seg.inference.forward`):
- every 1x1 product (MobileNetV2's expand and project layers, the head's aspp0, concat
  projection and logits) from input stride `INT8_FROM_STRIDE` on. Its weights are
  per-output-channel symmetric int8 (scale = max |w[:, c]| / 127) taken from the folded
  (BatchNorm-folded) float32 kernels; its input is per-tensor symmetric int8 with a scale
  calibrated on training images (`calibrate`: the largest |x| the float32 network produced
  there, / 127). The product accumulates in int32 (`lax.dot_general` with
  `preferred_element_type=int32`); the requantisation (int32 -> float32 times
  input scale x weight scale, + bias, ReLU6 where the layer has one, and the rounding to
  int8 of the next product's input) is elementwise work that XLA fuses into one loop.
- float32 stays: the stem (3 input channels), the depthwise 3x3 layers (nine multiply-adds per
  output, memory-bound), the residual sums, the image-pooling branch and the 3x3 ASPP branches.

Three formulations (`FORMULATIONS`): 'int8' stores the weights as int8 and multiplies int8
by int8 into int32; 'float32' stores the same integers as float32 and multiplies them in
float32 (with at most 1,040 input channels every partial sum is an integer below 2^24, so
float32 holds it exactly and both compute the same accumulators bit for bit); 'kernel' packs
the int8 weights for the project's own kernel (`seg.inference.int8_kernel`: AVX2, AVX-VNNI,
AVX-512 VNNI or AMX tiles, the same accumulators, with bias, activation and requantisation in its
output loop), and by default also stores each expansion's ReLU6 output, the depthwise
layer's input, as uint8 in a calibrated scale ('block{i}/depthwise', `scale_names`) that the
depthwise weights carry; that depthwise layer then runs in the kernel's depthwise loop
(`int8_kernel.depthwise`: uint8 in, the projection's uint8 input out). Beyond the products,
the kernel formulation runs in the kernel (each with an environment variable that puts
XLA's back, for A/B timings; read when a function is traced):
- the stem and block 0's depthwise layer, image to block 0's projection input
  (`int8_kernel.stem`; SEG_INT8_STEM=xla);
- the depthwise layers (SEG_INT8_DEPTHWISE=xla), with the expansion before them in one pass
  where its output reaches `FUSE_FROM_BYTES` (`int8_kernel.expand_depthwise`;
  SEG_INT8_FUSE=xla);
- the residual sums and the rounding of each block's output to the next product's input,
  in the projection's output loop (`_handoff`; SEG_INT8_HANDOFF=xla); signed inputs are
  x + 128 in uint8 where a VNNI loop runs (`int8_kernel.signed_input_form`;
  SEG_INT8_SIGNED_INPUTS=int8).
Which is fastest depends on the CPU (`seg.inference.cpu_features`); the stored weights say
which one runs, so `forward_int8` is one pure function of (params, images). An export
(`seg.inference.export`) always carries 'int8'.
"""

import hashlib
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from seg.inference.cpu_features import FORMULATIONS
from seg.inference.forward import _conv, _depthwise, _stem, pixels_in_kernel, preprocessed
from seg.model import block_specs
from seg.model.layers import resize_bilinear

INT8_MAX = 127
SCALES_FILE = 'int8_scales.json'
# Products whose input has at least this stride are int8 (the stem's output has stride 2, so
# 2 means all of them). Chosen by measurement: docs/performance.md ("int8").
INT8_FROM_STRIDE = 2
# float32 holds integers up to 2^24 exactly: k * 127 * 127 < 2^24 for k <= 1040.
MAX_EXACT_INPUTS = 2**24 // (INT8_MAX * INT8_MAX)


# ------------------------------------------------------------------------------------------
# The network

def product_names(model_config) -> List[str]:
  """The names of the network's 1x1 products, in the order they run (the scales' keys)."""
  names = []
  for i, (expanded, out, stride, dilation) in enumerate(block_specs(model_config.width,
                                                                    model_config.output_stride)):
    if i > 0:  # block 0 has no expansion (t=1)
      names.append(f'block{i}/expand')
    names.append(f'block{i}/project')
  return names + ['head/aspp0', 'head/proj_branches', 'head/logits']


def _relu6(x):
  return jnp.clip(x, 0.0, 6.0)


ACTIVATIONS = {None: lambda x: x, 'relu6': _relu6, 'relu': jax.nn.relu}
# Products whose input is >= 0 (it comes out of a ReLU or ReLU6): the kernel formulation
# stores it as uint8 in [0, 127] (the same integers as the symmetric int8 of the others).
SIGNED_INPUTS = ('expand', 'aspp0')


def scale_names(model_config) -> List[str]:
  """The keys of a scales file: every product's input, and every depthwise layer's input
  that an expansion produces ('block{i}/depthwise', stored as uint8 by the kernel
  formulation)."""
  names = product_names(model_config)
  return names + [n.replace('/expand', '/depthwise') for n in names if n.endswith('/expand')]


def quantize_input(x: jax.Array, inv_scale, dtype, signed: bool = True) -> jax.Array:
  """round(x / scale) clipped to [-127, 127] (`signed`) or [0, 127], as `dtype` (int8,
  uint8, or float32 integers)."""
  return jnp.clip(jnp.round(x * inv_scale), -INT8_MAX if signed else 0,
                  INT8_MAX).astype(dtype)


def _product_input(x: jax.Array, layer: Dict[str, Any], name: str):
  """(q, offset_input): the kernel's input of the product `name` from x. A signed input is
  x + 128 in uint8 where a VNNI loop runs (it multiplies that form), else int8; an input
  quantised already in this layer's scale is taken as it is (uint8 from the kernel's
  depthwise layer; int8 or x + 128 from the previous projection, 'inv_int8_out_scale')."""
  from seg.inference import int8_kernel
  signed = name.rsplit('/', 1)[-1] in SIGNED_INPUTS
  if x.dtype in (jnp.uint8, jnp.int8):
    return x, signed and x.dtype == jnp.uint8
  if signed and int8_kernel.signed_input_form() == 'offset_uint8':
    q = jnp.clip(jnp.round(x * layer['inv_x_scale']), -INT8_MAX, INT8_MAX) + 128
    return q.astype(jnp.uint8), True
  return quantize_input(x, layer['inv_x_scale'], jnp.int8 if signed else jnp.uint8,
                        signed), False


def _int8_out_mode() -> str:
  """The kernel mode of a projection that writes the next (signed) product's input."""
  from seg.inference import int8_kernel
  return ('linear_offset_uint8' if int8_kernel.signed_input_form() == 'offset_uint8' else
          'linear_int8')


def product(x: jax.Array, layer: Dict[str, Any], name: str,
            observe: Optional[Dict[str, jax.Array]] = None,
            activation: Optional[str] = None) -> jax.Array:
  """activation(1x1 product + bias) over the last axis: x [..., in] -> [..., out] float32.

  `layer` is quantised ({'w' int8 or float32 integers [in, out] (or the kernel's packed
  int8, 1-D), 'scale' [out] = input scale x weight scale, 'inv_x_scale' [], 'b' [out]}) or
  float32 ({'w', 'b'}). With the kernel's layers and 'inv_out_scale' in `layer`, the result
  is uint8 (ReLU6 requantised, `seg.inference.int8_kernel`); with 'inv_int8_out_scale' (1 /
  the next product's input scale, no activation) it is that product's input (int8, or x + 128
  as uint8: `int8_kernel.signed_input_form`). `observe` (float layers only): where the
  largest |x| of the layer's input is recorded under `name`.
  """
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  w = layer['w']
  if 'scale' in layer and w.ndim == 1:  # the kernel formulation
    from seg.inference import int8_kernel
    q, offset = _product_input(x, layer, name)
    if 'inv_out_scale' in layer:  # an expansion: ReLU6, requantised for the depthwise layer
      mode, inv_out = 'relu6_uint8', layer['inv_out_scale']
    elif 'inv_int8_out_scale' in layer:  # a projection whose output is the next's input
      mode, inv_out = _int8_out_mode(), layer['inv_int8_out_scale']
    else:
      mode, inv_out = activation or 'linear', 1.0
    return int8_kernel.product(q, w, layer['scale'], layer['b'], mode, inv_out,
                               offset_input=offset)
  act = ACTIVATIONS[activation]
  if 'scale' in layer:
    q = quantize_input(x, layer['inv_x_scale'], w.dtype)
    acc = lax.dot_general(q, w, dims, preferred_element_type=(
        jnp.int32 if w.dtype == jnp.int8 else jnp.float32))
    return act(acc.astype(jnp.float32) * layer['scale'] + layer['b'])
  if observe is not None:
    observe[name] = jnp.max(jnp.abs(x))
  return act(lax.dot_general(x, w.astype(jnp.float32), dims,
                             preferred_element_type=jnp.float32) + layer['b'])


KERNEL_CHOICES = ('kernel', 'xla')


def _kernel_or_xla(variable: str) -> str:
  choice = os.environ.get(variable, 'kernel') or 'kernel'
  if choice not in KERNEL_CHOICES:
    raise ValueError(f'{variable} must be one of {KERNEL_CHOICES}, got {choice!r}')
  return choice


def depthwise_choice() -> str:
  """SEG_INT8_DEPTHWISE: 'kernel' (unset: the kernel's depthwise loop where it can run) or
  'xla' (XLA's taps, for A/B timings). Read when a function is traced."""
  return _kernel_or_xla('SEG_INT8_DEPTHWISE')


# Expansions whose uint8 output is at least this many bytes per image run with their depthwise
# layer in one pass (`int8_kernel.expand_depthwise`): blocks 1-3 at 513x513. Chosen by
# measurement (docs/performance.md, "Beyond the products": fusing every block was slower).
FUSE_FROM_BYTES = 2 * 2**20


def fuse_choice() -> str:
  """SEG_INT8_FUSE: 'kernel' (unset: large expansions and their depthwise layers in one pass,
  `FUSE_FROM_BYTES`) or 'xla' (never; the name as the other choices', for A/B timings).
  Read when a function is traced."""
  return _kernel_or_xla('SEG_INT8_FUSE')


def handoff_choice() -> str:
  """SEG_INT8_HANDOFF: 'kernel' (unset: a projection adds its block's residual and writes the
  next product's input itself, `_handoff`) or 'xla' (XLA's sum and quantisation, for A/B
  timings). Read when a function is traced."""
  return _kernel_or_xla('SEG_INT8_HANDOFF')


def stem_choice() -> str:
  """SEG_INT8_STEM: 'kernel' (unset: the stem and block 0's depthwise layer in the kernel's
  stem loop where it can run) or 'xla' (XLA's, for A/B timings). Read when traced."""
  return _kernel_or_xla('SEG_INT8_STEM')


def _kernel_depthwise(y: jax.Array, project: Dict[str, Any], stride: int,
                      dilation: int) -> bool:
  """Whether a block's depthwise layer runs in the kernel (`int8_kernel.depthwise`): its
  input is the kernel's uint8, its projection is the kernel's, and `depthwise_choice()` is
  'kernel'."""
  from seg.inference.int8_kernel import depthwise_supported
  return (y.dtype == jnp.uint8 and project['w'].ndim == 1 and
          depthwise_supported(y.shape, stride, dilation) and depthwise_choice() == 'kernel')


def _kernel_stem(images: jax.Array, params: Dict[str, Any], spec, observe) -> bool:
  """Whether the stem and block 0's depthwise layer run in the kernel (`int8_kernel.stem`):
  block 0 has no expansion, a stride-1 undilated depthwise layer and no residual sum, its
  projection is the kernel's, and `stem_choice()` is 'kernel'."""
  from seg.inference.int8_kernel import stem_supported
  first = params['blocks'][0]
  _, out, stride, dilation = spec
  return (observe is None and 'expand' not in first and first['project']['w'].ndim == 1 and
          (stride, dilation) == (1, 1) and params['stem']['w'].shape[-1] != out and
          images.dtype in (jnp.float32, jnp.uint8) and
          stem_supported(images.shape, params['stem']['w'].shape) and stem_choice() == 'kernel')


def _kernel_fused(x: jax.Array, params: Dict[str, Any], stride: int, dilation: int,
                  observe) -> bool:
  """Whether a block's expansion and depthwise layer run in one pass
  (`int8_kernel.expand_depthwise`): both would run in the kernel, the expansion's output is
  at least `FUSE_FROM_BYTES` per image, and `fuse_choice()` is 'kernel'."""
  expand = params.get('expand')
  if expand is None or 'inv_out_scale' not in expand or observe is not None:
    return False
  expanded = jax.ShapeDtypeStruct(x.shape[:3] + expand['b'].shape, jnp.uint8)
  return (x.shape[1] * x.shape[2] * expand['b'].shape[0] >= FUSE_FROM_BYTES and
          _kernel_depthwise(expanded, params['project'], stride, dilation) and
          fuse_choice() == 'kernel')


def _handoff(params: Dict[str, Any], specs, index: int, observe):
  """What the projection of block `index` writes besides (or instead of) its float32 output
  when it and the next product (block index + 1's expansion, or the head's aspp0) are the
  kernel's: (1 / that product's input scale, the form it takes, whether the float32 output
  is needed too: by a residual sum in the next block, or by the head's pooling). None
  otherwise, or where the projection writes int8 itself ('inv_int8_out_scale': block 0)."""
  from seg.inference import int8_kernel
  blocks = params['blocks']
  project = blocks[index]['project']
  last = index + 1 == len(blocks)
  nxt = params['head']['aspp0'] if last else blocks[index + 1].get('expand')
  if (observe is not None or nxt is None or project['w'].ndim != 1 or nxt['w'].ndim != 1 or
      'inv_int8_out_scale' in project or handoff_choice() != 'kernel'):
    return None
  keep_float = last or (specs[index + 1][2] == 1 and specs[index + 1][1] == specs[index][1])
  return nxt['inv_x_scale'], int8_kernel.signed_input_form(), keep_float


def block(x, params: Dict[str, Any], index: int, stride: int, dilation: int,
          observe=None, handoff=None):
  """One inverted-residual block: x [n, h, w, c] float32 -> float32 (see `product`), or int8
  where its projection writes the next expansion's input ('inv_int8_out_scale'), or with
  `handoff` (`_handoff`) the pair (float32 or None, the next product's input). x may be such
  a pair: the expansion takes the second, the residual sum the first."""
  x, x_q = x if isinstance(x, tuple) else (x, None)
  x_in = x if x_q is None else x_q
  project = params['project']
  residual = stride == 1 and x_in.shape[-1] == project['b'].shape[0]
  if _kernel_fused(x_in, params, stride, dilation, observe):
    y = _fused(x_in, params, index, stride, dilation)
  else:
    y = _expand_depthwise(x_in, params, index, stride, dilation, observe)
  if handoff is None:
    y = product(y, project, f'block{index}/project', observe)
    return y + x if residual else y
  from seg.inference import int8_kernel  # the sum and the next product's input in one pass
  q, offset = _product_input(y, project, f'block{index}/project')
  inv_next, form, keep_float = handoff
  result = int8_kernel.product(q, project['w'], project['scale'], project['b'], 'linear',
                               inv_next, offset_input=offset,
                               residual=x if residual else None, requantised=form,
                               keep_float=keep_float)
  return result if keep_float else (None, result)


def _fused(x: jax.Array, params: Dict[str, Any], index: int, stride: int, dilation: int):
  """The expansion and depthwise layer in one pass (`_kernel_fused`): the projection's input."""
  from seg.inference import int8_kernel
  expand, dw = params['expand'], params['depthwise']
  q, offset = _product_input(x, expand, f'block{index}/expand')
  return int8_kernel.expand_depthwise(q, expand['w'], expand['scale'], expand['b'],
                                      expand['inv_out_scale'], dw['w'], dw['b'], stride,
                                      dilation, params['project']['inv_x_scale'],
                                      offset_input=offset)


def _expand_depthwise(x: jax.Array, params: Dict[str, Any], index: int, stride: int,
                      dilation: int, observe) -> jax.Array:
  """The expansion (if any) and the depthwise layer: the projection's input."""
  dw = params['depthwise']
  y = x
  if 'expand' in params:
    # float32, or uint8 whose scale the depthwise weights carry (the kernel formulation).
    y = product(y, params['expand'], f'block{index}/expand', observe, 'relu6')
    if observe is not None:
      observe[f'block{index}/depthwise'] = jnp.max(y)
  if _kernel_depthwise(y, params['project'], stride, dilation):
    from seg.inference import int8_kernel  # uint8 in, the projection's uint8 input out
    return int8_kernel.depthwise(y, dw['w'], dw['b'], stride, dilation,
                                 params['project']['inv_x_scale'])
  return _relu6(_depthwise(y, dw['w'], dw['b'], stride, dilation))


def forward_int8(params: Dict[str, Any], images: jax.Array, *, width: float,
                 output_stride: int, upsample: bool = True, image_by_image: bool = False,
                 observe: Optional[Dict[str, jax.Array]] = None, dtype=None,
                 sizes: Optional[jax.Array] = None) -> jax.Array:
  """The network's logits from `quantize_folded`'s params (or float32 folded ones).

  As `seg.inference.forward.forward` (same arguments and result); with float32 folded
  params (`cast_folded(..., float32)`) and a dict `observe`, it computes in float32 and
  records the largest |input| of every product (`calibrate`).
  """
  del dtype  # int8 (the params say which layers are); accepted as `forward` accepts it
  specs = block_specs(width, output_stride)
  if images.dtype == jnp.uint8 and not (pixels_in_kernel() and
                                        _kernel_stem(images, params, specs[0], observe)):
    images, sizes = preprocessed(images, sizes), None  # the whole batch, in XLA
  if image_by_image and images.shape[0] > 1 and observe is None:
    def one(each):
      image, size = each
      return forward_int8(params, image[None], width=width, output_stride=output_stride,
                          upsample=upsample, sizes=None if size is None else size[None])[0]
    return lax.map(one, (images, sizes))
  first = 0
  if _kernel_stem(images, params, specs[0], observe):
    from seg.inference import int8_kernel  # float32 image in, block 0's projection input out
    stem, blk = params['stem'], params['blocks'][0]
    project = blk['project']
    fused = None  # block 0's projection in the same pass where it writes block 1's input
    if 'inv_int8_out_scale' in project:
      fused = (project['w'], project['scale'], project['b'], _int8_out_mode(),
               project['inv_int8_out_scale'])
    y = int8_kernel.stem(images, stem['w'], stem['b'], blk['depthwise']['w'],
                         blk['depthwise']['b'], project['inv_x_scale'], fused, sizes=sizes)
    x, first = (y if fused else product(y, project, 'block0/project')), 1
  else:
    x = _relu6(_stem(preprocessed(images, sizes), params['stem']['w'], params['stem']['b']))
  for i, (blk, (_, _, stride, dilation)) in enumerate(zip(params['blocks'], specs)):
    if i >= first:
      x = block(x, blk, i, stride, dilation, observe, _handoff(params, specs, i, observe))
  x, x_q = x if isinstance(x, tuple) else (x, x)  # aspp0 takes x_q: the last block's handoff
  head = params['head']
  pooled = jnp.mean(x, axis=(1, 2))
  pooled = jax.nn.relu(pooled @ head['pool']['w'] + head['pool']['b'])
  pooled_term = pooled @ head['proj_pool']  # [n, 256]
  branches = [product(x_q, head['aspp0'], 'head/aspp0', observe, 'relu')]
  rates = tuple(r * 16 // output_stride for r in (6, 12, 18))
  for i, rate in enumerate(rates, start=1):
    if f'aspp{i}' in head:
      branches.append(jax.nn.relu(_conv(x, head[f'aspp{i}']['w'], head[f'aspp{i}']['b'],
                                        dilation=rate)))
  y = jnp.concatenate(branches, axis=-1) if len(branches) > 1 else branches[0]
  y = product(y, head['proj_branches'], 'head/proj_branches', observe)
  y = jax.nn.relu(y + pooled_term[:, None, None, :])
  logits = product(y, head['logits'], 'head/logits', observe)
  if upsample:
    logits = resize_bilinear(logits, images.shape[1:3])
  return logits


def _product_layers(tree: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
  """{product name: its layer dict} of a folded tree (proj_branches as {'w', 'b'})."""
  layers = {}
  for i, blk in enumerate(tree['blocks']):
    if 'expand' in blk:
      layers[f'block{i}/expand'] = blk['expand']
    layers[f'block{i}/project'] = blk['project']
  head = tree['head']
  layers['head/aspp0'] = head['aspp0']
  layers['head/proj_branches'] = head['proj_branches']
  layers['head/logits'] = head['logits']
  return layers


def _as_layers(folded: Dict[str, Any]) -> Dict[str, Any]:
  """`fold_variables`' tree (NumPy) with the concat projection as a layer {'w', 'b'}."""
  tree = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), folded)
  head = dict(tree['head'])
  head['proj_branches'] = {'w': head.pop('proj_branches'), 'b': head.pop('proj_b')}
  return dict(tree, head=head)


def _input_strides(model_config) -> Dict[str, int]:
  """{product name: the stride of its input}."""
  strides, stride = {}, 2
  for i, (_, _, s, _) in enumerate(block_specs(model_config.width, model_config.output_stride)):
    strides[f'block{i}/expand'] = stride
    stride *= s
    strides[f'block{i}/project'] = stride
  for name in ('head/aspp0', 'head/proj_branches', 'head/logits'):
    strides[name] = stride
  return strides


def quantize_weight(w: np.ndarray):
  """[in, out] float -> (int8 [in, out], scale [out]): symmetric, per output channel."""
  amax = np.abs(w).max(axis=0)
  scale = np.where(amax > 0, amax / INT8_MAX, 1.0).astype(np.float32)
  return np.clip(np.round(w / scale), -INT8_MAX, INT8_MAX).astype(np.int8), scale


def quantize_folded(model_config, folded: Dict[str, Any], scales: Dict[str, float],
                    formulation: str = 'int8', from_stride: int = INT8_FROM_STRIDE,
                    uint8_depthwise_inputs: bool = True) -> Dict[str, Any]:
  """The params of `forward_int8`: `fold_variables`' tree with its products quantised.

  Args:
    folded: `fold_variables(config.model, variables, xp=np)` (float32).
    scales: {name: input scale} (`calibrate`; `scale_names`).
    formulation: 'int8' (int8 weights, int32 accumulation), 'float32' (the same integers
      as float32: the same results, see the module docstring) or 'kernel' (the int8
      weights packed for `seg.inference.int8_kernel`, CPU only: the same accumulators;
      a product whose inputs are not a multiple of 4 keeps 'int8').
    from_stride: products whose input stride is below it stay float32.
    uint8_depthwise_inputs ('kernel' only): each expansion's output leaves the kernel as
      uint8 in the scale calibrated for the depthwise input (`block{i}/depthwise`), which
      the depthwise weights then carry; False keeps it float32 (the numbers of 'int8').
      True also has a projection whose output is only the next expansion's input (neither
      block sums a residual: block 0's) write that input itself ('inv_int8_out_scale').
  """
  if formulation not in FORMULATIONS:
    raise ValueError(f'formulation must be one of {FORMULATIONS}, got {formulation!r}')
  tree = _as_layers(folded)
  strides = _input_strides(model_config)
  for name, layer in _product_layers(tree).items():
    if strides[name] < from_stride:
      continue
    if name not in scales:
      raise ValueError(f'no int8 scale for {name}: recalibrate ({SCALES_FILE})')
    if layer['w'].shape[0] > MAX_EXACT_INPUTS:
      raise ValueError(f'{name}: {layer["w"].shape[0]} inputs exceed int32-exact float32 '
                       f'accumulation ({MAX_EXACT_INPUTS})')
    x_scale = np.float32(scales[name])
    q, w_scale = quantize_weight(layer['w'])
    if formulation == 'kernel' and q.shape[0] % 4 == 0:
      from seg.inference import int8_kernel
      layer['w'] = int8_kernel.pack_weights(q, int8_kernel.k_multiple())
    elif formulation == 'kernel':  # the kernel takes inputs in groups of 4 channels
      layer['w'] = q
    else:
      layer['w'] = q if formulation == 'int8' else q.astype(np.float32)
    layer['scale'] = (w_scale * x_scale).astype(np.float32)
    layer['inv_x_scale'] = np.float32(1.0 / x_scale)
  if formulation == 'kernel' and uint8_depthwise_inputs:
    for i, blk in enumerate(tree['blocks']):
      if 'expand' in blk and blk['expand']['w'].ndim == 1:
        name = f'block{i}/depthwise'
        if name not in scales:
          raise ValueError(f'no int8 scale for {name}: recalibrate ({SCALES_FILE})')
        d_scale = np.float32(scales[name])
        blk['expand']['inv_out_scale'] = np.float32(1.0 / d_scale)
        blk['depthwise'] = dict(blk['depthwise'],
                                w=(blk['depthwise']['w'] * d_scale).astype(np.float32))
    blocks, specs = tree['blocks'], block_specs(model_config.width, model_config.output_stride)
    inputs = [tree['stem']['b'].shape[0]] + [blk['project']['b'].shape[0] for blk in blocks]
    residual = lambda i: specs[i][2] == 1 and inputs[i] == inputs[i + 1]
    for i in range(len(blocks) - 1):
      nxt = blocks[i + 1].get('expand')
      if (not residual(i) and not residual(i + 1) and nxt is not None and nxt['w'].ndim == 1
          and blocks[i]['project']['w'].ndim == 1):
        blocks[i]['project']['inv_int8_out_scale'] = nxt['inv_x_scale']
  return tree


# ------------------------------------------------------------------------------------------
# Calibration

def float_params(folded: Dict[str, Any]) -> Dict[str, Any]:
  """`fold_variables`' tree in the layout `forward_int8` reads, all float32."""
  return _as_layers(folded)


def calibrate(config, folded: Dict[str, Any], images: Sequence[np.ndarray],
              batch_size: int = 8, log=None) -> Dict[str, float]:
  """{name: input scale} (`scale_names`): the largest |input| over `images`, / 127.

  Each image runs the float32 network padded to its shape bucket, as inference pads it.
  images: [h, w, 3] uint8 (`seg.inference.calibration.calibration_images`).
  """
  from seg.preprocessing import bucket_shape, preprocess_padded
  params = jax.device_put(float_params(folded))
  m = config.model

  @jax.jit
  def ranges(p, canvas, sizes):
    observed = {}
    forward_int8(p, preprocess_padded(canvas, sizes), width=m.width,
                 output_stride=m.output_stride, upsample=False, observe=observed)
    return observed

  groups: Dict[Any, List[np.ndarray]] = {}
  for image in images:
    groups.setdefault(bucket_shape(*image.shape[:2], config.data.eval_size), []).append(image)
  amax: Dict[str, float] = {}
  done, start = 0, time.time()
  for (h, w), group in sorted(groups.items()):
    for first in range(0, len(group), batch_size):
      chunk = group[first:first + batch_size]
      canvas = np.zeros((batch_size, h, w, 3), np.uint8)
      sizes = np.ones((batch_size, 2), np.int32)
      for i, image in enumerate(chunk):
        canvas[i, :image.shape[0], :image.shape[1]] = image
        sizes[i] = image.shape[:2]
      # Filler rows repeat the first image, so they add no range of their own.
      canvas[len(chunk):] = canvas[0]
      sizes[len(chunk):] = sizes[0]
      for name, value in jax.device_get(ranges(params, canvas, sizes)).items():
        amax[name] = max(amax.get(name, 0.0), float(value))
      done += len(chunk)
  if log:
    log(f'calibrated int8 scales on {done} images in {time.time() - start:.1f}s')
  return {name: (value / INT8_MAX if value > 0 else 1.0) for name, value in amax.items()}


def model_fingerprint(folded: Dict[str, Any]) -> str:
  """sha256 of the folded weights: which model a scales file belongs to."""
  digest = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(folded):
    digest.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
  return digest.hexdigest()


def load_or_calibrate(workdir: str, config, folded: Dict[str, Any], source: Optional[str] = None,
                      count: Optional[int] = None, seed: int = 0, log=print,
                      images_fn: Optional[Callable] = None) -> Dict[str, float]:
  """The int8 input scales of the model in `workdir`: read from `workdir/int8_scales.json`
  when it was calibrated for these weights and this calibration set, else calibrated on
  `calibration_images(source, config, count, seed)` and written there.

  Without `source` the calibration set is the stored file's (the workdir keeps the images
  it was once calibrated on, e.g. a folder given to `predict --calibration`), else the
  config's training split; `count` then defaults to the stored set's, else to 200.
  folded: `fold_variables(config.model, variables, xp=np)`.
  """
  from seg.inference.calibration import DEFAULT_COUNT
  path = os.path.join(workdir, SCALES_FILE)
  fingerprint = model_fingerprint(folded)
  stored = None
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
  before = (stored or {}).get('calibration', {})
  if source and os.path.exists(source):  # a folder or list: the same wherever run from
    source = os.path.abspath(source)
  kept = {} if source else before  # a source given is a new set: its count defaults to 200
  wanted = {'source': source or kept.get('source') or config.data.train_split,
            'count': count or kept.get('count') or DEFAULT_COUNT, 'seed': seed}
  source, count = wanted['source'], wanted['count']
  if stored is not None:
    same_set = {k: before.get(k) for k in wanted} == wanted
    if stored.get('model') == fingerprint and same_set and \
        set(stored.get('scales', {})) >= set(scale_names(config.model)):
      log(f'int8 scales from {path} ({before["images"]} images of {source!r})')
      return {k: float(v) for k, v in stored['scales'].items()}
    log(f'{path} belongs to other weights or another calibration set: recalibrating')
  from seg.inference.calibration import calibration_images
  images = (images_fn or calibration_images)(source, config, count, seed)
  log(f'calibrating int8 scales on {len(images)} images of {source!r} ...')
  scales = calibrate(config, folded, images, log=log)
  record = {'model': fingerprint, 'method': 'max |x| / 127, per tensor',
            'calibration': dict(wanted, images=len(images)),
            'date_utc': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
            'scales': scales}
  tmp = f'{path}.{os.getpid()}.tmp'  # shards of one predict, calibrating at once, each own
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(tmp, 'w') as f:
      json.dump(record, f, indent=1)
    os.replace(tmp, path)
    log(f'wrote {path}')
  except OSError as e:  # a read-only model folder: use them, calibrate again next time
    log(f'could not store the int8 scales as {path} ({e.strerror or e}): they serve this run '
        'only, and the next one calibrates again')
    if os.path.isfile(tmp):
      os.remove(tmp)
  return scales
