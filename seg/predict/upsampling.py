"""Class maps at an image's original size from the logits of its downscaled copy.

A large image is predicted downscaled (`seg.predict.images`): the network gives logits on the
feature grid of the padded canvas (`Engine.features`, [fh, fw, classes], output stride 16 or
8), which the model itself would upsample to the canvas with aligned corners
(`seg.model.layers.resize_bilinear`). Here the same rule (`align_corners_taps`) takes them in
one step to the original size: original pixel Y of H lies at Y * (h - 1) / (H - 1) in the
h-pixel downscaled image (corners to corners), which lies at that times (fh - 1) / (Hc - 1) on
the feature grid of the Hc-pixel canvas. For an image that was not downscaled this is exactly
the model's own upsampling, cropped. With several scales or flips (`predict --scales`) the
engine gives the averaged probabilities of the whole canvas instead (one grid cell per canvas
pixel: fh = Hc), and the same rule takes them to the original size.

The mask is the argmax of those upsampled logits, computed without upsampling every class at
every pixel (`class_map`): the argmax is first taken on a grid of every BLOCK-th row and
column and of the rows and columns on both sides of every feature-cell line, so that every
block between grid lines lies in one feature cell; a block whose four corners agree takes
their class, and the other blocks (along class boundaries) are computed pixel by pixel.
That is exact, not an approximation: inside a cell the logits are bilinear in (row, column),
so is the difference of two classes, and a bilinear function is smallest at a corner of any
rectangle, so the class that wins at the four corners wins everywhere in between.

On x86 CPUs where the project's kernels run (`seg.inference.float_kernel.available`), the
same blocks run in C++ (`float_kernel.class_map_blocks`, the GIL released), with this
module's rows-then-columns arithmetic at every pixel it computes; SEG_UPSAMPLE_ARGMAX=xla
keeps NumPy's.
"""

from typing import Iterator, Optional, Tuple

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


def _kernel_runs() -> bool:
  """Whether `class_map` runs in the project's kernel here (module docstring)."""
  from seg.inference import cpu_features, float_kernel
  return (cpu_features.upsample_argmax_override() != 'xla' and
          float_kernel.available(np.float32))


def class_map(features: np.ndarray, original: Tuple[int, int], resized: Tuple[int, int],
              canvas: Tuple[int, int], block: int = BLOCK,
              kernel: Optional[bool] = None) -> np.ndarray:
  """argmax of the logits upsampled to `original` (module docstring): [H, W] uint8.

  features: [fh, fw, C] logits on the canvas's feature grid; original (H, W), resized
  (h, w) and canvas (Hc, Wc) sizes. block=1 computes every pixel exactly. kernel: in the
  project's kernel (True), in NumPy (False), or the kernel where it runs (None).
  """
  features = np.asarray(features, np.float32)
  height, width = original
  row_taps = feature_positions(height, resized[0], canvas[0], features.shape[0])
  col_taps = feature_positions(width, resized[1], canvas[1], features.shape[1])
  if _kernel_runs() if kernel is None else kernel:
    from seg.inference import float_kernel
    return float_kernel.class_map_blocks(features, row_taps, col_taps, block)
  # Exact classes on the sample grid (`_samples`).
  sample_y, sample_x = _samples(row_taps, height, block), _samples(col_taps, width, block)
  grid = _grid_classes(features, _weights(row_taps, sample_y, features.shape[0]),
                       _weights(col_taps, sample_x, features.shape[1]))
  # Block (i, j) covers rows [sample_y[i], sample_y[i + 1]) and the columns alike; the last
  # sample row (column) is a block of its own. Its corners are samples i, i + 1 (i alone for
  # the last), all in one feature cell (`_samples`), where the logits are bilinear in (row,
  # column), and so is the gap between any two classes: its minimum over a block lies at a
  # corner, so a class that wins at all four corners wins in the whole block.
  below = np.minimum(np.arange(1, len(sample_y) + 1), len(sample_y) - 1)
  right = np.minimum(np.arange(1, len(sample_x) + 1), len(sample_x) - 1)
  same = (grid == grid[below]) & (grid == grid[:, right]) & (grid == grid[below][:, right])
  heights = np.diff(np.append(sample_y, height))
  widths = np.diff(np.append(sample_x, width))
  mask = np.repeat(np.repeat(grid, heights, 0), widths, 1)
  mixed = np.argwhere(~same)
  if len(mixed):
    _fill_exact(mask, features, row_taps, col_taps,
                (sample_y[mixed[:, 0]], heights[mixed[:, 0]]),
                (sample_x[mixed[:, 1]], widths[mixed[:, 1]]), block)
  return mask


def _weights(taps, at: np.ndarray, cells: int) -> np.ndarray:
  """[len(at), cells] float32: the interpolation weights of the pixels `at` (two per row)."""
  lo, frac = taps[0][at], taps[1][at]
  weights = np.zeros((len(at), cells), np.float32)
  rows = np.arange(len(at))
  weights[rows, lo] = 1 - frac
  weights[rows, np.minimum(lo + 1, cells - 1)] += frac
  return weights


def _grid_classes(features: np.ndarray, row_weights: np.ndarray,
                  col_weights: np.ndarray) -> np.ndarray:
  """argmax over classes of the logits at the sample grid: [ny, nx] uint8.

  Two matrix products ([ny, fh] x [fh, fw * C], then [ny, C, fw] x [fw, nx]) and a running
  maximum over the class planes: no [ny, nx, C] array reduced along its short last axis.
  """
  fh, fw, classes = features.shape
  rows = (row_weights @ features.reshape(fh, fw * classes)).reshape(-1, fw, classes)
  logits = np.ascontiguousarray(rows.transpose(0, 2, 1)) @ col_weights.T   # [ny, C, nx]
  best = logits[:, 0].copy()
  winner = np.zeros(best.shape, np.uint8)
  for c in range(1, classes):
    better = logits[:, c] > best   # ties keep the lower class, as argmax does
    winner[better] = c
    np.maximum(best, logits[:, c], out=best)
  return winner


def _samples(taps, size: int, block: int) -> np.ndarray:
  """Sample positions along one axis of `size` pixels: every `block`-th pixel, the last one,
  and the two pixels on either side of every feature-cell boundary (where the taps' cell
  changes). Between two samples more than one pixel apart, every pixel reads one cell."""
  lo = taps[0]
  boundary = np.flatnonzero(lo[1:] != lo[:-1])   # between pixels b and b + 1
  return np.unique(np.concatenate([np.arange(0, size, block), [size - 1],
                                   boundary, boundary + 1]))


def _fill_exact(mask: np.ndarray, features: np.ndarray, row_taps, col_taps,
                rows, cols, block: int) -> None:
  """Writes the exact argmax into every pixel of some blocks: rows = (first row, height) and
  cols = (first column, width) of each block, [n] each, no side above `block`."""
  offsets = np.arange(block)
  per_chunk = max(1, PIXELS_AT_ONCE // (block * block))
  for start in range(0, len(rows[0]), per_chunk):
    part = slice(start, start + per_chunk)
    # [n, block] pixel indices; a block smaller than `block` repeats its last row / column.
    ys = rows[0][part, None] + np.minimum(offsets, rows[1][part, None] - 1)
    xs = cols[0][part, None] + np.minimum(offsets, cols[1][part, None] - 1)
    n = len(ys)
    strip = _rows(features, (row_taps[0][ys.ravel()], row_taps[1][ys.ravel()]))
    strip = strip.reshape(n, block, *strip.shape[1:])       # [n, block, fw, C]
    lo, frac = col_taps[0][xs], col_taps[1][xs]             # [n, block]
    hi = np.minimum(lo + 1, features.shape[1] - 1)
    which = np.arange(n)[:, None, None]
    t = frac[:, None, :, None]
    values = (strip[which, offsets[None, :, None], lo[:, None, :]] * (1 - t) +
              strip[which, offsets[None, :, None], hi[:, None, :]] * t)  # [n, b, b, C]
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
