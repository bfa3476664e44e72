"""The files `predict` writes for every input image, each written atomically.

Under the output folder, mirroring the input's relative path (see
`seg.predict.files.collect_inputs`):
  NAME.png          class indices as a palette PNG of the input's size (VOC's format)
  NAME_color.png    the same classes as an RGB image in the VOC colours (or the model's own:
                    `Options.palette`, a folder dataset's labelmap.txt)
  NAME_overlay.jpg  (--overlay) the image blended with the class colours
  NAME_prob.npy     (--probabilities) class probabilities [classes, height, width],
                    float16, or uint8 holding round(255 * p)

Every file is written to a temporary name and renamed when complete, so an
interrupted run never leaves a half-written output that a later run would
take as done.
"""

import ctypes
import functools
import io
import os
from typing import Any, Callable, List, Optional

import numpy as np
from PIL import Image

from seg.predict.images import writable_pixels
from seg.predict.options import Options
from seg.predict.png import MaskPngWriter, PngWriter, kernel as masks_in_kernel, library, pointer
from seg.predict.profile import NO_PROFILE


STRIP_ROWS = 256      # mask rows encoded at a time


def output_suffixes(options: Options) -> List[str]:
  suffixes = ['.png', '_color.png']
  if options.overlay:
    suffixes.append('_overlay.jpg')
  if options.probabilities != 'none':
    suffixes.append('_prob.npy')
  return suffixes


def _atomic(path: str, write: Callable[[str], None]) -> None:
  """Calls write(temporary path) and renames it to `path` once complete."""
  folder, name = os.path.split(path)
  temporary = os.path.join(folder, f'.{name}.partial')
  try:
    write(temporary)
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise


@functools.lru_cache(maxsize=1)
def _colormap() -> np.ndarray:
  from seg.classes import voc_colormap
  return voc_colormap()  # a 2,048-step Python loop: once, not per image


def _table(palette: Optional[np.ndarray]) -> np.ndarray:
  """The [256, 3] uint8 colours to use: `palette`, else VOC's."""
  return _colormap() if palette is None else np.ascontiguousarray(palette, np.uint8)


def overlay(rgb: np.ndarray, mask: np.ndarray, in_kernel: Optional[bool] = None,
            palette: Optional[np.ndarray] = None) -> np.ndarray:
  """[h, w, 3] uint8: the image `rgb` with the colours of `mask` [h, w] (`palette` [256, 3],
  default VOC's) blended half and half over it where the class is not background (0):
  round((pixel + colour) / 2), halves to even, as NumPy rounds the float blend; background
  pixels as they are (`blend`, on a copy).
  """
  out = np.array(rgb, np.uint8, order='C')
  blend(out, mask, in_kernel, palette)
  return out


def blend(pixels: np.ndarray, mask: np.ndarray, in_kernel: Optional[bool] = None,
          palette: Optional[np.ndarray] = None) -> None:
  """`overlay` in place: pixels [h, w, 3] uint8, a view whose pixels may be 3 or 4 bytes
  apart (Pillow's memory: `seg.predict.images.writable_pixels`), channels adjacent.

  In the kernel library where it runs (`in_kernel`, default `masks_in_kernel()`: only the
  pixels that are not background touched), else in NumPy's integers strip by strip (uint16
  temporaries of 256 rows; 3x faster than the float blend on a 12 MP photo,
  docs/predict.md).
  """
  if (pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3 or
      mask.shape != pixels.shape[:2]):
    raise ValueError(f'pixels [h, w, 3] uint8 and mask [h, w], got {pixels.dtype} '
                     f'{pixels.shape} and {mask.shape}')
  if not pixels.flags.writeable:
    raise ValueError('pixels are read-only')
  if in_kernel is None:
    in_kernel = masks_in_kernel()
  if in_kernel and pixels.strides[2] == 1 and pixels.strides[1] in (3, 4) and \
      pixels.strides[0] > 0:
    mask = np.ascontiguousarray(mask, np.uint8)
    library().SegOverlay(
        pointer(pixels), ctypes.c_int64(pixels.shape[0]), ctypes.c_int64(pixels.shape[1]),
        ctypes.c_int64(pixels.strides[0]), ctypes.c_int64(pixels.strides[1]), pointer(mask),
        ctypes.c_int64(mask.strides[0]), pointer(_table(palette)))
    return
  for r in range(0, mask.shape[0], STRIP_ROWS):
    m, part = mask[r:r + STRIP_ROWS], pixels[r:r + STRIP_ROWS]
    total = part.astype(np.uint16)
    total += colours(m, palette)
    total += (total >> 1) & 1  # an odd total's half rounds to the even neighbour
    total >>= 1
    np.copyto(part, total.astype(np.uint8), where=m[..., None] > 0)


def colours(mask: np.ndarray, palette: Optional[np.ndarray] = None) -> np.ndarray:
  """[h, w, 3] uint8: the colours (`palette` [256, 3], default VOC's) of an [h, w] class map.

  Pillow's palette conversion: one C loop that releases the GIL (the writer threads colour
  at once), several times faster than indexing the [256, 3] table with the mask.
  """
  mask = np.ascontiguousarray(mask, np.uint8)
  image = Image.frombuffer('P', (mask.shape[1], mask.shape[0]), mask, 'raw', 'P', 0, 1)
  image.putpalette(_table(palette).tobytes())
  return np.asarray(image.convert('RGB'))


class ProbabilityFile:
  """NAME_prob.npy [classes, H, W] written region by region through a memory map."""

  def __init__(self, path: str, num_classes: int, height: int, width: int, fmt: str):
    self.path, self.fmt = path, fmt
    folder, name = os.path.split(path)
    self.temporary = os.path.join(folder, f'.{name}.partial')
    dtype = np.float16 if fmt == 'float16' else np.uint8
    self.array = np.lib.format.open_memmap(self.temporary, mode='w+', dtype=dtype,
                                           shape=(num_classes, height, width))

  def write(self, row: int, col: int, probs: np.ndarray) -> None:
    """probs: [h, w, classes] float in [0, 1], placed at (row, col)."""
    values = np.moveaxis(probs, -1, 0)
    if self.fmt == 'uint8':
      values = np.round(values * 255)
    self.array[:, row:row + probs.shape[0], col:col + probs.shape[1]] = values

  def commit(self) -> None:
    self.array.flush()
    del self.array
    os.replace(self.temporary, self.path)

  def discard(self) -> None:
    self.array = None
    if os.path.exists(self.temporary):
      os.remove(self.temporary)


# (classes, height, width) -> where an image's probabilities go: anything with `write(row,
# col, probs)` (`ProbabilityFile`), and `commit()` / `discard()` for files.
OpenProbabilities = Callable[[int, int, int], Any]


def probability_file_for(stem: str, options: Options) -> Optional[OpenProbabilities]:
  """STEM_prob.npy in `options.probabilities`'s format, opened when an image's size and
  classes are known; None where no probabilities are asked for."""
  if not options.want_probabilities:
    return None
  def open_file(num_classes: int, height: int, width: int) -> ProbabilityFile:
    os.makedirs(os.path.dirname(stem) or '.', exist_ok=True)
    return ProbabilityFile(stem + '_prob.npy', num_classes, height, width,
                           options.probabilities)
  return open_file


def _encoded(image: Image.Image, fmt: str, **params) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **params)
  return buffer.getvalue()


def _write_bytes(path: str, data: bytes) -> None:
  def write(temporary):
    with open(temporary, 'wb') as f:
      f.write(data)
  _atomic(path, write)


def write_masks(stem: str, mask: np.ndarray, options: Options,
                image: Optional[Callable[[], Image.Image]] = None, profile=NO_PROFILE) -> None:
  """STEM.png (palette indices), STEM_color.png and, with overlay, STEM_overlay.jpg.

  The two PNGs are encoded strip by strip (`seg.predict.png`), so no full-size RGB copy of
  the mask is made: in the kernel library where it runs (`masks_in_kernel`, both from the
  class indices), else through zlib. `image` returns the image under the overlay, a PIL
  image of mode RGB (read lazily; blended in its own memory where `writable_pixels` gives
  it, else on a copy). `profile` times the stages 'colour' (class ids -> RGB; the kernel
  colours as it encodes; the overlay's blend), 'encode' and 'write'.
  """
  os.makedirs(os.path.dirname(stem) or '.', exist_ok=True)
  cmap = _table(options.palette)
  height, width = mask.shape

  indices_file, colour_file = io.BytesIO(), io.BytesIO()  # compressed: a few hundred KiB
  in_kernel = masks_in_kernel()
  if in_kernel:
    indices = MaskPngWriter(indices_file, width, height, cmap, colour=False)
    colour_png = MaskPngWriter(colour_file, width, height, cmap, colour=True)
  else:
    indices = PngWriter(indices_file, width, height, palette=cmap)
    colour_png = PngWriter(colour_file, width, height)
  for r in range(0, height, STRIP_ROWS):
    strip = mask[r:r + STRIP_ROWS]
    colour_rows = strip  # the kernel colours the indices as it encodes
    if not in_kernel:
      with profile.stage('colour'):
        colour_rows = colours(strip, cmap)
    with profile.stage('encode'):
      indices.write(strip)
      colour_png.write(colour_rows)
  with profile.stage('encode'):
    indices.close()
    colour_png.close()
  with profile.stage('write'):
    _write_bytes(stem + '_color.png', colour_file.getvalue())
    _write_bytes(stem + '.png', indices_file.getvalue())
  if options.overlay:
    picture = image()
    with profile.stage('colour'):
      pixels = writable_pixels(picture)
      if pixels is None:
        picture = Image.fromarray(overlay(np.asarray(picture), mask, palette=cmap))
      else:  # blended in Pillow's memory and encoded from there: no copy of the photo
        blend(pixels, mask, palette=cmap)
        del pixels
    with profile.stage('encode'):
      data = _encoded(picture, 'JPEG', quality=90)
    with profile.stage('write'):
      _write_bytes(stem + '_overlay.jpg', data)
