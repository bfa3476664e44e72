"""PNG files written strip by strip: the masks of large photos without full-size copies.

Pillow encodes a PNG from a whole image (the RGB colour mask of a 48 MP photo is 144 MB) and
tries every row filter at its default level 6. A mask is long runs of one value, and most rows
repeat the row above, so here every row uses PNG's 'Up' filter (the byte difference to the
row above: zeros where the mask does not change) and zlib runs with its run-length strategy
(ZLIB_STRATEGY, Z_RLE: matches of the previous byte only, which is what such rows hold; a
third of the bytes of level 1's default strategy in the same time, as small as level 6:
docs/predict.md). zlib releases the GIL, so the writer threads encode at once.

`MaskPngWriter` writes the same two images of a class map (its palette PNG and the RGB PNG
of its colours) from the class indices alone, in the project's kernel library
(seg/inference/mask_png.h: runs of unchanged pixels found 32 at a time and written as
deflate copies in blocks of Huffman codes fitted to each strip; no RGB copy of the mask), where that
library runs (`kernel()`); zlib decodes it (the files are ordinary PNGs).
"""

import ctypes
import struct
import zlib
from typing import BinaryIO, Optional

import numpy as np

ZLIB_LEVEL = 1        # docs/predict.md: levels, strategies and Pillow's encoder on 12 MP masks
ZLIB_STRATEGY = zlib.Z_RLE
CHUNK_BYTES = 1 << 20  # compressed bytes per IDAT chunk
_SIGNATURE = b'\x89PNG\r\n\x1a\n'
_UP = 2               # PNG filter type 'Up'


def _chunk(kind: bytes, data: bytes) -> bytes:
  return (struct.pack('>I', len(data)) + kind + data +
          struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff))


class _PngFile:
  """The chunks of an 8-bit palette (`palette` [256, 3]) or RGB (None) PNG of `height` rows:
  signature, IHDR and PLTE at once, the deflated rows (`_emit`) in IDAT chunks of about
  CHUNK_BYTES, IEND (`_end`)."""

  def __init__(self, file: BinaryIO, width: int, height: int, palette: Optional[np.ndarray]):
    self.file, self.width, self.height = file, width, height
    self.channels = 1 if palette is not None else 3
    self.rows_written = 0
    self._pending = []
    self._pending_bytes = 0
    colour_type = 3 if palette is not None else 2
    file.write(_SIGNATURE)
    file.write(_chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, colour_type, 0, 0, 0)))
    if palette is not None:
      file.write(_chunk(b'PLTE', np.asarray(palette, np.uint8).reshape(-1).tobytes()))

  def _emit(self, data: bytes, final: bool = False) -> None:
    if data:
      self._pending.append(data)
      self._pending_bytes += len(data)
    if self._pending_bytes >= CHUNK_BYTES or (final and self._pending):
      self.file.write(_chunk(b'IDAT', b''.join(self._pending)))
      self._pending, self._pending_bytes = [], 0

  def _check_complete(self) -> None:
    if self.rows_written != self.height:
      raise ValueError(f'{self.rows_written} rows written of {self.height}')

  def _end(self, last: bytes) -> None:
    """The last deflated bytes, then IEND."""
    self._emit(last, final=True)
    self.file.write(_chunk(b'IEND', b''))


class PngWriter(_PngFile):
  """An 8-bit palette ([h, w] rows) or RGB ([h, w, 3] rows) PNG written row strip by strip.

      with open(path, 'wb') as f:
        png = PngWriter(f, width, height, palette=colormap)   # palette: [256, 3] uint8
        for strip in strips: png.write(strip)
        png.close()
  """

  def __init__(self, file: BinaryIO, width: int, height: int,
               palette: Optional[np.ndarray] = None, level: int = ZLIB_LEVEL,
               strategy: int = ZLIB_STRATEGY):
    super().__init__(file, width, height, palette)
    self._previous = np.zeros((width * self.channels,), np.uint8)
    self._zlib = zlib.compressobj(level, zlib.DEFLATED, zlib.MAX_WBITS, 8, strategy)

  def write(self, rows: np.ndarray) -> None:
    """The next rows: [r, width] uint8 (palette) or [r, width, 3] uint8 (RGB), any strides
    (an RGB view of 4-byte pixels, say: the filter reads it in place)."""
    rows = np.asarray(rows)
    if rows.dtype != np.uint8:
      raise ValueError(f'rows of {rows.dtype}, expected uint8')
    shape = (self.width,) if self.channels == 1 else (self.width, 3)
    if rows.shape[1:] != shape:
      raise ValueError(f'rows of shape {rows.shape[1:]}, expected {shape}')
    filtered = np.empty((len(rows), self.width * self.channels + 1), np.uint8)
    filtered[:, 0] = _UP
    body = np.reshape(filtered[:, 1:], (len(rows), *shape), copy=False)  # after each type byte
    np.subtract(rows[0], self._previous.reshape(shape), out=body[0])
    np.subtract(rows[1:], rows[:-1], out=body[1:])
    self._previous = np.array(rows[-1]).reshape(-1)
    self.rows_written += len(rows)
    self._emit(self._zlib.compress(filtered))  # zlib reads the buffer: no bytes copy

  def close(self) -> None:
    """Ends the file (every row must have been written)."""
    self._check_complete()
    self._end(self._zlib.flush())


def kernel() -> bool:
  """Whether `MaskPngWriter` runs here: SEG_MASK_PNG ('kernel' or 'zlib'; default 'kernel'
  where the project's kernel library runs: x86-64 with AVX2 and FMA and a C++ compiler)."""
  from seg.inference import cpu_features, int8_kernel
  asked = cpu_features.mask_png_override()
  if asked == 'zlib':
    return False
  if not int8_kernel.available():
    if asked == 'kernel':
      raise RuntimeError(f'SEG_MASK_PNG=kernel, but the kernel library is unavailable: '
                         f'{int8_kernel.unavailable_reason()}')
    return False
  return True


def library():
  """The kernel library (ctypes) that writes masks and overlays (`MaskPngWriter`,
  `seg.predict.outputs.overlay`); RuntimeError where it is unavailable."""
  from seg.inference import int8_kernel
  if not int8_kernel.available():
    raise RuntimeError(f'the kernel library is unavailable: {int8_kernel.unavailable_reason()}')
  lib = int8_kernel._state['lib']
  lib.SegMaskDeflate.restype = ctypes.c_int64
  return lib


def pointer(array: Optional[np.ndarray]):
  """A NumPy array's data for the library's functions (None: a null pointer)."""
  return None if array is None else array.ctypes.data_as(ctypes.c_void_p)


class MaskPngWriter(_PngFile):
  """A class map's palette PNG (`colour` False: its indices, `palette` [256, 3] as PLTE) or
  its RGB PNG (True: palette[index] per pixel), written strip by strip from [r, width] uint8
  class indices in the kernel library (`kernel()` must be True): the images PngWriter
  writes from the same rows (or from their colours), deflated differently.

      png = MaskPngWriter(f, width, height, colormap, colour=False)
      for strip in strips: png.write(strip)
      png.close()
  """

  def __init__(self, file: BinaryIO, width: int, height: int, palette: np.ndarray,
               colour: bool):
    palette = np.ascontiguousarray(palette, np.uint8)
    if palette.shape != (256, 3):
      raise ValueError(f'palette of shape {palette.shape}, expected (256, 3)')
    self._deflate = library().SegMaskDeflate
    super().__init__(file, width, height, None if colour else palette)
    self._colours = palette.reshape(-1) if colour else None
    self._state = np.zeros(4, np.uint64)
    self._above = None  # the last row written

  def write(self, rows: np.ndarray) -> None:
    """The next rows: [r, width] uint8 class indices (rows may be a strided view)."""
    rows = np.asarray(rows)
    if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != self.width:
      raise ValueError(f'rows of {rows.dtype} {rows.shape}, expected uint8 [r, {self.width}]')
    if self.rows_written + len(rows) > self.height:
      raise ValueError(f'{self.rows_written + len(rows)} rows for a PNG of {self.height}')
    if not len(rows):
      return
    rows = np.ascontiguousarray(rows) if rows.strides[1] != 1 else rows
    self._emit(self._call(rows, start=self.rows_written == 0, finish=False))
    self.rows_written += len(rows)
    self._above = np.array(rows[-1])

  def close(self) -> None:
    """Ends the file (every row must have been written)."""
    self._check_complete()
    self._end(self._call(np.zeros((0, self.width), np.uint8), start=self.height == 0,
                         finish=True))

  def _call(self, rows: np.ndarray, start: bool, finish: bool) -> bytes:
    # mask_png.h, MaxBytes: the bytes Deflate may write.
    out = np.empty(2 + (15 * len(rows) * (1 + 3 * self.width) + 2200) // 8 + 16, np.uint8)
    written = self._deflate(
        pointer(self._state), pointer(rows), pointer(self._above), ctypes.c_int64(len(rows)),
        ctypes.c_int64(self.width), ctypes.c_int64(rows.strides[0]), pointer(self._colours),
        ctypes.c_int(start), ctypes.c_int(finish), pointer(out))
    return out[:written].tobytes()
