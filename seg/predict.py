"""Mask generation for many images: files, folders, globs and lists of paths.

For every input image this writes, under the output folder and mirroring the
input's relative path (see `collect_inputs`):
  NAME.png          class indices as a palette PNG of the input's size (VOC's format)
  NAME_color.png    the same classes as an RGB image in the VOC colours
  NAME_overlay.jpg  (--overlay) the image blended with the class colours
  NAME_prob.npy     (--probabilities) class probabilities [classes, height, width],
                    float16, or uint8 holding round(255 * p)

Every file is written to a temporary name and renamed when complete, so an
interrupted run never leaves a half-written output that a later run would
take as done; a run skips inputs whose outputs all exist (unless overwrite).

Images are padded exactly as evaluation pads them (mean pixel, bottom and
right, to `eval_size` or the next size bucket), so that a val image gets here
the same mask that `eval` scores. Images of one bucket are batched together.

Decoding and writing run on worker threads while the model runs on the main
thread. Memory stays bounded: decoded images wait under a byte budget, writes
under a bound on pending tasks, and images with a side above `max_side`
follow the large-image policy:
  resize  the image is downscaled (antialiased bilinear, PIL) to fit
          `max_side`, predicted, and its class probabilities are upsampled
          (bilinear, half-pixel centres) to the original size in strips of rows;
          the class map is their argmax
  tile    the image is cut into `max_side` tiles overlapping by `TILE_OVERLAP`
          pixels; each pixel takes the prediction of the tile whose centre
          region holds it (every tile sees only its own context)
Either way the number of compiled shapes is that of images up to `max_side`.

The model sits behind a narrow interface (`Segmenter`): a list of uint8 RGB
images in, class maps or logits out, and the shape bucket that decides which
images may share a batch. `seg.engine.Engine`, the compiled inference engine
that `eval` and `export` also use, implements it.
"""

import dataclasses
import functools
import glob as glob_lib
import os
import queue
import sys
import threading
import time
from concurrent import futures
from typing import Callable, Dict, Hashable, List, Optional, Protocol, Sequence, Tuple

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm')
LIST_EXTENSIONS = ('.txt', '.lst')
OVERLAY_ALPHA = 0.5
LARGE_IMAGE_POLICIES = ('resize', 'tile')
PROBABILITY_FORMATS = ('none', 'float16', 'uint8')
TILE_OVERLAP = 64            # pixels shared by neighbouring tiles (policy 'tile')
BYTES_IN_FLIGHT = 512 << 20  # decoded images waiting for the model or the writers
ROWS_PER_STRIP = 64          # rows upsampled at a time for resized large images
EXIF_ORIENTATION = 0x0112


# ----------------------------------------------------------------------------------------------
# The model behind a narrow interface.


class Segmenter(Protocol):
  """What mask generation needs from a model (`seg.engine.Engine`).

  images: a list of [h_i, w_i, 3] uint8 RGB arrays; images with equal
  `bucket(h, w)` are batched together by the caller.
  """
  batch_size: int = 1

  def bucket(self, height: int, width: int) -> Hashable:
    raise NotImplementedError

  def predict(self, images: Sequence[np.ndarray]) -> List[np.ndarray]:
    """Class ids [h_i, w_i] uint8 per image."""
    raise NotImplementedError

  def logits(self, images: Sequence[np.ndarray]) -> List[np.ndarray]:
    """Logits [h_i, w_i, classes] float32 per image."""
    raise NotImplementedError


def load_predictor(workdir: str, batch_size: int = 1, dtype: str = 'float32'):
  """(the inference engine for the latest checkpoint of `workdir`, its step)."""
  from seg import checkpoint
  from seg.engine import Engine
  from seg.model import create_model
  config = checkpoint.load_config(workdir)
  variables, step = checkpoint.load_model_variables(workdir, create_model(config.model))
  return Engine(config, variables, dtype=dtype, batch_size=batch_size), step


def softmax(logits: np.ndarray) -> np.ndarray:
  """[..., classes] float -> probabilities over the last axis, float32."""
  logits = logits.astype(np.float32)
  e = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# Inputs.


@dataclasses.dataclass
class InputFile:
  path: str       # as found (absolute for list entries)
  relative: str   # mirrored under the output folder
  error: str = ''  # set when the input cannot even be looked at (e.g. missing list entry)


def _is_glob(value: str) -> bool:
  return any(c in value for c in '*?[')


def _walk(folder: str) -> Tuple[List[str], int]:
  """Image files under `folder` (sorted, recursive) and the number of other files."""
  found, ignored = [], 0
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for name in sorted(files):
      if name.lower().endswith(IMAGE_EXTENSIONS):
        found.append(os.path.join(root, name))
      else:
        ignored += 1
  return found, ignored


def _relative_to_common(paths: Sequence[str]) -> List[InputFile]:
  if not paths:
    return []
  root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
  return [InputFile(p, os.path.relpath(os.path.abspath(p), root)) for p in paths]


def _resolve(value: str, base: str = '') -> Tuple[List[InputFile], List[str], int]:
  """One input value -> (files, folder roots, ignored non-image files in folders)."""
  path = os.path.join(base, os.path.expanduser(value))
  if os.path.isdir(path):
    files, ignored = _walk(path)
    return [InputFile(f, os.path.relpath(f, path)) for f in files], [path], ignored
  if os.path.isfile(path):
    if path.lower().endswith(LIST_EXTENSIONS) and not base:
      return _read_list(path)
    return [InputFile(path, os.path.basename(path))], [], 0
  if _is_glob(path):
    matches = sorted(glob_lib.glob(path, recursive=True))
    files, roots, ignored = [], [], 0
    for match in matches:
      if os.path.isdir(match):
        found, n = _walk(match)
        files += found
        ignored += n
      elif not match.lower().endswith(LIST_EXTENSIONS):
        files.append(match)
    if not files:
      raise FileNotFoundError(f'--input {value}: the pattern matches no file')
    return _relative_to_common(files), roots, ignored
  if base:  # a missing entry of a list is one failed input, not the end of the run
    return [InputFile(path, os.path.basename(path), 'not found')], [], 0
  raise FileNotFoundError(f'--input {value}: no such file, folder or pattern')


def _read_list(list_path: str) -> Tuple[List[InputFile], List[str], int]:
  """Entries of a list file; relative entries resolve against the list file's folder."""
  base = os.path.dirname(os.path.abspath(list_path))
  paths, missing, roots, ignored = [], [], [], 0
  with open(list_path, encoding='utf-8') as f:
    for line in f:
      entry = line.strip()
      if not entry or entry.startswith('#'):
        continue
      files, entry_roots, n = _resolve(entry, base)
      roots += entry_roots
      ignored += n
      for item in files:
        (missing if item.error else paths).append(item if item.error else item.path)
  return _relative_to_common(paths) + missing, roots, ignored


def collect_inputs(values: Sequence[str]) -> Tuple[List[InputFile], List[str], int]:
  """All image inputs named by `values`, each once: (files, folder roots, ignored files).

  A value is an image file, a folder (searched recursively for the extensions
  in IMAGE_EXTENSIONS), a glob pattern (`**` recurses), or a list file
  (.txt/.lst, one path, folder or pattern a line, `#` comments; relative
  entries resolve against the list file's folder). A value may be a comma
  list. Outputs mirror paths relative to a folder value, or, for files found
  through a pattern or a list, relative to the deepest folder holding all of
  them (a single file: its name).
  """
  result, roots, ignored, seen = [], [], 0, set()
  for value in values:
    parts = [value] if os.path.exists(value) else [v for v in value.split(',') if v]
    for part in parts:
      files, part_roots, n = _resolve(part)
      roots += part_roots
      ignored += n
      for item in files:
        key = os.path.realpath(item.path)
        if key not in seen:
          seen.add(key)
          result.append(item)
  return result, roots, ignored


def check_output_folder(inputs: Sequence[InputFile], roots: Sequence[str], output_dir: str):
  """Refuses an output folder inside an input folder, or one that holds an input file."""
  out = os.path.realpath(output_dir)
  inside = lambda path, folder: path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)
  for root in roots:
    if inside(out, os.path.realpath(root)):
      raise ValueError(f'output folder {output_dir} is inside the input folder {root}; '
                       'choose one outside it (inputs are never written to)')
  for item in inputs:
    if not item.error and inside(os.path.realpath(item.path), out):
      raise ValueError(f'input {item.path} lies inside the output folder {output_dir}; '
                       'choose an output folder that holds no input')


# ----------------------------------------------------------------------------------------------
# Jobs: one input and the outputs it should produce.


@dataclasses.dataclass
class Options:
  overwrite: bool = False
  overlay: bool = False
  probabilities: str = 'none'   # PROBABILITY_FORMATS
  large_images: str = 'resize'  # LARGE_IMAGE_POLICIES
  max_side: int = 2049
  workers: int = 2

  def __post_init__(self):
    if self.probabilities not in PROBABILITY_FORMATS:
      raise ValueError(f'probabilities must be one of {PROBABILITY_FORMATS}, '
                       f'got {self.probabilities!r}')
    if self.large_images not in LARGE_IMAGE_POLICIES:
      raise ValueError(f'large images policy must be one of {LARGE_IMAGE_POLICIES}, '
                       f'got {self.large_images!r}')
    if self.max_side < 2 * TILE_OVERLAP + 1 and self.large_images == 'tile':
      raise ValueError(f'max_side must exceed {2 * TILE_OVERLAP} to tile')
    if self.max_side < 1 or self.workers < 1:
      raise ValueError('max_side and workers must be positive')


def output_suffixes(options: Options) -> List[str]:
  suffixes = ['.png', '_color.png']
  if options.overlay:
    suffixes.append('_overlay.jpg')
  if options.probabilities != 'none':
    suffixes.append('_prob.npy')
  return suffixes


@dataclasses.dataclass
class Job:
  path: str
  stem: str           # output path without suffix
  error: str = ''

  def outputs(self, options: Options) -> List[str]:
    return [self.stem + s for s in output_suffixes(options)]

  def done(self, options: Options) -> bool:
    return all(os.path.exists(p) for p in self.outputs(options))


def plan_jobs(inputs: Sequence[InputFile], output_dir: str, options: Options) -> List[Job]:
  """One job per input; inputs whose outputs would collide get their extension in the name.

  `a.jpg` and `a.png` in one folder both map to `a.png`, as `a_color.png` maps
  onto `a.png`'s colour mask: such inputs write `a.jpg.png`, `a.png.png`, ...
  Collisions left after that fail those inputs with a reason.
  """
  jobs = [Job(i.path, os.path.join(output_dir, os.path.splitext(i.relative)[0]), i.error)
          for i in inputs]
  for attempt in range(2):
    owners: Dict[str, List[int]] = {}
    for index, job in enumerate(jobs):
      if not job.error:
        for path in job.outputs(options):
          owners.setdefault(os.path.normcase(path), []).append(index)
    clashes = {i for owner in owners.values() if len(owner) > 1 for i in owner}
    for index in sorted(clashes):
      job = jobs[index]
      if attempt == 0:
        job.stem = os.path.join(output_dir, inputs[index].relative)
      else:
        others = sorted({jobs[j].path for o in owners.values() if index in o for j in o} -
                        {job.path})
        job.error = f'its outputs would overwrite those of {", ".join(others)}'
  return jobs


# ----------------------------------------------------------------------------------------------
# Reading images.


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
    rgb = rgba[..., :3] * alpha + 127.5 * (1 - alpha)
    return np.round(rgb).astype(np.uint8)
  if mode != 'RGB':
    image = image.convert('RGB')
  return np.asarray(image)


def load_rgb(path: str) -> np.ndarray:
  """An image file as [height, width, 3] uint8 RGB, EXIF orientation applied."""
  return load_image(path)[0]


def load_image(path: str, max_side: Optional[int] = None) -> Tuple[np.ndarray, Tuple[int, int]]:
  """A file as ([h, w, 3] uint8 RGB, (H, W) original size), EXIF orientation applied.

  With `max_side`, an image with a larger side is downscaled to fit it
  (antialiased bilinear; JPEGs are decoded at a reduced scale first).
  """
  if os.path.getsize(path) == 0:
    raise ValueError('empty file (0 bytes)')
  with Image.open(path) as image:
    width, height = image.size
    try:
      orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # unreadable EXIF: the pixels are still good, take them as stored
      orientation = 1
    if orientation in (5, 6, 7, 8):  # turned by 90 or 270 degrees
      width, height = height, width
    if max_side and max(width, height) > max_side and image.format == 'JPEG':
      # Decode at 1/2, 1/4 or 1/8 scale (still at least the target size).
      scale = max_side / max(width, height)
      image.draft(image.mode, (max(1, int(image.size[0] * scale)),
                               max(1, int(image.size[1] * scale))))
    image.load()  # decode errors (truncated, corrupt) happen here
    oriented = ImageOps.exif_transpose(image) if orientation in range(2, 9) else image
    if max_side and max(oriented.size) > max_side:
      oriented = _resize_to_fit(oriented, (height, width), max_side)
    return _to_rgb(oriented), (height, width)


def _resize_to_fit(image: Image.Image, original: Tuple[int, int], max_side: int) -> Image.Image:
  h, w = original
  scale = max_side / max(h, w)
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  if image.mode not in ('RGB', 'RGBA', 'L', 'LA'):
    image = Image.fromarray(_to_rgb(image))
  return image.resize(size, Image.Resampling.BILINEAR)


def upsample_rows(scores: np.ndarray, height: int, width: int, row0: int,
                  row1: int) -> np.ndarray:
  """Rows [row0, row1) of `scores` [h, w, C] resized bilinearly to [height, width, C].

  Half-pixel centres (as `jax.image.resize(..., 'linear')`), edges clamped.
  """
  def taps(out_size, in_size, start, stop):
    x = (np.arange(start, stop) + 0.5) * (in_size / out_size) - 0.5
    x = np.clip(x, 0, in_size - 1)
    lo = np.floor(x).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (x - lo).astype(np.float32)

  r_lo, r_hi, r_t = taps(height, scores.shape[0], row0, row1)
  rows = scores[r_lo] * (1 - r_t)[:, None, None] + scores[r_hi] * r_t[:, None, None]
  c_lo, c_hi, c_t = taps(width, scores.shape[1], 0, width)
  return rows[:, c_lo] * (1 - c_t)[None, :, None] + rows[:, c_hi] * c_t[None, :, None]


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


# ----------------------------------------------------------------------------------------------
# Writing outputs (atomically).


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


def _palette_png(mask: np.ndarray) -> Image.Image:
  png = Image.fromarray(mask, mode='P')
  png.putpalette(_colormap().reshape(-1).tolist())
  return png


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


def write_masks(stem: str, mask: np.ndarray, options: Options,
                image: Optional[Callable[[], np.ndarray]] = None) -> None:
  """STEM.png (palette indices), STEM_color.png and, with overlay, STEM_overlay.jpg.

  `image` returns the [H, W, 3] uint8 image for the overlay (read lazily).
  """
  os.makedirs(os.path.dirname(stem) or '.', exist_ok=True)
  cmap = _colormap()
  _atomic(stem + '_color.png', lambda p: Image.fromarray(cmap[mask]).save(p, format='PNG'))
  if options.overlay:
    rgb = image()
    out = np.empty_like(rgb)
    for r in range(0, mask.shape[0], 256):  # strips keep float temporaries small
      m = mask[r:r + 256]
      alpha = np.where(m[..., None] > 0, OVERLAY_ALPHA, 0.0).astype(np.float32)
      blend = rgb[r:r + 256].astype(np.float32) * (1 - alpha) + cmap[m] * alpha
      out[r:r + 256] = np.round(blend).astype(np.uint8)
    _atomic(stem + '_overlay.jpg',
            lambda p: Image.fromarray(out).save(p, format='JPEG', quality=90))
  _atomic(stem + '.png', lambda p: _palette_png(mask).save(p, format='PNG'))


# ----------------------------------------------------------------------------------------------
# The pipeline.


@dataclasses.dataclass
class Item:
  """A decoded input on its way through the model to the writers."""
  job: Job
  image: np.ndarray                 # [h, w, 3] uint8, downscaled if resized
  original: Tuple[int, int]         # (H, W) of the input
  tiled: bool = False
  mask: Optional[np.ndarray] = None
  probs: Optional[np.ndarray] = None      # [h, w, C] at the image's size
  prob_file: Optional[ProbabilityFile] = None

  @property
  def resized(self) -> bool:
    return self.image.shape[:2] != tuple(self.original)


class _Budget:
  """Bytes of decoded images held at once; one image is always let through."""

  def __init__(self, limit: int):
    self.limit, self.used, self.waiting, self.peak = limit, 0, 0, 0
    self._cond = threading.Condition()

  def acquire(self, n: int) -> None:
    with self._cond:
      self.waiting += 1
      while self.used and self.used + n > self.limit:
        self._cond.wait()
      self.waiting -= 1
      self.used += n
      self.peak = max(self.peak, self.used)

  def release(self, n: int) -> None:
    with self._cond:
      self.used -= n
      self._cond.notify_all()


@dataclasses.dataclass
class Summary:
  total: int = 0
  processed: int = 0
  skipped: int = 0
  failures: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
  seconds: float = 0.0
  ignored: int = 0
  interrupted: bool = False
  peak_bytes_held: int = 0  # decoded images held at once, waiting for the model or writers

  def format(self, output_dir: str) -> str:
    rate = self.processed / max(self.seconds, 1e-9)
    lines = [f'wrote masks of {self.processed} image(s) to {output_dir}',
             f'  inputs     {self.total:>8,}',
             f'  processed  {self.processed:>8,}',
             f'  skipped    {self.skipped:>8,}  (outputs already there; --overwrite redoes them)',
             f'  failed     {len(self.failures):>8,}',
             f'  time       {self.seconds:>8.1f} s  ({rate:.2f} images/s)']
    if self.ignored:
      lines.append(f'  ignored    {self.ignored:>8,}  files without an image extension in '
                   'input folders')
    for path, reason in self.failures[:50]:
      lines.append(f'FAILED {path}: {reason}')
    if len(self.failures) > 50:
      lines.append(f'... and {len(self.failures) - 50} more failures')
    if self.interrupted:
      lines.append(f'INTERRUPTED after {self.processed + len(self.failures)} of '
                   f'{self.total - self.skipped} inputs: run the same command again to resume '
                   '(complete outputs are kept, partial ones were never renamed into place)')
    return '\n'.join(lines)


class Progress:
  """One line updated in place on a terminal (plain lines otherwise): done, images/s, ETA."""

  def __init__(self, total: int, stream=None, interval: Optional[float] = None):
    self.total, self.stream = total, stream or sys.stderr
    self.tty = hasattr(self.stream, 'isatty') and self.stream.isatty()
    self.interval = interval if interval is not None else (0.2 if self.tty else 10.0)
    self.start = self.last = time.time()
    self.done = self.failed = 0

  def update(self, failed: bool = False, force: bool = False) -> None:
    self.done += 1
    self.failed += failed
    now = time.time()
    if force or self.done == self.total or now - self.last >= self.interval:
      self.last = now
      self._print(now)

  def _print(self, now: float) -> None:
    rate = self.done / max(now - self.start, 1e-9)
    eta = (self.total - self.done) / max(rate, 1e-9)
    width = 24
    filled = int(width * self.done / max(self.total, 1))
    bar = '#' * filled + '.' * (width - filled)
    line = (f'[{bar}] {self.done:,}/{self.total:,}  {rate:.1f} images/s  '
            f'ETA {int(eta) // 60}m{int(eta) % 60:02d}s  failed {self.failed}')
    if self.tty:
      self.stream.write('\r' + line + ('\n' if self.done == self.total else ''))
    else:
      self.stream.write(line + '\n')
    self.stream.flush()


def _reason(error: BaseException) -> str:
  text = str(error) or type(error).__name__
  if type(error).__name__ == 'UnidentifiedImageError':
    return 'not an image, or an unsupported format (cannot identify image file)'
  if 'truncated' in text.lower():
    return f'truncated image ({text})'
  if isinstance(error, ValueError):
    return text
  return f'{type(error).__name__}: {text}'


def run_jobs(segmenter: Segmenter, jobs: Sequence[Job], options: Options,
             progress_stream=None, bytes_in_flight: int = BYTES_IN_FLIGHT) -> Summary:
  """Decodes, predicts and writes every job; returns what happened.

  Decoding and writing run on `options.workers` threads each; the model runs
  on this thread, on batches of images of one bucket.
  """
  summary = Summary(total=len(jobs))
  start = time.time()
  todo = []
  for job in jobs:
    if job.error:
      summary.failures.append((job.path, job.error))
    elif not options.overwrite and job.done(options):
      summary.skipped += 1
    else:
      todo.append(job)
  progress = Progress(len(todo), progress_stream)
  lock = threading.Lock()

  def finish(job, error=None):
    with lock:
      if error is None:
        summary.processed += 1
      else:
        summary.failures.append((job.path, error if isinstance(error, str) else _reason(error)))
      progress.update(failed=error is not None)

  budget = _Budget(bytes_in_flight)
  decoded: 'queue.Queue[Item]' = queue.Queue()
  next_job = iter(todo)
  decoders_left = [options.workers]
  resize_side = options.max_side if options.large_images == 'resize' else None

  stop = threading.Event()

  def decode_loop():
    while not stop.is_set():
      with lock:
        job = next(next_job, None)
      if job is None:
        break
      try:
        image, original = load_image(job.path, resize_side)
      except Exception as e:  # a bad file is reported and skipped, never fatal to the run
        finish(job, e)
        continue
      budget.acquire(image.nbytes)
      decoded.put(Item(job, image, original, tiled=max(image.shape[:2]) > options.max_side))
    with lock:
      decoders_left[0] -= 1

  decoders = [threading.Thread(target=decode_loop, daemon=True) for _ in range(options.workers)]
  for thread in decoders:
    thread.start()
  writers = futures.ThreadPoolExecutor(options.workers)
  write_slots = threading.BoundedSemaphore(2 * options.workers + segmenter.batch_size)
  want_probs = options.probabilities != 'none'

  def write(item: Item):
    try:
      write_item(item, options)
      finish(item.job)
    except Exception as e:
      finish(item.job, e)
    finally:
      budget.release(item.image.nbytes)
      write_slots.release()

  def submit(item: Item):
    write_slots.acquire()
    writers.submit(write, item)

  def run_batch(items: List[Item]):
    try:
      if want_probs or any(item.resized for item in items):
        for item, logits in zip(items, segmenter.logits([i.image for i in items])):
          item.probs = softmax(logits)
          item.mask = logits.argmax(axis=-1).astype(np.uint8)
      else:
        for item, mask in zip(items, segmenter.predict([i.image for i in items])):
          item.mask = mask
    except Exception as e:
      for item in items:
        budget.release(item.image.nbytes)
        finish(item.job, e)
      return
    for item in items:
      submit(item)

  pending: Dict[Hashable, List[Item]] = {}
  try:
    while True:
      try:
        item = decoded.get(timeout=0.05)
      except queue.Empty:
        with lock:
          finished = decoders_left[0] == 0
        if finished and decoded.empty() and not pending:
          break
        if pending and (finished or budget.waiting):  # no full batch is coming: run the largest
          run_batch(pending.pop(max(pending, key=lambda k: len(pending[k]))))
        continue
      if item.tiled:
        try:
          predict_tiled(segmenter, item, options)
        except Exception as e:
          if item.prob_file is not None:
            item.prob_file.discard()
          budget.release(item.image.nbytes)
          finish(item.job, e)
          continue
        submit(item)
        continue
      key = segmenter.bucket(*item.image.shape[:2])
      group = pending.setdefault(key, [])
      group.append(item)
      if len(group) >= segmenter.batch_size:
        run_batch(pending.pop(key))
  except KeyboardInterrupt:  # finish the writes under way; the rest is done by the next run
    summary.interrupted = True
    stop.set()
    with lock:
      progress.stream.write('\n')
  writers.shutdown(wait=True)
  summary.seconds = time.time() - start
  summary.peak_bytes_held = budget.peak
  return summary


def predict_tiled(segmenter: Segmenter, item: Item, options: Options) -> None:
  """Fills item.mask (and a probability file) tile by tile; see the module docstring."""
  height, width = item.image.shape[:2]
  tile = options.max_side
  rows, row_bounds = tile_starts(height, tile, TILE_OVERLAP)
  cols, col_bounds = tile_starts(width, tile, TILE_OVERLAP)
  want_probs = options.probabilities != 'none'
  item.mask = np.zeros((height, width), np.uint8)
  cells = [(i, j) for i in range(len(rows)) for j in range(len(cols))]
  for start in range(0, len(cells), segmenter.batch_size):
    batch = cells[start:start + segmenter.batch_size]
    crops = [item.image[rows[i]:rows[i] + tile, cols[j]:cols[j] + tile] for i, j in batch]
    if want_probs:
      results = [softmax(l) for l in segmenter.logits(crops)]
    else:
      results = segmenter.predict(crops)
    for (i, j), result in zip(batch, results):
      r0, r1 = row_bounds[i] - rows[i], row_bounds[i + 1] - rows[i]
      c0, c1 = col_bounds[j] - cols[j], col_bounds[j + 1] - cols[j]
      owned = result[r0:r1, c0:c1]
      if want_probs:
        if item.prob_file is None:
          os.makedirs(os.path.dirname(item.job.stem) or '.', exist_ok=True)
          item.prob_file = ProbabilityFile(item.job.stem + '_prob.npy', result.shape[-1],
                                           height, width, options.probabilities)
        item.prob_file.write(row_bounds[i], col_bounds[j], owned)
        owned = owned.argmax(axis=-1)
      item.mask[row_bounds[i]:row_bounds[i + 1], col_bounds[j]:col_bounds[j + 1]] = owned


def write_item(item: Item, options: Options) -> None:
  """Writes every output of one predicted item (upsampling resized ones first)."""
  stem = item.job.stem
  os.makedirs(os.path.dirname(stem) or '.', exist_ok=True)
  want_probs = options.probabilities != 'none'
  try:
    if item.resized:
      height, width = item.original
      mask = np.empty((height, width), np.uint8)
      if want_probs:
        item.prob_file = ProbabilityFile(stem + '_prob.npy', item.probs.shape[-1], height,
                                         width, options.probabilities)
      for r in range(0, height, ROWS_PER_STRIP):
        strip = upsample_rows(item.probs, height, width, r, min(r + ROWS_PER_STRIP, height))
        mask[r:r + strip.shape[0]] = strip.argmax(axis=-1)
        if want_probs:
          item.prob_file.write(r, 0, strip)
      item.mask, item.probs = mask, None
    elif want_probs and item.prob_file is None:
      item.prob_file = ProbabilityFile(stem + '_prob.npy', item.probs.shape[-1],
                                       *item.mask.shape, options.probabilities)
      item.prob_file.write(0, 0, item.probs)
    image = (lambda: load_rgb(item.job.path)) if item.resized else (lambda: item.image)
    write_masks(stem, item.mask, options, image)
    if item.prob_file is not None:
      item.prob_file.commit()
  except BaseException:
    if item.prob_file is not None:
      item.prob_file.discard()
    raise


def predict_paths(workdir: str, inputs, output_dir: str, options: Optional[Options] = None,
                  batch_size: int = 8, segmenter: Optional[Segmenter] = None, log=print,
                  progress_stream=None, dtype: str = 'float32') -> int:
  """`main.py predict`: masks for every input; prints a summary, returns #failures.

  Ctrl-C stops reading new inputs, lets the writes under way finish, prints
  the summary and raises KeyboardInterrupt again.

  `inputs`: a path or a list of input values (see `collect_inputs`); `dtype`:
  the engine's compute dtype ('float32' or 'bfloat16').
  """
  options = options or Options()
  inputs = [inputs] if isinstance(inputs, str) else list(inputs)
  files, roots, ignored = collect_inputs(inputs)
  check_output_folder(files, roots, output_dir)
  if not files:
    raise FileNotFoundError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) in {", ".join(inputs)}')
  if segmenter is None:
    segmenter, step = load_predictor(workdir, batch_size, dtype)
    log(f'{len(files)} input file(s) from {", ".join(inputs)}; model of {workdir} at step {step}')
  jobs = plan_jobs(files, output_dir, options)
  summary = run_jobs(segmenter, jobs, options, progress_stream)
  summary.ignored = ignored
  log(summary.format(output_dir))
  if summary.interrupted:
    raise KeyboardInterrupt
  return len(summary.failures)
