"""Any image file as [height, width, 3] uint8 RGB, the way `predict` reads it.

Whatever the file holds is brought to 8-bit RGB (see `_to_rgb`): 16-bit and
float greys, palettes, CMYK, and transparency blended over the mean grey that
also pads images. The EXIF orientation is applied, so masks match the image as
viewers show it. An empty, truncated or corrupt file raises an error.

With `max_side`, an image with a larger side is downscaled (antialiased
bilinear, PIL) to fit it: the first half of the 'resize' large-image policy
(`seg.predict.large_images` upsamples the class probabilities back to the original size).
JPEGs are decoded at 1/2, 1/4 or 1/8 scale when that still covers the target
size, so the full-size pixels are not held.
"""

import os
from typing import Optional, Tuple

import numpy as np
from PIL import Image, ImageOps

from seg.predict.profile import NO_PROFILE
from seg.preprocessing import MEAN_PIXEL

EXIF_ORIENTATION = 0x0112


def _to_rgb(image: Image.Image) -> np.ndarray:
  """Any PIL mode -> [h, w, 3] uint8 RGB.

  16-bit (I;16*, I) scale by 1/257 (65535 -> 255), float (F) clips to
  [0, 255]; transparent pixels (RGBA, LA, palette transparency) are blended
  over the mean grey that also pads images; CMYK uses Pillow's conversion
  R = (255 - C)(255 - K) / 255 (no colour profile).
  """
  mode = image.mode
  if mode.startswith('I') or mode == 'F':
    values = np.asarray(image)
    if mode.startswith('I'):
      values = values.astype(np.float64) / 257.0
    gray = np.clip(np.round(values), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  if mode == 'P' and 'transparency' in image.info:
    image = image.convert('RGBA')
  if mode in ('RGBA', 'LA', 'PA', 'La', 'RGBa') or image.mode == 'RGBA':
    rgba = np.asarray(image.convert('RGBA'), np.float64)
    alpha = rgba[..., 3:] / 255.0
    rgb = rgba[..., :3] * alpha + MEAN_PIXEL * (1 - alpha)
    return np.round(rgb).astype(np.uint8)
  if mode != 'RGB':
    image = image.convert('RGB')
  return np.asarray(image)


def load_rgb(path: str) -> np.ndarray:
  """An image file as [height, width, 3] uint8 RGB, EXIF orientation applied."""
  return load_image(path)[0]


def load_image(path: str, max_side: Optional[int] = None,
               profile=NO_PROFILE) -> Tuple[np.ndarray, Tuple[int, int]]:
  """A file as ([h, w, 3] uint8 RGB, (H, W) original size), EXIF orientation applied.

  With `max_side`, an image with a larger side is downscaled to fit it
  (antialiased bilinear; JPEGs are decoded at a reduced scale first). `profile`
  (`seg.predict.profile`) times the stages 'decode' and 'resize'.
  """
  if os.path.getsize(path) == 0:
    raise ValueError('empty file (0 bytes)')
  with Image.open(path) as image:
    width, height = image.size
    try:
      orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # unreadable EXIF: the pixels are still good, take them as stored
      orientation = 1
    if orientation in (5, 6, 7, 8):  # turned by 90 or 270 degrees
      width, height = height, width
    if max_side and max(width, height) > max_side and image.format == 'JPEG':
      # Decode at 1/2, 1/4 or 1/8 scale (still at least the target size).
      scale = max_side / max(width, height)
      image.draft(image.mode, (max(1, int(image.size[0] * scale)),
                               max(1, int(image.size[1] * scale))))
    with profile.stage('decode'):
      image.load()  # decode errors (truncated, corrupt) happen here
      oriented = ImageOps.exif_transpose(image) if orientation in range(2, 9) else image
    with profile.stage('resize'):
      if max_side and max(oriented.size) > max_side:
        oriented = _resize_to_fit(oriented, (height, width), max_side)
      return _to_rgb(oriented), (height, width)


def _resize_to_fit(image: Image.Image, original: Tuple[int, int], max_side: int) -> Image.Image:
  h, w = original
  scale = max_side / max(h, w)
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  if image.mode not in ('RGB', 'RGBA', 'L', 'LA'):
    image = Image.fromarray(_to_rgb(image))
  return image.resize(size, Image.Resampling.BILINEAR)

