"""Class maps at an image's original size from the logits of its downscaled copy.

A large image is predicted downscaled (`seg.predict.images`): the network gives logits on the
feature grid of the padded canvas (`Engine.features`, [fh, fw, classes], output stride 16 or
8), which the model itself would upsample to the canvas with aligned corners
(`seg.model.layers.resize_bilinear`). Here the same rule (`align_corners_taps`) takes them in
one step to the original size: original pixel Y of H lies at Y * (h - 1) / (H - 1) in the
h-pixel downscaled image (corners to corners), which lies at that times (fh - 1) / (Hc - 1) on
the feature grid of the Hc-pixel canvas. For an image that was not downscaled this is exactly
the model's own upsampling, cropped.

The mask is the argmax of those upsampled logits, computed without upsampling every class at
every pixel (`class_map`): the argmax is first taken on a grid of every BLOCK-th row and
column; a block inside one feature cell whose four corners agree takes their class, and the
other blocks (along class boundaries and feature-cell lines) are computed pixel by pixel.
That is exact, not an approximation: inside a cell the logits are bilinear in (row, column),
so is the difference of two classes, and a bilinear function is smallest at a corner of any
rectangle, so the class that wins at the four corners wins everywhere in between.
"""

from typing import Iterator, Tuple

import numpy as np

from seg.model.layers import align_corners_taps

BLOCK = 8               # rows and columns between exactly computed samples
PIXELS_AT_ONCE = 1 << 16  # pixels of mixed blocks computed together: temporaries of ~10 MB


def feature_positions(original: int, resized: int, canvas: int,
                      features: int) -> Tuple[np.ndarray, np.ndarray]:
  """(lo, frac) taps of each of `original` pixels on the feature axis of `features` cells.

  original -> resized with corners aligned, resized pixels -> features as the model
  upsamples its canvas (feature f at canvas pixel f * (canvas - 1) / (features - 1)).
  """
  scale = (features - 1) / (canvas - 1) if canvas > 1 else 0.0
  return align_corners_taps(original, features, span=(resized - 1) * scale)


def _rows(features: np.ndarray, taps: Tuple[np.ndarray, np.ndarray]) -> np.ndarray:
  """features [fh, fw, C] interpolated at rows `taps` -> [len, fw, C] float32."""
  lo, frac = taps
  hi = np.minimum(lo + 1, features.shape[0] - 1)
  t = frac[:, None, None]
  return features[lo] * (1 - t) + features[hi] * t


def _interpolate(rows: np.ndarray, taps: Tuple[np.ndarray, np.ndarray]) -> np.ndarray:
  """rows [n, fw, C] interpolated along axis 1 at `taps` -> [n, len, C]."""
  lo, frac = taps
  hi = np.minimum(lo + 1, rows.shape[1] - 1)
  t = frac[None, :, None]
  return rows[:, lo] * (1 - t) + rows[:, hi] * t


def upsampled_logits(features: np.ndarray, row_taps, col_taps, row0: int,
                     row1: int) -> np.ndarray:
  """Rows [row0, row1) of the logits at the original size: [row1 - row0, W, C] float32."""
  strip = (row_taps[0][row0:row1], row_taps[1][row0:row1])
  return _interpolate(_rows(features, strip), col_taps)


def class_map(features: np.ndarray, original: Tuple[int, int], resized: Tuple[int, int],
              canvas: Tuple[int, int], block: int = BLOCK) -> np.ndarray:
  """argmax of the logits upsampled to `original` (module docstring): [H, W] uint8.

  features: [fh, fw, C] logits on the canvas's feature grid; original (H, W), resized
  (h, w) and canvas (Hc, Wc) sizes. block=1 computes every pixel exactly.
  """
  features = np.asarray(features, np.float32)
  height, width = original
  row_taps = feature_positions(height, resized[0], canvas[0], features.shape[0])
  col_taps = feature_positions(width, resized[1], canvas[1], features.shape[1])
  # Exact classes on the sample grid: rows and columns 0, block, 2 block, ..., and the last.
  sample_y = np.unique(np.append(np.arange(0, height, block), height - 1))
  sample_x = np.unique(np.append(np.arange(0, width, block), width - 1))
  pick = lambda taps, at: (taps[0][at], taps[1][at])
  grid = _interpolate(_rows(features, pick(row_taps, sample_y)),
                      pick(col_taps, sample_x)).argmax(-1).astype(np.uint8)
  # Block (i, j) covers rows [i * block, (i + 1) * block) (cut at the last row) and the
  # columns alike; its corners are samples i, i + 1 (the last sample if there is no i + 1).
  nby, nbx = -(-height // block), -(-width // block)
  below = np.minimum(np.arange(1, nby + 1), len(sample_y) - 1)
  right = np.minimum(np.arange(1, nbx + 1), len(sample_x) - 1)
  corner = grid[:nby, :nbx]
  same = ((corner == grid[below][:, :nbx]) & (corner == grid[:nby][:, right]) &
          (corner == grid[below][:, right]))
  # Within one feature cell the logits are bilinear in (row, column), and so is the gap
  # between any two classes: its minimum over a block lies at a corner, so a class that wins
  # at all four corners wins in the whole block. A block across a cell boundary is computed.
  same &= ~_crosses_cell(row_taps, block, sample_y[below])[:, None]
  same &= ~_crosses_cell(col_taps, block, sample_x[right])[None, :]
  mask = np.repeat(np.repeat(corner, block, 0)[:height], block, 1)[:, :width]
  mixed = np.argwhere(~same)
  if len(mixed):
    _fill_exact(mask, features, row_taps, col_taps, mixed, block)
  return mask


def _crosses_cell(taps, block: int, far_corners: np.ndarray) -> np.ndarray:
  """[blocks] bool: the block from pixel i * block to its far corner spans two feature cells."""
  lo, frac = taps
  first = np.arange(len(far_corners)) * block
  far = lo[far_corners].astype(np.float64) + frac[far_corners]
  return far > lo[first] + 1 + 1e-6


def _fill_exact(mask: np.ndarray, features: np.ndarray, row_taps, col_taps,
                blocks: np.ndarray, block: int) -> None:
  """Writes the exact argmax into every pixel of `blocks` ([n, 2] block indices)."""
  height, width = mask.shape
  offsets = np.arange(block)
  per_chunk = max(1, PIXELS_AT_ONCE // (block * block))
  for start in range(0, len(blocks), per_chunk):
    chunk = blocks[start:start + per_chunk]
    ys = np.minimum(chunk[:, 0, None] * block + offsets, height - 1)  # [n, block]
    xs = np.minimum(chunk[:, 1, None] * block + offsets, width - 1)
    rows = _rows(features, (row_taps[0][ys.ravel()], row_taps[1][ys.ravel()]))
    rows = rows.reshape(len(chunk), block, *rows.shape[1:])  # [n, block, fw, C]
    lo, frac = col_taps[0][xs], col_taps[1][xs]              # [n, block]
    hi = np.minimum(lo + 1, features.shape[1] - 1)
    n = np.arange(len(chunk))[:, None, None]
    t = frac[:, None, :, None]
    values = (rows[n, np.arange(block)[None, :, None], lo[:, None, :]] * (1 - t) +
              rows[n, np.arange(block)[None, :, None], hi[:, None, :]] * t)  # [n, b, b, C]
    mask[ys[:, :, None], xs[:, None, :]] = values.argmax(-1)


def strips(features: np.ndarray, original: Tuple[int, int], resized: Tuple[int, int],
           canvas: Tuple[int, int], rows: int = 64) -> Iterator[Tuple[int, np.ndarray]]:
  """(row0, logits [r, W, C]) strip by strip at the original size: for probability files."""
  features = np.asarray(features, np.float32)
  row_taps = feature_positions(original[0], resized[0], canvas[0], features.shape[0])
  col_taps = feature_positions(original[1], resized[1], canvas[1], features.shape[1])
  for row0 in range(0, original[0], rows):
    yield row0, upsampled_logits(features, row_taps, col_taps, row0,
                                 min(row0 + rows, original[0]))
