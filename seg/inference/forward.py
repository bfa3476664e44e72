"""The network's forward pass on folded weights (`seg.inference.fold`): what inference runs.

It re-expresses the trained model's function for speed, without changing it:
- 1x1 convolutions are `dot_general` over the channel axis of NHWC tensors (a [pixels, in] x
  [in, out] matrix product); depthwise 3x3 convolutions are nine shifted multiply-adds (XLA's
  grouped convolution is far slower on the CPU, `seg/model/layers.py`).
- The image-pooling branch is constant over space, so its share of the concat projection is
  one [batch, 256] vector added as a bias, instead of a 256-channel map concatenated and
  multiplied at every pixel.
- `dtype=jnp.bfloat16` computes the layers from the stride-16 features on (the products with
  hundreds of channels, compute-bound) with bfloat16 inputs and float32 accumulation
  (`preferred_element_type`); biases, activations, depthwise taps and logits are float32. On
  a CPU the high-resolution layers stay float32: they are memory-bound, and conversions made
  them slower; on accelerators every layer after the stem is bfloat16
  (`low_precision_from_stride`).
- Folded params with packed weights (`seg.inference.float_kernel.pack_folded`, the CPU's
  'kernel' formulation of float32 and bfloat16) run the products in the project's kernel
  instead, in the packed weights' precision: activations stay float32 in memory (bfloat16
  weights: rounded to bfloat16 inside the kernel, from `low_precision_from_stride(True)`
  on), with bias, activation and residual sum in its output loop; the stem and the
  depthwise layers run in its float32 loops (with their ReLU6), the head's pooling and the
  resizing in XLA's float32. `class_map` can take the resize and the argmax to the kernel
  too (`upsample_argmax='kernel'`, the engine's choice on x86 CPUs), in any dtype.

`forward` is a pure function of (folded params, images), so it can be jitted, pmapped
(`seg.inference.evaluate`) or exported (`seg.inference.export`).
"""

import functools
import math
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from seg.model import block_specs
from seg.model.layers import (depthwise_form, grouped_depthwise_conv, resize_bilinear,
                              same_padding)
from seg.preprocessing import preprocess_padded


LOW_PRECISION_FROM_STRIDES = (2, 4, 8, 16)


# The bfloat16 kernel runs an expansion and its depthwise layer in one pass where the
# expansion's output has at least this many elements per image (blocks 1-3 at 513x513; by
# measurement, docs/performance.md "bfloat16": 2.6x as fast for block 1, slower at 33x33).
FUSE_FROM_ELEMENTS = 2 * 2**20
# From which stride on the CPU's bfloat16 kernel ('kernel' formulation) runs the products
# when SEG_BF16_FROM_STRIDE is auto (docs/performance.md, "bfloat16").
KERNEL_FROM_STRIDE = 2


def low_precision_from_stride(kernel: bool = False) -> int:
  """From which input stride on `forward(dtype=bfloat16)` computes in bfloat16.

  The environment variable SEG_BF16_FROM_STRIDE chooses (2, 4, 8 or 16; 2 means every layer
  after the stem); unset or 'auto': on a CPU 16 (measured: the high-resolution layers are
  memory-bound there and the conversions cost more than they save, docs/performance.md),
  or `KERNEL_FROM_STRIDE` with the bfloat16 kernel (`kernel`: no conversion passes); 2 on
  accelerators (half the bytes of every layer; not measured yet: `benchmarks/gpu_check.py`
  times both). Read when a function is traced.
  """
  value = os.environ.get('SEG_BF16_FROM_STRIDE', 'auto') or 'auto'
  if value == 'auto':
    if jax.default_backend() != 'cpu':
      return 2
    return KERNEL_FROM_STRIDE if kernel else 16
  if not value.isdigit() or int(value) not in LOW_PRECISION_FROM_STRIDES:
    raise ValueError(f'SEG_BF16_FROM_STRIDE must be auto or one of '
                     f'{LOW_PRECISION_FROM_STRIDES}, got {value!r}')
  return int(value)


def _pointwise(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """1x1 convolution + bias: x [n, h, w, in] (dtype), w [in, out] -> [n, h, w, out] float32."""
  y = lax.dot_general(x, w.astype(x.dtype), (((3,), (0,)), ((), ())),
                      preferred_element_type=jnp.float32)
  return y + b


def _in_kernel(layer: Dict[str, Any], low: bool) -> bool:
  """Whether a 1x1 layer runs in the kernel: it has packed weights ('wp'), float32 ones (the
  float32 kernel: every product) or bfloat16 ones where the layer is `low` precision."""
  return 'wp' in layer and (low or layer['wp'].dtype == jnp.float32)


def _product(x: jax.Array, layer: Dict[str, Any], act: str = 'linear', low: bool = False,
             residual: Optional[jax.Array] = None) -> jax.Array:
  """act(1x1 convolution + bias) (+ residual), float32: in the kernel (`_in_kernel`), else
  `_pointwise` in x's dtype."""
  if _in_kernel(layer, low):
    from seg.inference import float_kernel
    return float_kernel.product(x, layer['wp'], layer['b'], mode=act, residual=residual)
  y = _pointwise(x, layer['w'], layer['b'])
  y = {'linear': y, 'relu6': _relu6(y), 'relu': jax.nn.relu(y)}[act]
  return y if residual is None else y + residual.astype(jnp.float32)


def _bf16_handoff(project: Dict[str, Any], low: bool) -> bool:
  """Whether the depthwise layer (or stem pass) before `project` writes its output as
  bfloat16: where the projection runs in the bfloat16 kernel, which rounds its input to
  bfloat16 anyway (to nearest even, as the depthwise loop rounds its output), so the numbers
  are the same and half the bytes go through memory. SEG_BF16_HANDOFF=float32 keeps float32
  hand-offs (A/B timings; read when traced)."""
  from seg.inference import float_kernel
  choice = os.environ.get('SEG_BF16_HANDOFF', 'bfloat16') or 'bfloat16'
  if choice not in ('bfloat16', 'float32'):
    raise ValueError(f'SEG_BF16_HANDOFF must be bfloat16 or float32, got {choice!r}')
  return (choice == 'bfloat16' and _in_kernel(project, low) and
          project['wp'].dtype == jnp.uint16 and float_kernel.f32_isa() == 'avx512')


def _depthwise_project_apart() -> bool:
  """SEG_DEPTHWISE_PROJECT=two: the kernel's depthwise layers and projections as two calls
  each, for A/B timings (default one: `float_kernel.depthwise_project`; read when traced)."""
  choice = os.environ.get('SEG_DEPTHWISE_PROJECT', 'one') or 'one'
  if choice not in ('one', 'two'):
    raise ValueError(f'SEG_DEPTHWISE_PROJECT must be one or two, got {choice!r}')
  return choice == 'two'


def _block(x: jax.Array, block: Dict[str, Any], stride: int, dilation: int, low: bool,
           kernel: bool, stored, residual: Optional[jax.Array]) -> jax.Array:
  """A block after the stem: its expansion (if any; bfloat16 inputs where `low`), depthwise
  layer (ReLU6s, stored as `stored`) and projection (+ `residual`), float32 out. With the
  kernel (`kernel`) the depthwise layer runs in its float32 loop: in one pass with the
  projection where that is in the kernel (`float_kernel.depthwise_project`), and with a
  large expansion too (`FUSE_FROM_ELEMENTS`); apart (SEG_DEPTHWISE_PROJECT=two, or a
  projection left to XLA) handing it bfloat16 where it takes it so (`_bf16_handoff`)."""
  expand, depthwise, project = block.get('expand'), block['depthwise'], block['project']
  if kernel:
    from seg.inference import float_kernel
  if not (kernel and (stride, dilation) in float_kernel.DEPTHWISE_STRIDES and
          float_kernel.depthwise_supported(depthwise['b'].shape[0])):
    y = x if expand is None else _product(x, expand, 'relu6', low).astype(stored)
    y = _relu6(_depthwise(y, depthwise['w'], depthwise['b'], stride, dilation)).astype(stored)
    return _product(y, project, 'linear', low, residual=residual)
  out_dtype = jnp.bfloat16 if _bf16_handoff(project, low) else jnp.float32
  one_pass = _in_kernel(project, low) and not _depthwise_project_apart()
  if expand is not None and _in_kernel(expand, low) and (
      x.shape[1] * x.shape[2] * expand['b'].shape[0] >= FUSE_FROM_ELEMENTS):
    # One pass: the expansion's output stays in the core's cache (and the depthwise
    # layer's, with the projection).
    if one_pass:
      return float_kernel.expand_depthwise(x, expand['wp'], expand['b'], depthwise['w'],
                                           depthwise['b'], stride, dilation,
                                           project=(project['wp'], project['b']),
                                           residual=residual)
    y = float_kernel.expand_depthwise(x, expand['wp'], expand['b'], depthwise['w'],
                                      depthwise['b'], stride, dilation, out_dtype=out_dtype)
    return _product(y, project, 'linear', low, residual=residual)
  y = x if expand is None else _product(x, expand, 'relu6', low)
  if one_pass:
    return float_kernel.depthwise_project(y, depthwise['w'], depthwise['b'], stride, dilation,
                                          project['wp'], project['b'], residual=residual)
  y = float_kernel.depthwise(y, depthwise['w'], depthwise['b'], stride, dilation,
                             out_dtype=out_dtype)
  return _product(y, project, 'linear', low, residual=residual)


def _choice(variable: str, choices: Tuple[str, ...]) -> str:
  """The value of environment variable `variable`, one of `choices` (unset or empty: the
  first); read when a function is traced, so A/B timings can trace one setting, then
  another."""
  choice = os.environ.get(variable, choices[0]) or choices[0]
  if choice not in choices:
    raise ValueError(f'{variable} must be one of {", ".join(choices)}, got {choice!r}')
  return choice


HEAD_POOL_CHOICES = ('kernel', 'xla')


def head_pool_choice() -> str:
  """SEG_HEAD_POOL: 'kernel' (unset: the float engines' image pooling in the kernel for one
  image, `_pool_in_kernel`) or 'xla' (XLA's pooling, for A/B timings)."""
  return _choice('SEG_HEAD_POOL', HEAD_POOL_CHOICES)


def _pool_in_kernel(head: Dict[str, Any], x: jax.Array, low: bool) -> bool:
  """Whether the head's image pooling runs in the kernel (`float_kernel.mean`, then its two
  products, the second giving the concat projection's bias): with packed weights whose
  products run there, for one image at a time (n = 1: the engine's batches on a CPU, image
  by image), since the pooled term differs between images. A network of kernels then has
  no XLA arithmetic left, and XLA's CPU client runs it inline on the calling thread instead
  of dispatching it to another (docs/performance.md). SEG_HEAD_POOL=xla keeps XLA's mean and
  products (A/B timings; `head_pool_choice`)."""
  return (head_pool_choice() == 'kernel' and x.shape[0] == 1 and 'proj_pool_wp' in head and
          _in_kernel(head['pool'], low) and head['pool']['wp'].dtype ==
          head['proj_pool_wp'].dtype)


STEM_CHOICES = ('kernel', 'pass', 'xla')


PIXEL_CHOICES = ('kernel', 'xla')


def pixels_in_kernel() -> bool:
  """Whether the kernels' stem passes read uint8 pixels and preprocess them as they read
  (`forward`'s `sizes`; the same numbers as XLA's `preprocess_padded` fused in a program),
  so that no float32 copy of the image goes through memory. SEG_PIXELS=xla preprocesses in
  XLA first (A/B timings)."""
  return _choice('SEG_PIXELS', PIXEL_CHOICES) == 'kernel'


def preprocessed(images: jax.Array, sizes: Optional[jax.Array]) -> jax.Array:
  """`forward`'s images as float32 in [-1, 1]: uint8 pixels through `preprocess_padded`
  (with their `sizes`), preprocessed ones as they are."""
  if images.dtype == jnp.uint8:
    return preprocess_padded(images, sizes)
  if sizes is not None:
    raise ValueError('sizes go with uint8 pixels; preprocessed images carry their padding')
  return images


def _kernel_stem_pass(folded: Dict[str, Any], images: jax.Array, low: bool,
                      sizes: Optional[jax.Array] = None) -> Tuple[Optional[jax.Array], bool]:
  """(y, projected): the kernel's stem pass over the stem and block 0's depthwise layer, or
  None where it does not apply (block 0 with an expansion, or whose projection adds the
  stem's output back (equal channels), or channels the pass does not take). `projected`:
  y is block 0's projection already, the stem pass and the projection in one pass
  (`float_kernel.stem_project`) where the projection runs in the kernel (`low`: its
  precision); else y is the depthwise output (bfloat16 where the projection takes it so,
  `_bf16_handoff`). SEG_FLOAT_STEM chooses, for A/B timings (read when traced): 'kernel'
  (the default, as above), 'pass' (the stem pass and the projection apart) or 'xla' (XLA's
  stem, the kernel's depthwise layer). uint8 `images` (and their `sizes`): the pass reads
  the pixels (`pixels_in_kernel`), else XLA preprocesses them for it."""
  from seg.inference import float_kernel
  stem, block0 = folded['stem'], folded['blocks'][0]
  choice = _choice('SEG_FLOAT_STEM', STEM_CHOICES)
  c = stem['w'].shape[-1]
  if (choice == 'xla' or 'expand' in block0 or c == block0['project']['w'].shape[-1] or
      not float_kernel.stem_supported(images.shape, stem['w'].shape)):
    return None, False
  project = block0['project']
  if images.dtype != jnp.uint8 or not pixels_in_kernel():
    images, sizes = preprocessed(images, sizes), None
  args = (images, stem['w'], stem['b'], block0['depthwise']['w'], block0['depthwise']['b'])
  if choice == 'kernel' and _in_kernel(project, low) and (
      project['wp'].dtype == jnp.float32 or c % 16 == 0):
    return float_kernel.stem_project(*args, project['wp'], project['b'], sizes=sizes), True
  bf16 = _bf16_handoff(project, low) and c % 16 == 0
  return float_kernel.stem(*args, out_dtype=jnp.bfloat16 if bf16 else jnp.float32,
                           sizes=sizes), False


def _depthwise(x: jax.Array, w: jax.Array, b: jax.Array, stride: int,
               dilation: int, form: Optional[str] = None) -> jax.Array:
  """3x3 depthwise 'SAME' conv + bias, float32 result, written as `form`
  (default `seg.model.layers.depthwise_form()`).

  'shifted': shifted multiply-adds computed in float32 (XLA's CPU code for bfloat16
  elementwise arithmetic is slower than for float32); 'grouped': one grouped convolution
  in x's dtype with float32 accumulation.
  x: [n, h, w, c]; w: [3, 3, c]. Returns float32 [n, ceil(h / s), ceil(w / s), c].
  """
  if (form or depthwise_form()) == 'grouped':
    return grouped_depthwise_conv(x, w.astype(x.dtype), stride, dilation,
                                  preferred_element_type=jnp.float32) + b
  kh, kw = w.shape[:2]
  n, h, wd, c = x.shape
  pad_h = same_padding(h, kh, stride, dilation)
  pad_w = same_padding(wd, kw, stride, dilation)
  xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
  # Materialise the padded input: fused into the taps, the pad becomes a bounds check per
  # element that keeps XLA from vectorising the multiply-adds.
  xp = lax.optimization_barrier(xp)
  out_h, out_w = -(-h // stride), -(-wd // stride)
  out = None
  for i in range(kh):
    for j in range(kw):
      tap = lax.slice(xp, (0, i * dilation, j * dilation, 0),
                      (n, i * dilation + (out_h - 1) * stride + 1,
                       j * dilation + (out_w - 1) * stride + 1, c),
                      (1, stride, stride, 1))
      term = tap.astype(jnp.float32) * w[i, j].astype(jnp.float32)
      out = term if out is None else out + term
  return out + b


def _conv(x: jax.Array, w: jax.Array, b: jax.Array, stride: int = 1,
          dilation: int = 1) -> jax.Array:
  """Dense kxk 'SAME' convolution + bias, float32 result."""
  pads = (same_padding(x.shape[1], w.shape[0], stride, dilation),
          same_padding(x.shape[2], w.shape[1], stride, dilation))
  y = lax.conv_general_dilated(x, w.astype(x.dtype), (stride, stride), pads,
                               rhs_dilation=(dilation, dilation),
                               dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                               preferred_element_type=jnp.float32)
  return y + b


def _stem(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """The 3x3 stride-2 'SAME' stem conv on 3 channels as 27 broadcast multiply-adds.

  XLA's CPU convolution with 3 input channels uses the vector units poorly; as one
  elementwise fusion it is several times faster (docs/performance.md).
  x: [n, h, w, 3]; w: [3, 3, 3, c].
  """
  n, h, wd, _ = x.shape
  xp = jnp.pad(x, ((0, 0), same_padding(h, 3, 2, 1), same_padding(wd, 3, 2, 1), (0, 0)))
  out_h, out_w = -(-h // 2), -(-wd // 2)
  out = None
  for i in range(3):
    for j in range(3):
      tap = lax.slice(xp, (0, i, j, 0), (n, i + 2 * out_h - 1, j + 2 * out_w - 1, 3), (1, 2, 2, 1))
      for c in range(3):
        term = tap[..., c:c + 1].astype(jnp.float32) * w[i, j, c].astype(jnp.float32)
        out = term if out is None else out + term
  return out + b


def _relu6(x):
  return jnp.clip(x, 0.0, 6.0)


def forward(folded: Dict[str, Any], images: jax.Array, *, width: float, output_stride: int,
            dtype=jnp.float32, upsample: bool = True, image_by_image: bool = False,
            sizes: Optional[jax.Array] = None) -> jax.Array:
  """The network's logits from the folded weights (`fold_variables` then `cast_folded`).

  Args:
    images: [n, h, w, 3] float in [-1, 1] (already preprocessed; padding is 0), or uint8
      pixels on a canvas with `sizes` ([n, 2] int32: each image's valid rows and columns;
      None: all), which `preprocess_padded` turns into that: the kernel's stem pass reads
      them as they are where it runs (`pixels_in_kernel`), XLA preprocesses them elsewhere.
    width, output_stride: `config.model`'s (they fix strides and dilations).
    dtype: the input dtype of the stride >= 16 products (float32 or bfloat16), or int8:
      `folded` then comes from `seg.inference.quantize.quantize_folded`.
    upsample: resize the logits to [h, w] (aligned corners) as the model does.
    image_by_image: run the images of the batch one after the other (`lax.map`):
      the activations of one image instead of n are live (a fraction of the memory).

  Returns:
    float32 logits [n, h, w, classes] (or at the feature resolution).
  """
  if dtype == jnp.int8:  # params from `seg.inference.quantize.quantize_folded`
    from seg.inference.quantize import forward_int8
    return forward_int8(folded, images, width=width, output_stride=output_stride,
                        upsample=upsample, image_by_image=image_by_image, sizes=sizes)
  # Packed weights: the kernel formulation (float32 or bfloat16, as they are packed).
  kernel = 'wp' in folded['blocks'][0]['project']
  if images.dtype == jnp.uint8 and not (kernel and pixels_in_kernel()):
    images, sizes = preprocessed(images, sizes), None  # the whole batch, in XLA
  if image_by_image and images.shape[0] > 1:
    one = functools.partial(forward, folded, width=width, output_stride=output_stride,
                            dtype=dtype, upsample=upsample)
    if sizes is None:
      return lax.map(lambda image: one(image[None])[0], images)
    return lax.map(lambda each: one(each[0][None], sizes=each[1][None])[0], (images, sizes))
  # With the kernel the stem and block 0's depthwise layer are one pass (`stem0`,
  # where block 0 has no expansion or residual sum to read the stem's output).
  compute_dtype, input_stride = dtype, 2
  first_low = min(low_precision_from_stride(kernel), output_stride)
  stem0, projected = (_kernel_stem_pass(folded, images,
                                         low=dtype != jnp.float32 and first_low <= 2,
                                         sizes=sizes)
                       if kernel else (None, False))
  if stem0 is None:
    images = preprocessed(images, sizes)
  x = None if stem0 is not None else _relu6(_stem(images, folded['stem']['w'],
                                                  folded['stem']['b']))
  # A low-precision dtype from `low_precision_from_stride()` on (or the output stride, if
  # smaller). On a CPU that is 16: there the products have hundreds of channels and
  # bfloat16 doubles their speed, while the high-resolution layers are memory-bound and the
  # float32 <-> bfloat16 conversions cost more than they save (docs/performance.md). With
  # the bfloat16 kernel (packed weights) activations stay float32 (`stored`) and the
  # kernel rounds a product's inputs as it reads them (the depthwise layers hand them
  # bfloat16: `_bf16_handoff`).
  # Strides and dilations from the architecture; channel counts from the weights (they
  # depend on model.divisible_by too).
  for block, (_, _, stride, dilation) in zip(folded['blocks'], block_specs(width, output_stride)):
    dtype = compute_dtype if input_stride >= first_low else jnp.float32
    low = dtype != jnp.float32
    stored = jnp.float32 if kernel else dtype
    input_stride *= stride
    if x is None and projected:  # block 0 in the stem pass, its projection too
      x = stem0
      continue
    if x is None:  # block 0 after the stem pass
      x = _product(stem0, block['project'], 'linear', low).astype(stored)
      continue
    x = x.astype(stored)
    residual = stride == 1 and x.shape[-1] == block['project']['w'].shape[-1]
    x = _block(x, block, stride, dilation, low, kernel, stored,
               x if residual else None).astype(stored)

  dtype = compute_dtype
  stored = jnp.float32 if kernel else dtype
  x = x.astype(stored)
  head = folded['head']
  low = dtype != jnp.float32
  pool_in_kernel = _pool_in_kernel(head, x, low)
  if not pool_in_kernel:
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # [n, c]
    pooled = jax.nn.relu(pooled.astype(dtype) @ head['pool']['w'].astype(dtype)
                         + head['pool']['b'])
    pooled_term = lax.dot_general(pooled.astype(dtype), head['proj_pool'].astype(dtype),
                                  (((1,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)  # [n, 256]
  branches = [_product(x, head['aspp0'], 'relu', low)]
  rates = tuple(r * 16 // output_stride for r in (6, 12, 18))
  for i, rate in enumerate(rates, start=1):
    if f'aspp{i}' in head:
      branches.append(jax.nn.relu(_conv(x, head[f'aspp{i}']['w'], head[f'aspp{i}']['b'],
                                        dilation=rate)))
  y = jnp.concatenate(branches, axis=-1).astype(stored) if len(branches) > 1 else \
      branches[0].astype(stored)
  projection = {'w': head['proj_branches'], 'b': head['proj_b']}
  if 'proj_branches_wp' in head:
    projection['wp'] = head['proj_branches_wp']
  if pool_in_kernel:
    # The image pooling's share of the projection, a vector for the one image, joins the
    # projection's bias; the ReLU runs in the projection's output loop.
    from seg.inference import float_kernel
    pooled = _product(float_kernel.mean(x), head['pool'], 'relu', low)  # [1, 256]
    bias = float_kernel.product(pooled, head['proj_pool_wp'], head['proj_b'])[0]
    y = _product(y, dict(projection, b=bias), 'relu', low).astype(stored)
  else:
    y = _product(y, projection, 'linear', low)
    y = jax.nn.relu(y + pooled_term[:, None, None, :]).astype(stored)
  logits = _product(y, head['logits'], 'linear', low)
  if upsample:
    logits = resize_bilinear(logits, images.shape[1:3])
  return logits


def scaled_size(size: int, scale: float, stride: int = 16) -> int:
  """The side of a `size`-pixel side at `scale`: (size - 1) * scale rounded to a multiple of
  `stride` (the output stride), plus 1, so that the feature grid's corners lie on the scaled
  image's corners as they do on a k * stride + 1 canvas (`resize_bilinear` takes the logits
  back assuming they do).

  DeepLab's `scale_dimension`, int((size - 1) * scale + 1), is the same size for its 513
  canvas and scales in steps of 0.25; on other canvases it is off the grid by up to
  stride / 2 pixels (the quickstart's 161 at 1.25: 201, not 209), which cost its model 16.9
  points at that scale (docs/training.md, "Evaluation").
  """
  cells = max(1, math.floor((size - 1) * scale / stride + 0.5))
  return cells * stride + 1


def is_multi_scale(scales, flip: bool) -> bool:
  """Whether (`scales`, `flip`) asks for more than the one plain pass."""
  return tuple(float(s) for s in scales) != (1.0,) or bool(flip)


def chosen_passes(evaluation, scales: Optional[Sequence[float]] = None,
                  flip: Optional[bool] = None) -> Tuple[Tuple[float, ...], bool]:
  """(scales, flip) of an inference: those given, else the config's (`evaluation`:
  `config.eval`), so that `predict` and the export give the masks `eval` scores."""
  scales = evaluation.scales if scales is None else scales
  flip = evaluation.flip if flip is None else flip
  return tuple(float(s) for s in scales), bool(flip)


def describe_passes(scales: Sequence[float], flip: bool) -> str:
  """'multi-scale inference: scales 0.75, 1, 1.25 and their flips, 6 passes per image, ...'
  for the log."""
  passes = len(scales) * (2 if flip else 1)
  listed = ', '.join(f'{s:g}' for s in scales)
  return (f'multi-scale inference: scale{"s" if len(scales) > 1 else ""} {listed}'
          f'{" and their flips" if flip else ""}, {passes} passes per image, softmax averaged '
          f'(--scales 1 --no-flip: one pass)')


def multi_scale_logits(folded, images: jax.Array, *, width: float, output_stride: int,
                       scales=(1.0,), flip: bool = False, dtype=jnp.float32,
                       image_by_image: bool = False) -> jax.Array:
  """Class scores at full resolution, averaged over input scales (and flips) as DeepLab does.

  For one scale without flip these are the network's logits. Otherwise each
  scale s runs the network on the image resized (aligned corners) to
  `scaled_size(h, s) x scaled_size(w, s)` (on the output stride's grid), resizes its logits
  straight to [h, w], and the softmax probabilities of every scale (and of every flipped
  image, flipped back) are averaged: the "MF" rows of DeepLab's papers. A padded canvas is
  scaled and flipped whole, padding included: `eval` and `predict` agree.

  Args:
    images: [n, h, w, 3] in [-1, 1] (padding already 0).
    width, output_stride, dtype, image_by_image: `forward`'s.

  Returns:
    [n, h, w, classes] float32: logits, or averaged probabilities.
  """
  height, image_width = images.shape[1:3]
  run = functools.partial(forward, folded, width=width, output_stride=output_stride,
                          upsample=False, dtype=dtype, image_by_image=image_by_image)
  if not is_multi_scale(scales, flip):
    return resize_bilinear(run(images), (height, image_width))
  probabilities = 0.0
  for scale in scales:
    size = (scaled_size(height, scale, output_stride),
            scaled_size(image_width, scale, output_stride))
    scaled = images if size == (height, image_width) else resize_bilinear(images, size)
    variants = [(scaled, False)] + ([(scaled[:, :, ::-1], True)] if flip else [])
    for x, flipped in variants:
      p = jax.nn.softmax(resize_bilinear(run(x), (height, image_width)), axis=-1)
      probabilities = probabilities + (p[:, :, ::-1] if flipped else p)
  return probabilities / (len(scales) * (2 if flip else 1))


UPSAMPLE_ARGMAX = ('xla', 'kernel')


def class_map(folded, images: jax.Array, sizes: Optional[jax.Array], *, width: float,
              output_stride: int, dtype=jnp.float32, image_by_image: bool = False,
              upsample_argmax: str = 'xla') -> jax.Array:
  """uint8 images [n, h, w, 3] (+ valid sizes [n, 2]) -> class ids [n, h, w] uint8.

  The whole prediction function: preprocessing, padding, network, argmax.
  `upsample_argmax`: how the logits reach the image's size and their argmax: 'xla' (the
  model's `resize_bilinear`, then argmax) or 'kernel' (the CPU kernel's
  `float_kernel.upsampled_argmax`: the same rule, row by row, without the upsampled logits in
  memory; a class may differ from XLA's only where two classes tie to a rounding).
  """
  if upsample_argmax not in UPSAMPLE_ARGMAX:
    raise ValueError(f'upsample_argmax must be one of {UPSAMPLE_ARGMAX}, got '
                     f'{upsample_argmax!r}')
  kernel = upsample_argmax == 'kernel'
  if images.dtype != jnp.uint8:  # float pixels in [0, 255]: XLA's preprocessing
    images, sizes = preprocess_padded(images, sizes), None
  logits = forward(folded, images, width=width, output_stride=output_stride, dtype=dtype,
                   image_by_image=image_by_image, upsample=not kernel, sizes=sizes)
  if kernel:
    from seg.inference import float_kernel
    return float_kernel.upsampled_argmax(logits, *images.shape[1:3])
  return jnp.argmax(logits, axis=-1).astype(jnp.uint8)


# ----------------------------------------------------------------------------------------------
