"""What the exported models take in: a fixed-size uint8 RGB canvas, and the rules to fill it.

A LiteRT model has one input size, fixed at export (`--size HxW`, default the model's
eval size). An image of another size is fitted onto that canvas (`fit_canvas`): scaled down
if a side is larger (aspect kept), then padded at the bottom and right with `PAD_PIXEL`,
and the mask is read back from the same top-left region. The engine pads with the mean
pixel 127.5 (0 after preprocessing), which a uint8 canvas cannot hold; 128 is 1/255 of the
[-1, 1] range away from it. Calibration images for int8 (`calibration_canvases`) are fitted
by the same rule, so that they are what the model will see.
"""

import re
from typing import List, Optional, Tuple

import numpy as np

PAD_PIXEL = 128     # the nearest uint8 to the mean pixel 127.5
MIN_SIDE = 17       # at output stride 16: at least two feature rows and columns
MAX_SIDE = 4097


def parse_size(text: Optional[str], default: int) -> Tuple[int, int]:
  """'HxW' (or one number for a square) -> (height, width); None/'' -> (default, default).

  Raises ValueError for a malformed size or a side outside [MIN_SIDE, MAX_SIDE].
  """
  if not text:
    return default, default
  m = re.fullmatch(r'\s*(\d+)\s*(?:[xX,]\s*(\d+))?\s*', str(text))
  if not m:
    raise ValueError(f'--size {text!r}: expected HEIGHTxWIDTH, e.g. 257x257')
  height, width = int(m.group(1)), int(m.group(2) or m.group(1))
  for side in (height, width):
    if not MIN_SIDE <= side <= MAX_SIDE:
      raise ValueError(f'--size {text!r}: unsupported size, each side must be between '
                       f'{MIN_SIDE} and {MAX_SIDE} pixels (sizes k * 16 + 1, such as 257 or '
                       '513, keep the aligned-corner upsampling on the feature grid)')
  return height, width


def fit_canvas(image: np.ndarray, height: int, width: int) -> Tuple[np.ndarray, Tuple[int, int]]:
  """An image on a [height, width, 3] uint8 canvas, and the (h, w) it covers at the top left.

  image: [h, w, 3] uint8 RGB. A side larger than the canvas scales the image down (bilinear,
  aspect kept); the rest of the canvas is PAD_PIXEL.
  """
  if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
    raise ValueError(f'expected an [h, w, 3] uint8 image, got {image.shape} {image.dtype}')
  h, w = image.shape[:2]
  scale = min(height / h, width / w)
  if scale < 1:
    from PIL import Image
    h, w = max(1, min(height, round(h * scale))), max(1, min(width, round(w * scale)))
    image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
  canvas = np.full((height, width, 3), PAD_PIXEL, np.uint8)
  canvas[:h, :w] = image
  return canvas, (h, w)


def calibration_canvases(source: str, config, count: int, height: int,
                         width: int) -> List[np.ndarray]:
  """`seg.inference.calibration.calibration_images` fitted on [height, width, 3] canvases."""
  from seg.inference.calibration import calibration_images
  return [fit_canvas(image, height, width)[0]
          for image in calibration_images(source, config, count)]
