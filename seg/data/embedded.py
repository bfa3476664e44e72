"""The embedded dataset: synthetic scenes written in the exact PASCAL VOC 2012 layout.

Each image holds one to three objects over a smooth, low-saturation
background. An object's class is the pair (colour family, texture): five
colour families times four textures give 20 object classes, so colour alone
(shared by four classes) or texture alone (shared by five) never decides the
class. Shapes (ellipses, rotated rectangles, triangles, polygons, stars),
sizes, positions, texture periods and phases vary per object, objects overlap
(later ones occlude earlier ones), and a void band (255) is drawn along every
object boundary, as in VOC's annotations.

Generation is deterministic: image i of a split comes from a generator seeded
with (seed, split, i). Nothing here needs TensorFlow; the TFDS builder in
`seg.data.voc` reads the written files like real VOC.
"""

import colorsys
import os
from typing import Tuple

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from seg.classes import EMBEDDED_COLOURS, EMBEDDED_TEXTURES, voc_colormap

NUM_TRAIN = 600
NUM_VAL = 150
MIN_SIZE, MAX_SIZE = 96, 160     # image height and width, pixels
HUES = (0.0, 0.15, 0.33, 0.52, 0.76)   # centres of the colour families
HUE_JITTER = 0.04
SHAPES = ('ellipse', 'rectangle', 'triangle', 'polygon', 'star')
SPLIT_IDS = {'train': 0, 'val': 1}
IGNORE_LABEL = 255


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """A gradient between two grey-ish colours plus smooth blotches: [h, w, 3] float."""
  c0, c1 = (np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.35),
                                         rng.uniform(0.25, 0.95))) * 255 for _ in range(2))
  angle = rng.uniform(0, 2 * np.pi)
  yy, xx = np.mgrid[0:h, 0:w]
  t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)
  t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
  image = c0 * (1 - t[..., None]) + c1 * t[..., None]
  blotches = ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma=8)
  blotches /= max(np.abs(blotches).max(), 1e-6)
  return image + 30 * blotches[..., None]


def _shape_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """A random shape's boolean mask [h, w]."""
  size = rng.uniform(0.3, 0.75) * min(h, w)
  cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
  kind = SHAPES[rng.integers(len(SHAPES))]
  canvas = Image.new('L', (w, h), 0)
  draw = ImageDraw.Draw(canvas)
  if kind == 'ellipse':
    ry, rx = size / 2 * rng.uniform(0.5, 1.0), size / 2 * rng.uniform(0.5, 1.0)
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
  else:
    if kind == 'rectangle':
      corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * [rng.uniform(0.5, 1), 1]
      radii = np.hypot(corners[:, 0], corners[:, 1]) * size / 2.8
      angles = np.arctan2(corners[:, 1], corners[:, 0])
    elif kind == 'star':
      n = int(rng.integers(4, 7))
      radii = np.tile([size / 2, size / 5], n)
      angles = np.arange(2 * n) * np.pi / n
    else:
      n = 3 if kind == 'triangle' else int(rng.integers(5, 9))
      radii = np.full(n, size / 2) * rng.uniform(0.8, 1.0, n)
      angles = np.arange(n) * 2 * np.pi / n
    angles = angles + rng.uniform(0, 2 * np.pi)
    points = [(cx + r * np.cos(a), cy + r * np.sin(a)) for r, a in zip(radii, angles)]
    draw.polygon(points, fill=1)
  return np.array(canvas, bool)


def _texture(rng: np.random.Generator, h: int, w: int, texture: str,
             colour_family: int) -> np.ndarray:
  """An object's texture in its colour family: [h, w, 3] float."""
  hue = (HUES[colour_family] + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 1.0
  value = rng.uniform(0.65, 1.0)
  primary = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), value)) * 255
  secondary = primary * rng.uniform(0.3, 0.55)
  # Coarse enough to survive the encoder's early strides and a 0.5x random scale.
  period = rng.uniform(12, 20)
  yy, xx = np.mgrid[0:h, 0:w] + rng.uniform(0, period, size=(2, 1, 1))
  if texture == 'solid':
    pattern = np.zeros((h, w), bool)
  elif texture == 'stripes':   # horizontal or vertical
    pattern = ((yy if rng.random() < 0.5 else xx) // (period / 2)) % 2 == 1
  elif texture == 'checker':
    pattern = ((yy // (period / 2)) + (xx // (period / 2))) % 2 == 1
  elif texture == 'dots':
    dy, dx = yy % period - period / 2, xx % period - period / 2
    pattern = dy * dy + dx * dx < (period / 3) ** 2
  else:
    raise ValueError(texture)
  return np.where(pattern[..., None], secondary, primary)


def make_example(seed: int, split: str, index: int,
                 sizes: Tuple[int, int] = (MIN_SIZE, MAX_SIZE)) -> Tuple[np.ndarray, np.ndarray]:
  """One scene: (image [h, w, 3] uint8, label [h, w] uint8 with 255 boundary bands).

  Height and width are drawn from [sizes[0], sizes[1]].
  """
  rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
  h, w = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
  image = _background(rng, h, w)
  label = np.zeros((h, w), np.uint8)
  for _ in range(int(rng.integers(1, 4))):
    cls = int(rng.integers(1, len(EMBEDDED_COLOURS) * len(EMBEDDED_TEXTURES) + 1))
    colour_family, texture = divmod(cls - 1, len(EMBEDDED_TEXTURES))
    mask = _shape_mask(rng, h, w)
    image = np.where(mask[..., None],
                     _texture(rng, h, w, EMBEDDED_TEXTURES[texture], colour_family), image)
    label[mask] = cls
  image = image + rng.normal(0, 6, image.shape)
  boundary = ndimage.maximum_filter(label, 3) != ndimage.minimum_filter(label, 3)
  label[boundary] = IGNORE_LABEL
  return np.clip(image, 0, 255).astype(np.uint8), label


def write_voc_layout(root: str, seed: int = 0, num_train: int = NUM_TRAIN,
                     num_val: int = NUM_VAL, sizes: Tuple[int, int] = (MIN_SIZE, MAX_SIZE)) -> str:
  """Writes the dataset under `root/VOCdevkit/VOC2012`; returns that path.

  Writes into a temporary folder and renames it at the end, so an
  interrupted run never leaves a half-written dataset behind.
  """
  voc = os.path.join(root, 'VOCdevkit', 'VOC2012')
  if os.path.isdir(voc):
    return voc
  tmp = os.path.join(root, f'.VOCdevkit.tmp{os.getpid()}')
  for sub in ('JPEGImages', 'SegmentationClass', os.path.join('ImageSets', 'Segmentation')):
    os.makedirs(os.path.join(tmp, 'VOC2012', sub), exist_ok=True)
  palette = voc_colormap().reshape(-1).tolist()
  for split, count in (('train', num_train), ('val', num_val)):
    names = []
    for i in range(count):
      name = f'{split}_{i:05d}'
      image, label = make_example(seed, split, i, sizes)
      Image.fromarray(image).save(os.path.join(tmp, 'VOC2012', 'JPEGImages', name + '.jpg'),
                                  quality=90)
      png = Image.fromarray(label, mode='P')
      png.putpalette(palette)
      png.save(os.path.join(tmp, 'VOC2012', 'SegmentationClass', name + '.png'))
      names.append(name)
    with open(os.path.join(tmp, 'VOC2012', 'ImageSets', 'Segmentation', split + '.txt'),
              'w') as f:
      f.write('\n'.join(names) + '\n')
  os.rename(tmp, os.path.join(root, 'VOCdevkit'))
  return voc
