"""The inference engine: the trained network folded for speed, compiled ahead of time.

One engine serves `eval`, `predict`, `benchmark` and `export`. It does not
change the trained model; it re-expresses the same function for inference:

- BatchNorm (running statistics) is folded into the preceding convolution's
  kernel and a bias, so every layer is one convolution + bias (+ ReLU6/ReLU).
- 1x1 convolutions are `dot_general` over the channel axis of NHWC tensors
  (a [pixels, in] x [in, out] matrix product); depthwise 3x3 convolutions
  are nine shifted multiply-adds (XLA's grouped convolution is ~100 times
  slower on the CPU, `seg/layers.py`).
- The image-pooling branch is constant over space, so its share of the
  concat projection is one [batch, 256] vector added as a bias, instead of a
  256-channel map concatenated and multiplied at every pixel.
- `dtype=jnp.bfloat16` computes the layers from the stride-16 features on
  (the products with hundreds of channels, compute-bound) with bfloat16
  inputs and float32 accumulation (`preferred_element_type`); biases,
  activations, depthwise taps and logits are float32. The high-resolution
  layers stay float32: they are memory-bound, and conversions made them slower.

The folded forward pass is a pure function of (folded params, images), so it
can be jitted, pmapped (`seg.evaluate`), or exported (`seg.export`).

Shape policy (shared with `seg.predict` and evaluation): an image is padded
with the mean pixel at its bottom and right to `eval_size` square, or, when a
side is larger, to the next size of the form k * 64 + 1 (`bucket_shape`).
`Engine` compiles one executable per (batch size, padded shape, dtype), ahead
of time, and JAX's persistent compilation cache (set up by `main.py`) keeps
them across runs.
"""

import functools
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from seg.layers import _align_corners_matrix, same_padding
from seg.model import HEAD_CHANNELS, MEAN_PIXEL, block_specs

BUCKET = 64  # larger images are padded up to a multiple of this (+1)
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def bucket_shape(height: int, width: int, eval_size: int) -> Tuple[int, int]:
  """The padded input shape for an image: eval_size square, or the next bucket.

  Sizes of the form k * 64 + 1 keep the aligned-corner resizes on the output
  stride grid and bound the number of compiled shapes.
  """
  if height < 1 or width < 1:
    raise ValueError(f'empty image ({height}x{width})')
  if max(height, width) <= eval_size:
    return eval_size, eval_size
  up = lambda n: -(-(n - 1) // BUCKET) * BUCKET + 1
  return max(up(height), eval_size), max(up(width), eval_size)


# ----------------------------------------------------------------------------------------------
# Folding the trained variables.


def _fold(conv: Dict[str, Any], bn: Dict[str, Any], stats: Dict[str, Any], epsilon: float,
          xp=jnp) -> Tuple[Any, Any]:
  """Conv kernel [kh, kw, in, out] + inference BatchNorm -> (kernel * s, beta - mean * s).

  s = gamma / sqrt(var + eps), what `nn.BatchNorm(use_running_average=True)`
  multiplies by. `xp` is jnp (inside jit/pmap: `seg.evaluate`) or np (on the
  host: no dispatch of dozens of tiny eager ops, each compiled once).
  """
  f32 = lambda x: xp.asarray(x, xp.float32)
  scale = f32(bn['scale']) / xp.sqrt(f32(stats['var']) + xp.float32(epsilon))
  bias = f32(bn['bias']) - f32(stats['mean']) * scale
  return f32(conv['kernel']) * scale, bias


def fold_variables(model_config, variables: Dict[str, Any], xp=jnp) -> Dict[str, Any]:
  """The model's {'params', 'batch_stats'} as folded inference weights (float32).

  `xp`: jnp (traceable, for use inside jit/pmap) or np (host arrays, no compiling).

  Returns a pytree:
    stem: {w [3, 3, 3, c], b [c]}
    blocks: list of {expand: {w [in, e], b [e]} (absent at t=1), depthwise:
      {w [3, 3, e], b [e]}, project: {w [e, out], b [out]}}
    head: {pool, aspp0, (aspp1-3 [3, 3, c, 256]), proj_pool [256, 256],
      proj_branches [256 * branches, 256], proj_b, logits}
  """
  params, stats = variables['params'], variables['batch_stats']
  enc_p, enc_s = params['MobilenetV2'], stats['MobilenetV2']
  eps_b, eps_h = model_config.backbone_bn_epsilon, model_config.head_bn_epsilon

  def conv_bn(p, s, name, eps, inner='conv'):
    w, b = _fold(p[name][inner], p[name]['BatchNorm'], s[name]['BatchNorm'], eps, xp)
    return w, b

  w, b = conv_bn(enc_p, enc_s, 'Conv', eps_b)
  folded = {'stem': {'w': w, 'b': b}, 'blocks': []}
  for i in range(len(block_specs(model_config.width, model_config.output_stride))):
    name = 'expanded_conv' if i == 0 else f'expanded_conv_{i}'
    p, s = enc_p[name], enc_s[name]
    block = {}
    if 'expand' in p:
      w, b = conv_bn(p, s, 'expand', eps_b)
      block['expand'] = {'w': w[0, 0], 'b': b}
    w, b = conv_bn(p, s, 'depthwise', eps_b, inner='depthwise')
    block['depthwise'] = {'w': w[:, :, 0], 'b': b}
    w, b = conv_bn(p, s, 'project', eps_b)
    block['project'] = {'w': w[0, 0], 'b': b}
    folded['blocks'].append(block)

  hp, hs = params['head'], stats['head']
  head = {}
  w, b = conv_bn(hp, hs, 'image_pooling', eps_h)
  head['pool'] = {'w': w[0, 0], 'b': b}
  w, b = conv_bn(hp, hs, 'aspp0', eps_h)
  head['aspp0'] = {'w': w[0, 0], 'b': b}
  for i in (1, 2, 3):
    if f'aspp{i}' in hp:
      w, b = conv_bn(hp, hs, f'aspp{i}', eps_h)
      head[f'aspp{i}'] = {'w': w, 'b': b}
  w, b = conv_bn(hp, hs, 'concat_projection', eps_h)
  w = w[0, 0]
  # The concat is [pooled, aspp0, aspp1, ...]: split the projection by input rows.
  head['proj_pool'] = w[:HEAD_CHANNELS]
  head['proj_branches'] = w[HEAD_CHANNELS:]
  head['proj_b'] = b
  head['logits'] = {'w': xp.asarray(hp['logits']['kernel'], xp.float32)[0, 0],
                    'b': xp.asarray(hp['logits']['bias'], xp.float32)}
  folded['head'] = head
  return folded


def cast_folded(folded: Dict[str, Any], dtype, xp=jnp) -> Dict[str, Any]:
  """1x1 kernels in `dtype` (what the products read); the rest stays float32.

  Depthwise, stem and 3x3 kernels and all biases feed float32 arithmetic: kept
  float32, they need no conversion op per tap at run time.
  """
  def cast(path, x):
    matrix = path[-1].key in ('w', 'proj_pool', 'proj_branches') and x.ndim == 2
    return xp.asarray(x, dtype if matrix else xp.float32)
  return jax.tree_util.tree_map_with_path(cast, folded)


# ----------------------------------------------------------------------------------------------
# The folded forward pass.


def _pointwise(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """1x1 convolution + bias: x [n, h, w, in] (dtype), w [in, out] -> [n, h, w, out] float32."""
  y = lax.dot_general(x, w.astype(x.dtype), (((3,), (0,)), ((), ())),
                      preferred_element_type=jnp.float32)
  return y + b


def _depthwise(x: jax.Array, w: jax.Array, b: jax.Array, stride: int,
               dilation: int) -> jax.Array:
  """3x3 depthwise 'SAME' conv + bias as shifted multiply-adds, computed in float32.

  (XLA's CPU code for bfloat16 arithmetic ran these ~2x slower than float32.)
  x: [n, h, w, c]; w: [3, 3, c]. Returns float32 [n, ceil(h / s), ceil(w / s), c].
  """
  kh, kw = w.shape[:2]
  n, h, wd, c = x.shape
  pad_h = same_padding(h, kh, stride, dilation)
  pad_w = same_padding(wd, kw, stride, dilation)
  xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
  # Materialise the padded input: fused into the taps, the pad becomes a bounds check per
  # element that keeps XLA from vectorising the multiply-adds (3x slower at 257x257x32).
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

  XLA's CPU convolution with 3 input channels ran at ~5 GMAdd/s; as one
  elementwise fusion this is 2-4 times faster. x: [n, h, w, 3]; w: [3, 3, 3, c].
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
            dtype=jnp.float32, upsample: bool = True, image_by_image: bool = False) -> jax.Array:
  """The network's logits from the folded weights (`fold_variables` then `cast_folded`).

  Args:
    images: [n, h, w, 3] float in [-1, 1] (already preprocessed; padding is 0).
    width, output_stride: `config.model`'s (they fix strides and dilations).
    dtype: the input dtype of the stride >= 16 products (float32 or bfloat16).
    upsample: resize the logits to [h, w] (aligned corners) as the model does.
    image_by_image: run the images of the batch one after the other (`lax.map`):
      the activations of one image instead of n are live (compiled temp memory at
      batch 8, 513x513: 73 instead of 390 MiB).

  Returns:
    float32 logits [n, h, w, classes] (or at the feature resolution).
  """
  if image_by_image and images.shape[0] > 1:
    one = functools.partial(forward, folded, width=width, output_stride=output_stride,
                            dtype=dtype, upsample=upsample)
    return lax.map(lambda image: one(image[None])[0], images)
  x = _relu6(_stem(images, folded['stem']['w'], folded['stem']['b']))
  # A low-precision dtype only from the stride-16 features on (or the output stride, if
  # smaller): there the products have hundreds of channels and bfloat16 doubles their
  # speed, while the high-resolution layers are memory-bound and the float32 <-> bfloat16
  # conversions made them slower (513x513: 44.9 ms all-bf16, 33.8 ms stride >= 16 only,
  # 43.8 ms float32; README).
  compute_dtype, input_stride = dtype, 2
  for block, (expanded, out, stride, dilation) in zip(folded['blocks'],
                                                      block_specs(width, output_stride)):
    dtype = compute_dtype if input_stride >= min(16, output_stride) else jnp.float32
    input_stride *= stride
    x = x.astype(dtype)
    residual = stride == 1 and x.shape[-1] == out
    inputs = x
    y = x
    if 'expand' in block:
      y = _relu6(_pointwise(y, block['expand']['w'], block['expand']['b'])).astype(dtype)
    y = _relu6(_depthwise(y, block['depthwise']['w'], block['depthwise']['b'], stride,
                          dilation)).astype(dtype)
    y = _pointwise(y, block['project']['w'], block['project']['b'])
    if residual:
      y = y + inputs.astype(jnp.float32)
    x = y.astype(dtype)

  dtype = compute_dtype
  x = x.astype(dtype)
  head = folded['head']
  pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # [n, c]
  pooled = jax.nn.relu(pooled.astype(dtype) @ head['pool']['w'].astype(dtype)
                       + head['pool']['b'])
  pooled_term = lax.dot_general(pooled.astype(dtype), head['proj_pool'],
                                (((1,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)  # [n, 256]
  branches = [jax.nn.relu(_pointwise(x, head['aspp0']['w'], head['aspp0']['b']))]
  rates = tuple(r * 16 // output_stride for r in (6, 12, 18))
  for i, rate in enumerate(rates, start=1):
    if f'aspp{i}' in head:
      branches.append(jax.nn.relu(_conv(x, head[f'aspp{i}']['w'], head[f'aspp{i}']['b'],
                                        dilation=rate)))
  y = jnp.concatenate(branches, axis=-1).astype(dtype) if len(branches) > 1 else \
      branches[0].astype(dtype)
  y = _pointwise(y, head['proj_branches'], head['proj_b'])
  y = jax.nn.relu(y + pooled_term[:, None, None, :]).astype(dtype)
  logits = _pointwise(y, head['logits']['w'], head['logits']['b'])
  if upsample:
    logits = resize_bilinear(logits, images.shape[1:3])
  return logits


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Aligned-corner bilinear resize of float32 x [n, h, w, c] to [n, size[0], size[1], c]."""
  mh = jnp.asarray(_align_corners_matrix(size[0], x.shape[1]))
  mw = jnp.asarray(_align_corners_matrix(size[1], x.shape[2]))
  x = jnp.einsum('oh,nhwc->nowc', mh, x)
  return jnp.einsum('pw,nowc->nopc', mw, x)


def preprocess_padded(images: jax.Array, sizes: Optional[jax.Array] = None) -> jax.Array:
  """uint8/float [0, 255] images [n, h, w, 3] -> [-1, 1], padding set to the mean pixel (0).

  sizes: [n, 2] int32 (height, width) of each image's valid top-left region;
  None means the whole canvas is image.
  """
  x = images.astype(jnp.float32) / MEAN_PIXEL - 1.0
  if sizes is None:
    return x
  rows = jnp.arange(images.shape[1])[None, :, None] < sizes[:, 0, None, None]
  cols = jnp.arange(images.shape[2])[None, None, :] < sizes[:, 1, None, None]
  return jnp.where((rows & cols)[..., None], x, 0.0)


def class_map(folded, images: jax.Array, sizes: Optional[jax.Array], *, width: float,
              output_stride: int, dtype=jnp.float32, image_by_image: bool = False) -> jax.Array:
  """uint8 images [n, h, w, 3] (+ valid sizes [n, 2]) -> class ids [n, h, w] uint8.

  The whole prediction function: preprocessing, padding, network, argmax.
  """
  logits = forward(folded, preprocess_padded(images, sizes), width=width,
                   output_stride=output_stride, dtype=dtype, image_by_image=image_by_image)
  return jnp.argmax(logits, axis=-1).astype(jnp.uint8)


# ----------------------------------------------------------------------------------------------
# The engine.


def batch_devices() -> List[jax.Device]:
  """What `predict` and `benchmark` split batches over: every local device if they are
  CPUs (`main.py` shows a CPU to XLA as two), else the first accelerator."""
  devices = jax.local_devices()
  return devices if devices[0].platform == 'cpu' else devices[:1]


class Engine:
  """Compiled inference for one trained model: class maps and logits of uint8 images.

      engine = Engine(config, variables, dtype='bfloat16')
      masks = engine.predict(images)      # [n, h, w, 3] uint8 -> [n, h, w] uint8

  Every call pads to the shape bucket of its images (`bucket_shape`), splits
  the batch into chunks of `batch_size` (the last one padded), and runs the
  executable compiled ahead of time for (batch_size, bucket, dtype); given
  several `devices`, each runs an equal part of a chunk (`run_padded`).
  """

  def __init__(self, config, variables: Dict[str, Any], dtype='float32', batch_size: int = 1,
               device: Optional[jax.Device] = None, image_by_image: Optional[bool] = None,
               log=None, devices: Optional[Sequence[jax.Device]] = None):
    if isinstance(dtype, str):
      if dtype not in DTYPES:
        raise ValueError(f'dtype must be one of {sorted(DTYPES)}, got {dtype!r}')
      dtype = DTYPES[dtype]
    if batch_size < 1:
      raise ValueError(f'batch_size must be positive, got {batch_size}')
    if device is not None and devices is not None:
      raise ValueError('give device or devices, not both')
    self.config = config
    self.dtype = dtype
    self.batch_size = batch_size
    self.eval_size = config.data.eval_size
    # A batch is split over `devices` when their number divides it (see `run_padded`).
    self.devices = list(devices) if devices else [device or jax.local_devices()[0]]
    self.device = self.devices[0]
    self.log = log
    folded = cast_folded(fold_variables(config.model, jax.device_get(variables), xp=np), dtype,
                         xp=np)
    self.folded_on = {d: jax.device_put(folded, d) for d in self.devices}
    self.folded = self.folded_on[self.device]
    static = dict(width=config.model.width, output_stride=config.model.output_stride,
                  dtype=dtype)
    # One image at a time by default on the CPU: a fraction of the memory (see `forward`).
    if image_by_image is None:
      image_by_image = self.device.platform == 'cpu'
    self.image_by_image = image_by_image
    self._static = static
    self._batch_static = dict(static, image_by_image=image_by_image)
    self._class_map = jax.jit(functools.partial(class_map, **self._batch_static))
    self._logits = jax.jit(lambda f, x, s: forward(f, preprocess_padded(x, s),
                                                   **self._batch_static))
    self._compiled: Dict[Tuple, Any] = {}
    self.compile_seconds: Dict[Tuple, float] = {}
    self.shapes_run = set()  # (kind, batch, height, width) of the calls so far

  def bucket(self, height: int, width: int) -> Tuple[int, int]:
    """The padded shape of an image: images of equal buckets share one compiled call."""
    return bucket_shape(height, width, self.eval_size)

  def forward(self, folded, images: jax.Array, upsample: bool = True) -> jax.Array:
    """`forward` with this engine's model and dtype (images: [n, h, w, 3] in [-1, 1])."""
    return forward(folded, images, upsample=upsample, **self._batch_static)

  def compiled(self, kind: str, batch: int, height: int, width: int,
               device: Optional[jax.Device] = None):
    """The executable for ('classes' | 'logits', batch, height, width) on `device` (default
    the engine's first), compiled once."""
    device = device or self.device
    key = (kind, batch, height, width, device)
    if key not in self._compiled:
      start = time.perf_counter()
      fn = self._class_map if kind == 'classes' else self._logits
      on = jax.sharding.SingleDeviceSharding(device)
      images = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.uint8, sharding=on)
      sizes = jax.ShapeDtypeStruct((batch, 2), jnp.int32, sharding=on)
      self._compiled[key] = fn.lower(self.folded_on[device], images, sizes).compile()
      self.compile_seconds[key] = time.perf_counter() - start
      if self.log:
        where = f' on {device}' if len(self.devices) > 1 else ''
        self.log(f'compiled {kind} for {batch}x{height}x{width} '
                 f'{jnp.dtype(self.dtype).name}{where} in {self.compile_seconds[key]:.1f}s')
    return self._compiled[key]

  def parts(self, batch: int) -> int:
    """Into how many parts `run_padded` splits a batch: one per device if they divide it."""
    return len(self.devices) if batch % len(self.devices) == 0 else 1

  def run_padded(self, kind: str, images: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Compiled calls on a canvas: images [batch, H, W, 3] uint8, sizes [batch, 2].

    With several devices whose number divides the batch, each computes an equal part
    and all parts run at once: on a 2-core CPU shown to XLA as two devices
    (`main.py`), float32 batch 8 at 513x513 took 38.1 instead of 41.1 ms/image (README).
    """
    parts = self.parts(len(images))
    size = len(images) // parts
    self.shapes_run.add((kind, *images.shape[:3]))
    outputs = []
    for i, device in enumerate(self.devices[:parts]):  # dispatch all, then wait
      rows = slice(i * size, (i + 1) * size)
      fn = self.compiled(kind, size, *images.shape[1:3], device=device)
      outputs.append(fn(self.folded_on[device], jax.device_put(images[rows], device),
                        jax.device_put(sizes[rows], device)))
    return np.concatenate([np.asarray(out) for out in outputs])

  def _batches(self, images: Sequence[np.ndarray], kind: str) -> List[np.ndarray]:
    outputs = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      shapes = [self.bucket(*im.shape[:2]) for im in chunk]
      ph, pw = max(s[0] for s in shapes), max(s[1] for s in shapes)
      canvas = np.zeros((self.batch_size, ph, pw, 3), np.uint8)
      sizes = np.ones((self.batch_size, 2), np.int32)
      for i, image in enumerate(chunk):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
          raise ValueError(f'expected [height, width, 3] uint8 images, got {image.shape} '
                           f'{image.dtype}')
        canvas[i, :image.shape[0], :image.shape[1]] = image
        sizes[i] = image.shape[:2]
      result = self.run_padded(kind, canvas, sizes)
      outputs.extend(result[i, :im.shape[0], :im.shape[1]] for i, im in enumerate(chunk))
    return outputs

  def predict(self, images) -> Any:
    """Class ids of images.

    Args:
      images: [n, h, w, 3] uint8, or a list of [h_i, w_i, 3] uint8 of any sizes.

    Returns:
      [n, h, w] uint8 for an array, a list of [h_i, w_i] uint8 for a list.
    """
    if isinstance(images, np.ndarray):
      if images.ndim != 4:
        raise ValueError(f'expected [n, height, width, 3] uint8, got shape {images.shape}')
      return np.stack(self._batches(list(images), 'classes')) if len(images) else \
          np.zeros(images.shape[:3], np.uint8)
    return self._batches(list(images), 'classes')

  def logits(self, images) -> Any:
    """float32 logits [n, h, w, classes] (or a list), computed like `predict`."""
    if isinstance(images, np.ndarray):
      return np.stack(self._batches(list(images), 'logits'))
    return self._batches(list(images), 'logits')
