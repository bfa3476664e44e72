"""Any image file as [height, width, 3] uint8 RGB, the way `predict` reads it.

Whatever the file holds is brought to 8-bit RGB (see `_to_rgb`): 16-bit and
float greys, palettes, CMYK, and transparency blended over the mean grey that
also pads images. The EXIF orientation is applied, so masks match the image as
viewers show it. An empty, truncated or corrupt file raises an error.

With `max_side`, an image with a larger side is downscaled (antialiased
bilinear, PIL) to fit it: the first half of the 'resize' large-image policy
(`seg.predict.large_images` upsamples the class probabilities back to the original size).
JPEGs are decoded at 1/2, 1/4 or 1/8 scale when that still covers the target
size, so the full-size pixels are not held; a HEIC photo's embedded thumbnail is
taken where one covers it.

For `--overlay` (`load_rgb_image`, `writable_pixels`), the full-size image stays in
Pillow's memory and the overlay is blended there, with no copy of the photo.
"""

import ctypes
import functools
import os
from typing import Optional, Tuple

import numpy as np
from PIL import Image, ImageOps

from seg.predict.profile import NO_PROFILE
from seg.preprocessing import MEAN_PIXEL

EXIF_ORIENTATION = 0x0112
HEIF_EXTENSIONS = ('.heic', '.heif')


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
  oriented, original = _decoded(path, max_side, profile)
  with profile.stage('resize'):
    return fitted(oriented, original, max_side), original


def fitted(image: Image.Image, original: Tuple[int, int], max_side: Optional[int]) -> np.ndarray:
  """A loaded PIL image as [h, w, 3] uint8 RGB, downscaled to fit `max_side` where its
  `original` (H, W) size is larger (the image may be a reduced-scale decode of it)."""
  if max_side and max(image.size) > max_side:
    image = _resize_to_fit(image, original, max_side)
  return _to_rgb(image)


def image_from_array(pixels: np.ndarray) -> Image.Image:
  """uint8 pixels [h, w] (grey), [h, w, 1], [h, w, 3] (RGB) or [h, w, 4] (RGBA) as a PIL
  image, which `fitted` treats as it treats a decoded file of those pixels."""
  pixels = np.asarray(pixels)
  if pixels.dtype != np.uint8:
    hint = (' (values in [0, 1]? multiply by 255 first)'
            if pixels.dtype.kind == 'f' and pixels.size and np.nanmax(pixels) <= 1 else '')
    raise ValueError(f'expected uint8 pixels (0-255), got {pixels.dtype}{hint}')
  if pixels.ndim == 3 and pixels.shape[2] == 1:
    pixels = pixels[..., 0]
  mode = {2: 'L'}.get(pixels.ndim) or {3: 'RGB', 4: 'RGBA'}.get(
      pixels.shape[2] if pixels.ndim == 3 else 0)
  if mode is None or 0 in pixels.shape[:2]:
    raise ValueError(f'expected an image [height, width], [height, width, 3] or [height, '
                     f'width, 4], got shape {pixels.shape}')
  return Image.fromarray(np.ascontiguousarray(pixels))  # mode L, RGB or RGBA


def load_rgb_image(path: str) -> Image.Image:
  """An image file as a PIL image of mode RGB: `load_rgb`'s pixels in Pillow's memory, which
  `writable_pixels` can hand out (the overlay is blended there and encoded with no copy).

  Sets Pillow to allocate each image in one block from then on in this process
  (`Image.core.set_use_block_allocator`; by default an image above 16 MB, a 4 MP photo, is
  a chain of blocks, which Pillow's Arrow export refuses).
  """
  use_one_block = getattr(Image.core, 'set_use_block_allocator', None)
  if use_one_block is not None:
    use_one_block(1)
  image, _ = _decoded(path)
  return image if image.mode == 'RGB' else Image.fromarray(_to_rgb(image))


@functools.lru_cache(maxsize=1)
def heif_support() -> bool:
  """Whether Pillow opens HEIC/HEIF files (iPhones' photos) here: pillow-heif's opener,
  registered on first call."""
  try:
    import pillow_heif
  except ImportError:
    return False
  pillow_heif.register_heif_opener()
  return True


def _open(path: str) -> Image.Image:
  """Image.open, with HEIC/HEIF files through pillow-heif (an error that says to install it
  where it is missing)."""
  if not heif_support() and path.lower().endswith(HEIF_EXTENSIONS):
    raise ValueError('a HEIC/HEIF image needs pillow-heif (pip install -r requirements.txt)')
  return Image.open(path)


def _decoded(path: str, max_side: Optional[int] = None,
             profile=NO_PROFILE) -> Tuple[Image.Image, Tuple[int, int]]:
  """(the file's pixels as a loaded PIL image, EXIF orientation applied, (H, W) original
  size); a JPEG larger than `max_side` decoded at a reduced scale that still covers it, a
  HEIC's thumbnail taken where one does."""
  if os.path.getsize(path) == 0:
    raise ValueError('empty file (0 bytes)')
  with _open(path) as image:
    width, height = image.size
    try:
      orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # unreadable EXIF: the pixels are still good, take them as stored
      orientation = 1
    if orientation in (5, 6, 7, 8):  # turned by 90 or 270 degrees
      width, height = height, width
    if max_side and max(width, height) > max_side and image.format in ('JPEG', 'HEIF'):
      # A JPEG decoded at 1/2, 1/4 or 1/8 scale, a HEIC's embedded thumbnail (pillow-heif's
      # draft: a scaled copy), where that still covers the target size.
      scale = max_side / max(width, height)
      image.draft(image.mode, (max(1, int(image.size[0] * scale)),
                               max(1, int(image.size[1] * scale))))
    with profile.stage('decode'):
      image.load()  # decode errors (truncated, corrupt) happen here
      oriented = ImageOps.exif_transpose(image) if orientation in range(2, 9) else image
    return oriented, (height, width)


class _ArrowSchema(ctypes.Structure):
  pass


_ArrowSchema._fields_ = [  # the Arrow C data interface's ArrowSchema
    ('format', ctypes.c_char_p), ('name', ctypes.c_char_p), ('metadata', ctypes.c_char_p),
    ('flags', ctypes.c_int64), ('n_children', ctypes.c_int64),
    ('children', ctypes.POINTER(ctypes.POINTER(_ArrowSchema))),
    ('dictionary', ctypes.c_void_p), ('release', ctypes.c_void_p),
    ('private_data', ctypes.c_void_p)]


class _ArrowArray(ctypes.Structure):
  pass


_ArrowArray._fields_ = [  # and its ArrowArray
    ('length', ctypes.c_int64), ('null_count', ctypes.c_int64), ('offset', ctypes.c_int64),
    ('n_buffers', ctypes.c_int64), ('n_children', ctypes.c_int64),
    ('buffers', ctypes.POINTER(ctypes.c_void_p)),
    ('children', ctypes.POINTER(ctypes.POINTER(_ArrowArray))),
    ('dictionary', ctypes.c_void_p), ('release', ctypes.c_void_p),
    ('private_data', ctypes.c_void_p)]


def _capsule_pointer(capsule, name: bytes) -> int:
  get = ctypes.pythonapi.PyCapsule_GetPointer
  get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
  return get(capsule, name)


def writable_pixels(image: Image.Image) -> Optional[np.ndarray]:
  """[h, w, 3] uint8, a view of an RGB image's own pixels (Pillow keeps 4 bytes a pixel:
  strides (4 w, 4, 1)), through Pillow's Arrow export; writing it changes the image. None
  where Pillow does not hand them out (not RGB, rows not in one block, no Arrow export).
  The view keeps the export (and so the memory) alive; the image must not be changed
  through Pillow while it is used."""
  if image.mode != 'RGB' or not hasattr(image, '__arrow_c_array__'):
    return None
  try:
    schema_capsule, array_capsule = image.__arrow_c_array__()
  except ValueError:  # rows not contiguous (a chain of blocks)
    return None
  schema = _ArrowSchema.from_address(_capsule_pointer(schema_capsule, b'arrow_schema'))
  array = _ArrowArray.from_address(_capsule_pointer(array_capsule, b'arrow_array'))
  width, height = image.size
  if (schema.format != b'+w:4' or schema.n_children != 1 or
      schema.children[0].contents.format != b'C' or array.n_children != 1 or
      array.length != width * height or array.offset != 0):
    return None
  values = array.children[0].contents
  if values.n_buffers != 2 or values.offset != 0 or values.length != 4 * width * height or \
      not values.buffers[1]:
    return None
  memory = (ctypes.c_uint8 * values.length).from_address(values.buffers[1])
  memory.export = (schema_capsule, array_capsule, image)  # alive as long as the view
  return np.frombuffer(memory, np.uint8).reshape(height, width, 4)[..., :3]


def _resize_to_fit(image: Image.Image, original: Tuple[int, int], max_side: int) -> Image.Image:
  h, w = original
  scale = max_side / max(h, w)
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  if image.mode not in ('RGB', 'RGBA', 'L', 'LA'):
    image = Image.fromarray(_to_rgb(image))
  return image.resize(size, Image.Resampling.BILINEAR)

