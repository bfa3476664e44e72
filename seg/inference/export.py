"""A trained model as one portable file: the whole prediction function, serialised by `jax.export`.

    python main.py export --workdir runs/quickstart --output model.jax [--platforms cpu,cuda]

The file holds StableHLO for every platform asked for (CPU and CUDA by
default; lowering for CUDA needs no GPU) with the folded weights inside. The
function is `seg.inference.forward.class_map`: uint8 images and their valid sizes in,
class ids out, preprocessing and padding included; for a model evaluated with several
scales or flips (`config.eval.scales`, `eval.flip`, or `--scales/--flip`), the argmax of the
softmax averaged over those passes (`seg.inference.forward.multi_scale_logits`), the masks
`eval` scores and `predict` writes. Its input is
`images: uint8 [batch, H, W, 3]` (batch symbolic unless `--no-symbolic-batch`,
H x W fixed at export: `--height/--width`, by default the eval size square, or for a model
trained on a dataset folder of larger eval images the square `eval` pads them to) and
`sizes: int32 [batch, 2]`, each image's (height, width); an image sits at the
top left of its canvas and everything outside it counts as the mean pixel,
as in `eval` and `predict`. The output is uint8 [batch, H, W].

Loading needs only `jax` and `numpy`, no code of this project:

    import jax, numpy as np
    from jax import export

    with open('model.jax', 'rb') as f:
      predict = export.deserialize(bytearray(f.read()))
    _, H, W, _ = predict.in_avals[0].shape          # the canvas size fixed at export
    canvas = np.zeros((1, H, W, 3), np.uint8)       # one image of at most H x W
    canvas[0, :image.shape[0], :image.shape[1]] = image   # image: [h, w, 3] uint8 RGB
    sizes = np.array([image.shape[:2]], np.int32)
    mask = np.asarray(predict.call(canvas, sizes))[0, :image.shape[0], :image.shape[1]]
"""

import os
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import export as jax_export
import numpy as np

from seg import checkpoint
from seg.inference import engine
from seg.inference.fold import cast_folded
from seg.inference.forward import (chosen_passes, class_map, describe_passes,
                                   multi_scale_logits)
from seg.model import create_model
from seg.preprocessing import preprocess_padded

PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')


def export_engine(eng: engine.Engine, platforms: Sequence[str] = ('cpu', 'cuda'),
                  batch_size: Optional[int] = None, height: Optional[int] = None,
                  width: Optional[int] = None) -> jax_export.Exported:
  """The engine's class-map function with its weights baked in, lowered for `platforms`.

  Args:
    eng: a `seg.inference.engine.Engine` (its dtype is the exported compute dtype; its
      `scales` and `flip`, the passes averaged).
    batch_size: fixed batch; None = a symbolic batch dimension.
    height, width: the canvas size (default the engine's eval_size, or its `large_canvas`:
      a model trained on a folder of larger eval images, `seg.preprocessing.large_canvas`).
  """
  unknown = [p for p in platforms if p not in PLATFORMS]
  if unknown or not platforms:
    raise ValueError(f'platforms must be among {PLATFORMS}, got {list(platforms)}')
  if eng.int8_formulation == 'kernel':
    raise ValueError("the engine runs the project's int8 kernel, which an export cannot carry: "
                     "build it with int8_formulation='int8'")
  side = eng.large_canvas or eng.eval_size   # a folder model's: eval's larger square
  height, width = height or side, width or side
  batch = jax_export.symbolic_shape('batch')[0] if batch_size is None else batch_size
  folded = jax.device_get(eng.folded)  # constants of the exported module
  if 'kernel' in (eng.f32_formulation, eng.bf16_formulation):
    # XLA's products in the engine's dtype: the project's kernels are not part of an export.
    from seg.inference import float_kernel
    folded = cast_folded(float_kernel.unpacked(folded), eng.dtype, xp=np)
  if eng.multi_scale:
    average = lambda images, sizes: multi_scale_logits(
        folded, preprocess_padded(images, sizes), scales=eng.scales, flip=eng.flip,
        **eng.static)
    fn = jax.jit(lambda images, sizes: jnp.argmax(average(images, sizes), -1).astype(jnp.uint8))
  else:
    fn = jax.jit(lambda images, sizes: class_map(folded, images, sizes, **eng.static))
  return jax_export.export(fn, platforms=tuple(platforms))(
      jax.ShapeDtypeStruct((batch, height, width, 3), jnp.uint8),
      jax.ShapeDtypeStruct((batch, 2), jnp.int32))


def export_workdir(workdir: str, output: str, platforms: Sequence[str] = ('cpu', 'cuda'),
                   config=None, dtype: str = 'float32', batch_size: Optional[int] = None,
                   height: Optional[int] = None, width: Optional[int] = None,
                   log=print, calibration: Optional[str] = None,
                   calibration_count: Optional[int] = None, scales=None,
                   flip: Optional[bool] = None) -> jax_export.Exported:
  """`main.py export`: serialises the latest checkpoint of `workdir` to `output`; `scales`,
  `flip`: the passes averaged (default: the config's `eval.scales`, `eval.flip`)."""
  start = time.time()
  config = config or checkpoint.load_config(workdir)
  scales, flip = chosen_passes(config.eval, scales, flip)
  variables, step = checkpoint.load_model_variables(workdir, create_model(config.model))
  int8_scales = (engine.int8_scales_for(workdir, config, variables, log, calibration,
                                        calibration_count) if dtype == 'int8' else None)
  # int8: int8 weights in the file whatever this CPU prefers (4x smaller, runs anywhere);
  # float32 and bfloat16: XLA's products (the project's kernels are not part of an export).
  eng = engine.Engine(config, variables, dtype=dtype, int8_scales=int8_scales,
                      int8_formulation='int8', bf16_formulation='xla', f32_formulation='xla',
                      scales=scales, flip=flip)
  exported = export_engine(eng, platforms, batch_size, height, width)
  blob = exported.serialize()
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, 'wb') as f:
    f.write(blob)
  images, sizes = exported.in_avals
  log(f'exported {workdir} (step {step}) to {output}: {len(blob) / 2**20:.1f} MiB, '
      f'platforms {", ".join(exported.platforms)}, {dtype}, in {time.time() - start:.1f}s')
  log(f'  images: uint8 {images.str_short()}  sizes: int32 {sizes.str_short()}  ->  '
      f'class ids: uint8 {exported.out_avals[0].str_short()}')
  if eng.multi_scale:
    log(f'  {describe_passes(eng.scales, eng.flip)}')
  log('  load it with jax and numpy only: see seg/inference/export.py')
  return exported
