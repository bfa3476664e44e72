"""Class names, the PASCAL VOC colour map and class maps drawn in it (no TensorFlow: used by
eval and predict)."""

from typing import List

import numpy as np

VOC_CLASS_NAMES = (
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat',
    'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant',
    'sheep', 'sofa', 'train', 'tvmonitor')

# The embedded dataset's 20 object classes: every colour family with every texture.
EMBEDDED_COLOURS = ('red', 'yellow', 'green', 'cyan', 'violet')
EMBEDDED_TEXTURES = ('solid', 'stripes', 'checker', 'dots')
EMBEDDED_CLASS_NAMES = ('background',) + tuple(
    f'{colour}-{texture}' for colour in EMBEDDED_COLOURS for texture in EMBEDDED_TEXTURES)


def parse_names(text: str) -> List[str]:
  """config.data.class_names (comma-separated) as a list ([] for '')."""
  return [name.strip() for name in text.split(',')] if text.strip() else []


def class_names(dataset: str, num_classes: int, given: str = '') -> List[str]:
  """Human-readable names for `num_classes` classes of `dataset` (ids if unknown); `given`
  (config.data.class_names) first."""
  names = parse_names(given) or (
      EMBEDDED_CLASS_NAMES if dataset == 'embedded' else
      VOC_CLASS_NAMES if dataset in ('voc2012', 'train_aug') else ())
  if len(names) != num_classes:
    return [str(i) for i in range(num_classes)]
  return list(names)


def parse_colours(text: str) -> List[tuple]:
  """config.data.class_colours ('r,g,b;r,g,b;...', one per class) as (r, g, b) tuples ([] for
  ''); ValueError for anything else."""
  if not text.strip():
    return []
  colours = []
  for part in text.split(';'):
    try:
      rgb = tuple(int(v) for v in part.split(','))
    except ValueError:
      rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
      raise ValueError(f'config.data.class_colours: {part.strip()!r} is not a colour r,g,b '
                       '(0..255 each; colours separated by ;)')
    colours.append(rgb)
  return colours


def palette(class_colours: str = '') -> np.ndarray:
  """[256, 3] uint8: the VOC colour map with the classes' own colours (config.data.
  class_colours, e.g. a folder's labelmap.txt) in place of the first ones."""
  table = voc_colormap()
  colours = parse_colours(class_colours)
  if colours:
    table[:len(colours)] = colours
  return table


def voc_colormap(size: int = 256) -> np.ndarray:
  """The PASCAL VOC palette: [size, 3] uint8, class i's colour from the bits of i."""
  cmap = np.zeros((size, 3), np.uint8)
  for i in range(size):
    c, r, g, b = i, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    cmap[i] = (r, g, b)
  return cmap


def colorize(labels: np.ndarray, ignore_label: int = 255, class_colours: str = '') -> np.ndarray:
  """labels [..., h, w] int -> [..., h, w, 3] uint8 in the VOC colours, or the classes' own
  (config.data.class_colours), void white."""
  cmap = palette(class_colours)
  cmap[ignore_label] = 255
  return cmap[np.asarray(labels, np.int64) % 256]


def example_panels(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                   ignore_label: int = 255, class_colours: str = '') -> np.ndarray:
  """Side-by-side image | true mask | predicted mask.

  Args:
    images: [n, h, w, 3] float in [0, 255].
    labels, predictions: [n, h, w] class indices (labels may hold ignore_label).

  Returns:
    [n, h, 3 * w, 3] uint8.
  """
  image = np.clip(np.asarray(images), 0, 255).astype(np.uint8)
  return np.concatenate([image, colorize(labels, ignore_label, class_colours),
                         colorize(predictions, ignore_label, class_colours)], axis=2)
