"""Mask generation for many images: files, folders, globs and lists of paths.

Every input image (collected by `seg.inputs`, decoded by `seg.images`) gets
its masks written under the output folder (`seg.masks`); a run skips inputs
whose outputs all exist (unless overwrite), and since outputs are renamed into
place only when complete, an interrupted run resumes where it stopped.

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
import os
import queue
import sys
import threading
import time
from concurrent import futures
from typing import Dict, Hashable, List, Optional, Protocol, Sequence, Tuple

import numpy as np

from seg.images import load_image, load_rgb
from seg.inputs import IMAGE_EXTENSIONS, Job, check_output_folder, collect_inputs, plan_jobs
from seg.masks import PROBABILITY_FORMATS, ProbabilityFile, write_masks

LARGE_IMAGE_POLICIES = ('resize', 'tile')
TILE_OVERLAP = 64            # pixels shared by neighbouring tiles (policy 'tile')
BYTES_IN_FLIGHT = 512 << 20  # decoded images waiting for the model or the writers
ROWS_PER_STRIP = 64          # rows upsampled at a time for resized large images


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


def load_predictor(workdir: str, batch_size: int = 1, dtype: str = 'float32', devices=None):
  """(the inference engine for the latest checkpoint of `workdir`, its step); `devices`
  as `seg.engine.Engine`'s (default: the first)."""
  from seg import checkpoint
  from seg.engine import Engine
  from seg.model import create_model
  config = checkpoint.load_config(workdir)
  variables, step = checkpoint.load_model_variables(workdir, create_model(config.model))
  return Engine(config, variables, dtype=dtype, batch_size=batch_size, devices=devices), step


def softmax(logits: np.ndarray) -> np.ndarray:
  """[..., classes] float -> probabilities over the last axis, float32."""
  logits = logits.astype(np.float32)
  e = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# Options.


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


# ----------------------------------------------------------------------------------------------
# Large images: upsampling resized predictions, tiling.


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
                  progress_stream=None, dtype: str = 'float32', devices=None) -> int:
  """`main.py predict`: masks for every input; prints a summary, returns #failures.

  Ctrl-C stops reading new inputs, lets the writes under way finish, prints
  the summary and raises KeyboardInterrupt again.

  `inputs`: a path or a list of input values (see `seg.inputs.collect_inputs`);
  `dtype`: the engine's compute dtype ('float32' or 'bfloat16'); `devices`: what
  the engine splits each batch over (`seg.engine.batch_devices()` from `main.py`).
  """
  options = options or Options()
  inputs = [inputs] if isinstance(inputs, str) else list(inputs)
  files, roots, ignored = collect_inputs(inputs)
  check_output_folder(files, roots, output_dir)
  if not files:
    raise FileNotFoundError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) in {", ".join(inputs)}')
  if segmenter is None:
    segmenter, step = load_predictor(workdir, batch_size, dtype, devices)
    parts = segmenter.parts(batch_size)
    split = f', each batch of {batch_size} as {parts} parts at once' if parts > 1 else ''
    log(f'{len(files)} input file(s) from {", ".join(inputs)}; model of {workdir} at step '
        f'{step}{split}')
  jobs = plan_jobs(files, output_dir, options)
  summary = run_jobs(segmenter, jobs, options, progress_stream)
  summary.ignored = ignored
  log(summary.format(output_dir))
  if summary.interrupted:
    raise KeyboardInterrupt
  return len(summary.failures)
