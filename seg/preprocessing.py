"""How an image becomes the network's input: one definition for training, evaluation, inference
and prediction, so that they cannot drift apart.

- Values: RGB in [0, 255] map to [-1, 1] (`preprocess`), DeepLab's MobileNetV2 convention
  (`_preprocess_zero_mean_unit_range`), recorded as `config.model.preprocessing`.
- Padding: images are padded at the bottom and right with `MEAN_PIXEL` (0 after `preprocess`),
  labels with the ignore label; nothing is ever resized or cropped for evaluation.
- Padded sizes: `eval_size` square, or, for a larger side, the next size of the form
  k * 64 + 1 (`padded_size`, `bucket_shape`). Sizes k * 16 + 1 keep aligned-corner resizes on
  the output-stride grid (513 = 32 * 16 + 1), and buckets of 64 bound the compiled shapes.
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

MEAN_PIXEL = 127.5   # DeepLab's mean value: pads images; 0 after `preprocess`
ZERO_MEAN_UNIT_RANGE = 'zero_mean_unit_range'   # [0, 255] -> [-1, 1]
PREPROCESSINGS = (ZERO_MEAN_UNIT_RANGE,)        # what `preprocess` implements
BUCKET = 64          # larger images are padded up to a multiple of this, plus one


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 or float [0, 255] RGB -> [-1, 1].

  Integer images become float32; float64 stays float64 (used by exactness tests).
  """
  return images.astype(jnp.promote_types(images.dtype, jnp.float32)) / MEAN_PIXEL - 1.0


def preprocess_padded(images: jax.Array, sizes: Optional[jax.Array] = None) -> jax.Array:
  """`preprocess` of images on a canvas, everything outside each image set to the mean pixel.

  Args:
    images: [n, h, w, 3] uint8 or float in [0, 255].
    sizes: [n, 2] int32 (height, width) of each image's valid top-left region; None means
      the whole canvas is image.

  Returns:
    [n, h, w, 3] float32 in [-1, 1], 0 outside the images.
  """
  x = images.astype(jnp.float32) / MEAN_PIXEL - 1.0
  if sizes is None:
    return x
  rows = jnp.arange(images.shape[1])[None, :, None] < sizes[:, 0, None, None]
  cols = jnp.arange(images.shape[2])[None, None, :] < sizes[:, 1, None, None]
  return jnp.where((rows & cols)[..., None], x, 0.0)


def preprocess_in_box(images: jax.Array, boxes: jax.Array) -> jax.Array:
  """`preprocess` of uint8 training crops, 0 (the mean pixel) outside each image's box.

  The training pipeline sends uint8 crops to accelerators (`seg.data.pipeline.augment`,
  as_uint8); uint8 cannot hold the mean pixel 127.5 that pads them, so the padding is
  given as the box of real pixels instead and set here to what the padding becomes.

  Args:
    images: [n, h, w, 3] uint8.
    boxes: [n, 4] int32: rows [box[0], box[1]) and columns [box[2], box[3]) are image.

  Returns:
    [n, h, w, 3] float32 in [-1, 1], 0 outside the boxes.
  """
  x = images.astype(jnp.float32) / MEAN_PIXEL - 1.0
  rows = jnp.arange(images.shape[1])[None, :, None]
  cols = jnp.arange(images.shape[2])[None, None, :]
  b = boxes[:, :, None, None]
  inside = ((rows >= b[:, 0]) & (rows < b[:, 1]) & (cols >= b[:, 2]) & (cols < b[:, 3]))
  return jnp.where(inside[..., None], x, 0.0)


def padded_size(size: int) -> int:
  """The smallest k * BUCKET + 1 that holds `size` pixels."""
  return -(-(size - 1) // BUCKET) * BUCKET + 1


def large_canvas(data_config) -> int:
  """The side of the square canvas `eval` pads a dataset folder's images above
  `data.eval_size` to (`padded_size` of the largest), which `predict` gives every image above
  the eval size up to `data.predict_max_side` (`train` sets it to that largest side), and the
  jax and LiteRT exports take as their default canvas; 0 where predict_max_side is not above
  the eval size."""
  side = data_config.get('predict_max_side', 0)
  return padded_size(side) if side > data_config.eval_size else 0


def bucket_shape(height: int, width: int, eval_size: int) -> Tuple[int, int]:
  """The padded shape of an image: `eval_size` square, or `padded_size` of a larger side."""
  if height < 1 or width < 1:
    raise ValueError(f'empty image ({height}x{width})')
  if max(height, width) <= eval_size:
    return eval_size, eval_size
  return max(padded_size(height), eval_size), max(padded_size(width), eval_size)
