"""The inference engine: a trained model folded for speed and compiled ahead of time.

One engine serves `eval`, `predict`, `benchmark` and `export`. It folds the variables
(`seg.inference.fold`), runs the folded forward pass (`seg.inference.forward`) and compiles
one executable per (kind, batch size, padded shape, device), ahead of time; JAX's persistent
compilation cache (set up by the CLI) keeps them across runs.

Shape policy (`seg.preprocessing`, shared with evaluation and prediction): an image is padded
with the mean pixel at its bottom and right to `eval_size` square, or, when a side is larger,
to the next size of the form k * 64 + 1 (`bucket_shape`).
"""

import functools
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from seg.inference.fold import cast_folded, fold_variables
from seg.inference.forward import class_map, forward, is_multi_scale, multi_scale_logits
from seg.preprocessing import bucket_shape, large_canvas, preprocess_padded

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'int8': jnp.int8}


def batch_devices() -> List[jax.Device]:
  """What `predict` and `benchmark` split batches over: every local device (each GPU of
  the machine; a CPU is shown to XLA as two devices by `seg.cli.process`)."""
  return jax.local_devices()


def int8_scales_for(workdir: str, config, variables, log=None, calibration: Optional[str] = None,
                    calibration_count: Optional[int] = None) -> Dict[str, float]:
  """The int8 activation scales of the model in `workdir`: `workdir/int8_scales.json`, or
  calibrated and stored there (`seg.inference.quantize.load_or_calibrate`).

  calibration: the images (`seg.inference.calibration`: a folder, glob or list, or a split
    name), calibration_count: how many; not given: those the workdir was calibrated on
    before, else the config's training split and 200.
  """
  from seg.inference import quantize
  folded = fold_variables(config.model, jax.device_get(variables), xp=np)
  try:
    return quantize.load_or_calibrate(workdir, config, folded, source=calibration,
                                      count=calibration_count, log=log or print)
  except FileNotFoundError as e:  # e.g. the VOC archives of an imported model's config
    if calibration:
      raise
    raise FileNotFoundError(
        f'int8 calibrates on images, by default the config\'s training split '
        f'{config.data.train_split!r} of {config.data.dataset!r}, which cannot be read here: '
        f'give --calibration a folder, glob or list of images like those to predict. ({e})'
    ) from None


def int8_formulation_for(platform: str, requested: Optional[str] = None, log=None) -> str:
  """The int8 formulation an engine on `platform` runs (`seg.inference.quantize`).

  `requested`, else SEG_INT8_FORMULATION, else this CPU's choice (`cpu_features.choose`) on a
  CPU and 'int8' on accelerators. 'kernel' becomes 'int8' off the CPU or where the kernel
  cannot be built (`seg.inference.int8_kernel.available`), said through `log`, or on stderr
  without one (2-3x slower on a CPU: never silently).
  """
  from seg.inference import cpu_features
  on_cpu = platform == 'cpu'
  formulation = (requested or cpu_features.formulation_override() or
                 (cpu_features.choose().int8_formulation if on_cpu else 'int8'))
  if formulation == 'kernel':
    from seg.inference import int8_kernel
    why = (f'the engine runs on {platform}, the kernel on CPUs' if not on_cpu else
           None if int8_kernel.available(log) else int8_kernel.unavailable_reason())
    if why:
      (log or functools.partial(print, file=sys.stderr))(
          f"int8: XLA's int8 products instead of the project's int8 kernel ({why})")
      formulation = 'int8'
  return formulation


def float_formulation_for(dtype: str, platform: str, requested: Optional[str] = None,
                          log=None) -> str:
  """The formulation a float32 or bfloat16 (`dtype`) engine on `platform` runs: 'kernel' (the
  project's kernel, `seg.inference.float_kernel`) or 'xla'.

  `requested`, else SEG_F32_FORMULATION / SEG_BF16_FORMULATION, else this CPU's choice
  (`cpu_features.choose`) on a CPU and 'xla' on accelerators. 'kernel' becomes 'xla' off the
  CPU or where the kernel cannot run, said through `log` (or on stderr) when it was asked
  for by name.
  """
  from seg.inference import cpu_features
  on_cpu = platform == 'cpu'
  asked = requested or cpu_features.float_formulation_override(dtype)
  choice = cpu_features.choose()
  formulation = asked or ((choice.f32_formulation if dtype == 'float32' else
                           choice.bf16_formulation) if on_cpu else 'xla')
  if formulation == 'kernel':
    from seg.inference import float_kernel
    why = (f'the engine runs on {platform}, the kernel on CPUs' if not on_cpu else
           None if float_kernel.available(DTYPES[dtype], log) else
           float_kernel.unavailable_reason(DTYPES[dtype]))
    if why:
      if asked:
        (log or functools.partial(print, file=sys.stderr))(
            f"{dtype}: XLA's {dtype} products instead of the project's kernel ({why})")
      formulation = 'xla'
  return formulation


def upsample_argmax_for(platform: str, requested: Optional[str] = None, log=None) -> str:
  """How an engine on `platform` takes the logits to the image's size and their argmax
  (`forward.class_map`'s `upsample_argmax`): `requested`, else SEG_UPSAMPLE_ARGMAX, else
  'kernel' on CPUs where the project's kernel runs (`float_kernel.available(float32)`: x86-64
  with AVX2 and FMA) and 'xla' elsewhere. 'kernel' becomes 'xla' off the CPU or where the
  kernel cannot run, said through `log` (or on stderr) when it was asked for by name."""
  from seg.inference import cpu_features, float_kernel
  on_cpu = platform == 'cpu'
  asked = requested or cpu_features.upsample_argmax_override()
  choice = asked or ('kernel' if on_cpu and float_kernel.available(jnp.float32, log) else 'xla')
  if choice == 'kernel':
    why = (f'the engine runs on {platform}, the kernel on CPUs' if not on_cpu else
           None if float_kernel.available(jnp.float32, log) else
           float_kernel.unavailable_reason(jnp.float32))
    if why:
      (log or functools.partial(print, file=sys.stderr))(
          f"upsampling and argmax: XLA's instead of the project's kernel ({why})")
      choice = 'xla'
  return choice


class Engine:
  """Compiled inference for one trained model: class maps and logits of uint8 images.

      engine = Engine(config, variables, dtype='bfloat16')   # or 'int8' with int8_scales
      masks = engine.predict(images)      # [n, h, w, 3] uint8 -> [n, h, w] uint8

  Every call pads to the shape bucket of its images (`bucket_shape`), splits
  the batch into chunks of `batch_size` (the last one padded), and runs the
  executable compiled ahead of time for (batch_size, bucket, dtype); given
  several `devices`, each runs an equal part of a chunk (`run_padded`; `split_batches`:
  True or False forces it, None splits unless the kernels run the whole network and the
  class map: `upsample_argmax` 'kernel', the CPU's choice where the kernels run). On x86 CPUs with
  AVX-512 float32 and bfloat16 run in the project's kernel (`f32_formulation`,
  `bf16_formulation`: 'kernel'; 'xla' asks for XLA's products), int8 as
  `int8_formulation` says (`seg.inference.cpu_features`).

  `scales`, `flip`: DeepLab's multi-scale and flipped inference (`multi_scale_logits`, what
  `eval` scores with `config.eval.scales` / `config.eval.flip`): class maps are then the argmax
  of the softmax averaged over every pass, `probabilities` that average, and `features` the
  average on the whole canvas (`features_are_probabilities`); `logits` stay the plain pass's.
  """

  def __init__(self, config, variables: Dict[str, Any], dtype='float32', batch_size: int = 1,
               device: Optional[jax.Device] = None, image_by_image: Optional[bool] = None,
               log=None, devices: Optional[Sequence[jax.Device]] = None,
               int8_scales: Optional[Dict[str, float]] = None,
               int8_formulation: Optional[str] = None,
               bf16_formulation: Optional[str] = None,
               f32_formulation: Optional[str] = None,
               upsample_argmax: Optional[str] = None,
               split_batches: Optional[bool] = None,
               scales: Sequence[float] = (1.0,), flip: bool = False):
    if isinstance(dtype, str):
      if dtype not in DTYPES:
        raise ValueError(f'dtype must be one of {sorted(DTYPES)}, got {dtype!r}')
      dtype = DTYPES[dtype]
    if batch_size < 1:
      raise ValueError(f'batch_size must be positive, got {batch_size}')
    if device is not None and devices is not None:
      raise ValueError('give device or devices, not both')
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0:
      raise ValueError(f'scales must be positive numbers, got {scales}')
    self.scales, self.flip = scales, bool(flip)
    self.multi_scale = is_multi_scale(scales, flip)
    self.config = config
    self.dtype = dtype
    self.batch_size = batch_size
    self.eval_size = config.data.eval_size
    # `predict`'s default largest side (config.data.predict_max_side; 0: the eval size), and
    # for images above the eval size up to it, the one square canvas `eval` pads them to.
    self.predict_max_side = config.data.get('predict_max_side', 0) or self.eval_size
    self.large_canvas = large_canvas(config.data)
    # A batch is split over `devices` when their number divides it (see `run_padded`).
    self.devices = list(devices) if devices else [device or jax.local_devices()[0]]
    self.device = self.devices[0]
    self.log = log
    folded = fold_variables(config.model, jax.device_get(variables), xp=np)
    # Which products each dtype runs: int8's (seg.inference.quantize), bfloat16's and
    # float32's ('kernel': seg.inference.float_kernel, or 'xla'); None for other dtypes.
    self.int8_formulation = self.bf16_formulation = self.f32_formulation = None
    if dtype == jnp.int8:  # seg.inference.quantize
      from seg.inference import quantize
      if int8_scales is None:
        raise ValueError("dtype='int8' needs int8_scales (seg.inference.quantize."
                         "load_or_calibrate, or Engine.from_workdir)")
      self.int8_formulation = int8_formulation_for(self.device.platform, int8_formulation,
                                                   log)
      folded = quantize.quantize_folded(config.model, folded, int8_scales,
                                        self.int8_formulation)
    else:
      name = jnp.dtype(dtype).name
      formulation = float_formulation_for(
          name, self.device.platform,
          bf16_formulation if dtype == jnp.bfloat16 else f32_formulation, log)
      if dtype == jnp.bfloat16:
        self.bf16_formulation = formulation
      else:
        self.f32_formulation = formulation
      if formulation == 'kernel':  # float32 weights, and packed ones for the kernel
        from seg.inference import float_kernel
        folded = float_kernel.pack_folded(folded, dtype)
      else:
        folded = cast_folded(folded, dtype, xp=np)
    self.folded_on = {d: jax.device_put(folded, d) for d in self.devices}
    self.folded = self.folded_on[self.device]
    static = dict(width=config.model.width, output_stride=config.model.output_stride,
                  dtype=dtype)
    # One image at a time by default on the CPU: a fraction of the memory (see `forward`).
    if image_by_image is None:
      image_by_image = self.device.platform == 'cpu'
    self.image_by_image = image_by_image
    self.static = static  # the keyword arguments of `forward` / `class_map` besides the batch
    self._batch_static = dict(static, image_by_image=image_by_image)
    # The class map's resize and argmax: 'kernel' (row by row) or 'xla' (`class_map`).
    self.upsample_argmax = upsample_argmax_for(self.device.platform, upsample_argmax, log)
    self._class_map = jax.jit(functools.partial(class_map, **self._batch_static,
                                                upsample_argmax=self.upsample_argmax))
    if self.multi_scale:  # the average of every pass, and its argmax
      self._class_map = jax.jit(
          lambda f, x, s: jnp.argmax(self._averaged(f, x, s), axis=-1).astype(jnp.uint8))
    # Several devices (a CPU shown to XLA as two) compute a batch as parts at once
    # (`run_padded`), which keeps every core busy in XLA's single-threaded stretches. Where
    # the kernels run the network and the class map, on threads of their own on every core,
    # a batch was faster whole (docs/performance.md, "Two parts at once on a CPU").
    in_kernels = self.upsample_argmax == 'kernel' and 'kernel' in (
        self.int8_formulation, self.bf16_formulation, self.f32_formulation)
    self.split_batches = not in_kernels if split_batches is None else split_batches
    self._logits = jax.jit(lambda f, x, s: forward(f, preprocess_padded(x, s),
                                                   **self._batch_static))
    self._features = jax.jit(lambda f, x, s: forward(f, preprocess_padded(x, s), upsample=False,
                                                     **self._batch_static))
    self._probabilities = jax.jit(self._averaged if self.multi_scale else
                                  lambda f, x, s: jax.nn.softmax(self._logits(f, x, s), -1))
    self._compiled: Dict[Tuple, Any] = {}
    self.compile_seconds: Dict[Tuple, float] = {}
    self.shapes_run = set()  # (kind, batch, height, width) of the calls so far

  def _averaged(self, folded, images, sizes) -> jax.Array:
    """The softmax averaged over `scales` and flips on the whole canvas (`multi_scale_logits`);
    image by image where the engine runs so (`image_by_image`): then one image's passes and
    class planes are live at a time, not the batch's."""
    average = functools.partial(multi_scale_logits, folded, scales=self.scales, flip=self.flip,
                                **self.static)
    if not self.image_by_image or images.shape[0] == 1:
      return average(preprocess_padded(images, sizes))
    return jax.lax.map(lambda each: average(preprocess_padded(each[0][None], each[1][None]))[0],
                       (images, sizes))

  @property
  def features_are_probabilities(self) -> bool:
    """Whether `features` are averaged probabilities on the canvas (multi-scale), not
    logits on the feature grid."""
    return self.multi_scale

  def bucket(self, height: int, width: int) -> Tuple[int, int]:
    """The padded shape of an image: images of equal buckets share one compiled call. An
    image above the eval size and up to `predict_max_side` (a dataset folder's eval images)
    gets `large_canvas`, as `eval` pads it (`seg.data.pipeline.oversize_images`): the image
    pooling sees the same padding, and the masks are eval's."""
    if self.large_canvas and self.eval_size < max(height, width) <= self.predict_max_side:
      return self.large_canvas, self.large_canvas
    return bucket_shape(height, width, self.eval_size)

  @classmethod
  def from_workdir(cls, workdir: str, calibration: Optional[str] = None,
                   calibration_count: Optional[int] = None, **kwargs) -> Tuple['Engine', int]:
    """(the engine for the latest checkpoint of `workdir`, its step); `kwargs` as `Engine`'s;
    `calibration`, `calibration_count`: int8's images (`int8_scales_for`)."""
    from seg import checkpoint
    from seg.model import create_model
    config = checkpoint.load_config(workdir)
    variables, step = checkpoint.load_model_variables(workdir, create_model(config.model))
    if kwargs.get('dtype') == 'int8' and kwargs.get('int8_scales') is None:
      kwargs['int8_scales'] = int8_scales_for(workdir, config, variables, kwargs.get('log'),
                                              calibration, calibration_count)
    return cls(config, variables, **kwargs), step

  def forward(self, folded, images: jax.Array, upsample: bool = True) -> jax.Array:
    """`forward` with this engine's model and dtype (images: [n, h, w, 3] in [-1, 1])."""
    return forward(folded, images, upsample=upsample, **self._batch_static)

  def compiled(self, kind: str, batch: int, height: int, width: int,
               device: Optional[jax.Device] = None):
    """The executable for ('classes' | 'logits' | 'features' | 'probabilities', batch,
    height, width) on `device` (default the engine's first), compiled once."""
    device = device or self.device
    if kind == 'features' and self.multi_scale:  # averaged probabilities: that program
      kind = 'probabilities'
    key = (kind, batch, height, width, device)
    if key not in self._compiled:
      start = time.perf_counter()
      fn = {'classes': self._class_map, 'logits': self._logits, 'features': self._features,
            'probabilities': self._probabilities}[kind]
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
    """Into how many parts `run_padded` splits a batch: one per device if they divide it
    and the engine splits batches (`split_batches`)."""
    return len(self.devices) if self.split_batches and batch % len(self.devices) == 0 else 1

  def run_padded(self, kind: str, images: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Compiled calls on a canvas: images [batch, H, W, 3] uint8, sizes [batch, 2].

    With several devices whose number divides the batch, each computes an equal part
    and all parts run at once: a CPU shown to XLA as two devices (`seg.cli.process`) then
    keeps both cores busy in the single-threaded parts of the program (docs/performance.md).
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
      if kind == 'features':  # the whole feature grid of the canvas, and the canvas's size
        outputs.extend((result[i], (ph, pw)) for i in range(len(chunk)))
      else:
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

  def features(self, images: Sequence[np.ndarray]) -> List[Tuple[np.ndarray, Tuple[int, int]]]:
    """Logits on the feature grid, before the model's upsampling: for each image of the
    list, ([fh, fw, classes] float32 of its whole padded canvas, (canvas height, width)).
    With several scales or flips (`features_are_probabilities`), the averaged probabilities
    of the whole canvas instead ([canvas height, width, classes]: a grid of one cell per
    pixel, which the same rule takes to any size).

    The model's logits are these resized with aligned corners to the canvas
    (`resize_bilinear`); `seg.predict.upsampling` takes them to any size by the same rule.
    """
    return self._batches(list(images), 'features')

  def probabilities(self, images) -> Any:
    """float32 class probabilities [n, h, w, classes] (or a list): the softmax of `logits`,
    or with several scales or flips their average (what `predict`'s classes are the argmax
    of)."""
    if isinstance(images, np.ndarray):
      return np.stack(self._batches(list(images), 'probabilities'))
    return self._batches(list(images), 'probabilities')

  def logits(self, images) -> Any:
    """float32 logits [n, h, w, classes] (or a list) of the plain pass (one scale, no flip,
    whatever `scales` and `flip` say), computed like `predict`."""
    if isinstance(images, np.ndarray):
      return np.stack(self._batches(list(images), 'logits'))
    return self._batches(list(images), 'logits')
