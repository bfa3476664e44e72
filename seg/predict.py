"""Mask generation for images and folders of images.

For every input image this writes, under the output folder and mirroring
the input's relative path:
  NAME.png          class indices as a palette PNG of the input's size (VOC's format)
  NAME_overlay.jpg  the image blended with the colour-coded classes

Images are padded exactly as evaluation pads them (mean pixel, bottom and
right, to `eval_size` or the next size bucket), so that a val image gets
here the same mask that `eval` scores.
"""

import os
import time
from typing import Iterator, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

from seg import checkpoint
from seg.classes import voc_colormap
from seg.model import MEAN_PIXEL, create_model, preprocess

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm')
BUCKET = 64            # larger images are padded up to a multiple of this (+1)
OVERLAY_ALPHA = 0.5


def bucket_shape(height: int, width: int, eval_size: int) -> Tuple[int, int]:
  """The padded input shape for an image: eval_size square, or the next bucket.

  Sizes of the form k * 64 + 1 keep the aligned-corner resizes on the output
  stride grid and bound the number of compiled shapes.
  """
  if max(height, width) <= eval_size:
    return eval_size, eval_size
  up = lambda n: -(-(n - 1) // BUCKET) * BUCKET + 1
  return max(up(height), eval_size), max(up(width), eval_size)


class Predictor:
  """Class maps for uint8 RGB images of any size, one compiled function per shape bucket."""

  def __init__(self, model, variables, eval_size: int):
    self.variables = variables
    self.eval_size = eval_size
    self._forward = jax.jit(lambda v, x: jnp.argmax(
        model.apply(v, preprocess(x), train=False), axis=-1).astype(jnp.uint8))

  def __call__(self, image: np.ndarray) -> np.ndarray:
    """image: [height, width, 3] uint8 -> [height, width] uint8 class ids."""
    h, w = image.shape[:2]
    ph, pw = bucket_shape(h, w, self.eval_size)
    padded = np.full((1, ph, pw, 3), MEAN_PIXEL, np.float32)
    padded[0, :h, :w] = image
    return np.asarray(self._forward(self.variables, padded))[0, :h, :w]


def find_images(path: str) -> List[Tuple[str, str]]:
  """(file, path relative to the input root) for an image file or a folder, recursively."""
  if os.path.isfile(path):
    return [(path, os.path.basename(path))]
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path} is neither an image file nor a folder')
  found = []
  for root, dirs, files in os.walk(path):
    dirs.sort()
    for name in sorted(files):
      if name.lower().endswith(IMAGE_EXTENSIONS):
        full = os.path.join(root, name)
        found.append((full, os.path.relpath(full, path)))
  return found


def load_rgb(path: str) -> np.ndarray:
  """An image file as [height, width, 3] uint8 RGB, EXIF orientation applied."""
  with Image.open(path) as image:
    image = ImageOps.exif_transpose(image)
    return np.array(image.convert('RGB'))


def save_outputs(mask: np.ndarray, image: np.ndarray, stem: str) -> None:
  """Writes STEM.png (palette indices) and STEM_overlay.jpg."""
  os.makedirs(os.path.dirname(stem) or '.', exist_ok=True)
  cmap = voc_colormap()
  png = Image.fromarray(mask, mode='P')
  png.putpalette(cmap.reshape(-1).tolist())
  png.save(stem + '.png')
  colours = cmap[mask].astype(np.float32)
  alpha = np.where(mask[..., None] > 0, OVERLAY_ALPHA, 0.0)
  overlay = image.astype(np.float32) * (1 - alpha) + colours * alpha
  Image.fromarray(overlay.round().astype(np.uint8)).save(stem + '_overlay.jpg', quality=90)


def _check_output(input_path: str, output_dir: str) -> None:
  root = os.path.realpath(input_path if os.path.isdir(input_path) else
                          os.path.dirname(input_path) or '.')
  out = os.path.realpath(output_dir)
  if os.path.isdir(input_path) and (out == root or out.startswith(root + os.sep)):
    raise ValueError(f'output folder {output_dir} is inside the input folder {input_path}; '
                     'choose one outside it (inputs are never written to)')


def predict_paths(workdir: str, input_path: str, output_dir: str, log=print) -> int:
  """`main.py predict`: masks for every image under `input_path`; returns #failures."""
  _check_output(input_path, output_dir)
  config = checkpoint.load_config(workdir)
  model = create_model(config.model)
  variables, step = checkpoint.load_model_variables(workdir, model)
  predictor = Predictor(model, variables, config.data.eval_size)
  images = find_images(input_path)
  if not images:
    raise FileNotFoundError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) under {input_path}')
  log(f'{len(images)} image(s) from {input_path}, model of {workdir} at step {step}')
  failures, start = [], time.time()
  for path, relative in _progress(images, log):
    try:
      image = load_rgb(path)
      mask = predictor(image)
      save_outputs(mask, image, os.path.join(output_dir, os.path.splitext(relative)[0]))
    except Exception as e:  # a bad file is reported and skipped, never fatal to the run
      failures.append((path, f'{type(e).__name__}: {e}'))
  for path, reason in failures:
    log(f'FAILED {path}: {reason}')
  log(f'wrote masks of {len(images) - len(failures)} image(s) to {output_dir} in '
      f'{time.time() - start:.1f}s; {len(failures)} failed')
  return len(failures)


def _progress(items: list, log) -> Iterator:
  every = max(1, len(items) // 20)
  start = time.time()
  for i, item in enumerate(items):
    yield item
    done = i + 1
    if done % every == 0 or done == len(items):
      rate = done / max(time.time() - start, 1e-9)
      log(f'  {done}/{len(items)}  {rate:.1f} img/s  eta {(len(items) - done) / rate:.0f}s')
