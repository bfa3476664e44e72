"""Images with a side above `--max-side`: the two policies.

  resize  the image is downscaled (antialiased bilinear, Pillow, `seg.predict.images`) to fit
          `max_side`, predicted, and its logits are taken back to the original size with the
          model's aligned-corner rule (`seg.predict.upsampling`); the class map is their argmax
          (with several scales or flips: the canvas's averaged probabilities, and theirs)
  tile    the image is cut into `max_side` tiles overlapping by `TILE_OVERLAP` pixels; each
          pixel takes the prediction of the tile whose centre region holds it (every tile
          sees only its own context; with several scales or flips each tile is averaged on
          its own) (`predict_tiled`)
Either way the number of compiled shapes is that of images up to `max_side`.
"""

from typing import List, Optional, Tuple

import numpy as np

from seg.predict.options import TILE_OVERLAP
from seg.predict.outputs import OpenProbabilities

def softmax(logits: np.ndarray) -> np.ndarray:
  """[..., classes] float -> probabilities over the last axis, float32."""
  logits = logits.astype(np.float32)
  e = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def tile_starts(size: int, tile: int, overlap: int) -> Tuple[List[int], List[int]]:
  """Tile origins along one axis and the boundaries between the regions they own.

  Tile i owns [bounds[i], bounds[i + 1]): the middle of each overlap splits it.
  """
  if size <= tile:
    return [0], [0, size]
  stride = tile - overlap
  count = -(-(size - tile) // stride) + 1
  starts = [min(i * stride, size - tile) for i in range(count)]
  bounds = [0] + [(starts[i + 1] + starts[i] + tile) // 2 for i in range(count - 1)] + [size]
  return starts, bounds


def predict_tiled(engine, item, tile: int,
                  open_probabilities: Optional[OpenProbabilities] = None) -> None:
  """Fills item.mask tile by tile (see the module docstring); with `open_probabilities`,
  the probabilities too, into `item.prob_file` (`seg.predict.runner.complete`)."""
  height, width = item.image.shape[:2]
  rows, row_bounds = tile_starts(height, tile, TILE_OVERLAP)
  cols, col_bounds = tile_starts(width, tile, TILE_OVERLAP)
  want_probs = open_probabilities is not None
  item.mask = np.zeros((height, width), np.uint8)
  cells = [(i, j) for i in range(len(rows)) for j in range(len(cols))]
  for start in range(0, len(cells), engine.batch_size):
    batch = cells[start:start + engine.batch_size]
    crops = [item.image[rows[i]:rows[i] + tile, cols[j]:cols[j] + tile] for i, j in batch]
    if want_probs and getattr(engine, 'multi_scale', False):
      results = engine.probabilities(crops)   # averaged over scales and flips
    elif want_probs:
      results = [softmax(l) for l in engine.logits(crops)]
    else:
      results = engine.predict(crops)
    for (i, j), result in zip(batch, results):
      r0, r1 = row_bounds[i] - rows[i], row_bounds[i + 1] - rows[i]
      c0, c1 = col_bounds[j] - cols[j], col_bounds[j + 1] - cols[j]
      owned = result[r0:r1, c0:c1]
      if want_probs:
        if item.prob_file is None:
          item.prob_file = open_probabilities(result.shape[-1], height, width)
        item.prob_file.write(row_bounds[i], col_bounds[j], owned)
        owned = owned.argmax(axis=-1)
      item.mask[row_bounds[i]:row_bounds[i + 1], col_bounds[j]:col_bounds[j + 1]] = owned
