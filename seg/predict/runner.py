"""`main.py predict`: masks for many images, as a pipeline decode -> batch -> run -> write.

Every input image (collected by `seg.predict.files`, decoded by `seg.predict.images`) gets its
masks written under the output folder (`seg.predict.outputs`); a run skips inputs whose
outputs all exist (unless overwrite), and since outputs are renamed into place only when
complete, an interrupted run resumes where it stopped.

Images are padded exactly as evaluation pads them (`seg.preprocessing`), so that a val image
gets here the same mask that `eval` scores. Images of one padding bucket share a batch. Images
with a side above `max_side` follow the large-image policy (`seg.predict.large_images`).
The run and full-size steps (`run_items`, `complete`) are also `Segmenter`'s, which gives the
same masks in memory (`seg.predict.segmenter`).
"""

import dataclasses
import os
import queue
import threading
import time
from concurrent import futures
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from seg.classes import palette
from seg.predict.files import (IMAGE_EXTENSIONS, Job, check_output_folder, collect_inputs,
                               plan_jobs, shard_of)
from seg.predict.images import load_image, load_rgb_image
from seg.predict.memory import Plan, item_bytes, plan_memory, resident_bytes
from seg.predict.upsampling import class_map, strips
from seg.predict.large_images import predict_tiled, softmax
from seg.predict.options import Options
from seg.predict.outputs import OpenProbabilities, probability_file_for, write_masks
from seg.predict.profile import NO_PROFILE, Profile
from seg.predict.progress import Progress, RunReport, failure_reason

@dataclasses.dataclass
class Item:
  """A decoded input on its way through the model to the writers."""
  job: Optional[Job]                # None for images given in memory (`Segmenter`)
  image: np.ndarray                 # [h, w, 3] uint8, downscaled if resized
  original: Tuple[int, int]         # (H, W) of the input
  tiled: bool = False
  mask: Optional[np.ndarray] = None
  probs: Optional[np.ndarray] = None      # [h, w, C] at the image's size
  features: Optional[np.ndarray] = None   # [fh, fw, C] logits of a resized image's canvas
  averaged: bool = False                  # features: averaged probabilities (several scales)
  canvas: Tuple[int, int] = (0, 0)        # the padded canvas `features` belong to
  held: int = 0                           # bytes counted against the in-flight budget
  prob_file: Any = None                   # where its probabilities go (`complete`)

  @property
  def resized(self) -> bool:
    return self.image.shape[:2] != tuple(self.original)


class Budget:
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


class Pipeline:
  """decode -> batch -> run -> write: the whole concurrency and memory policy of `predict`.

  decode  `workers` threads take the jobs in order and decode them; the pixels of decoded
          images not yet written stay under `bytes_in_flight` (`Budget`, one image always
          passes), so a folder of huge photos cannot fill the memory.
  batch   this thread groups decoded images by padding bucket (`engine.bucket`); a group runs
          when it reaches `engine.batch_size`, or earlier when nothing more can arrive (the
          decoders are done, or blocked on the budget).
  run     the engine on the batch (class maps; logits where probabilities are needed or
          the image was downscaled, the averaged probabilities with several scales or
          flips); oversized images run tile by tile at once.
  write   `workers` threads write the outputs; at most 2 * workers + batch size items wait.

  engine: a `seg.inference.engine.Engine` (anything with its `batch_size`, `bucket`,
  `predict`, `logits` and `features`; `probabilities` where it is `multi_scale`).
  """

  def __init__(self, engine, options: Options, progress_stream=None,
               bytes_in_flight: Optional[int] = None):
    max_side = options.max_side or engine.predict_max_side
    self.memory: Optional[Plan] = None
    if bytes_in_flight is None:  # the budget decides the largest side and what is in flight
      self.memory = plan_memory(engine, max_side, options.memory_budget, resident_bytes())
      max_side, bytes_in_flight = self.memory.max_side, self.memory.in_flight
    self.engine = engine
    self.options = dataclasses.replace(options, max_side=max_side)
    self.progress_stream = progress_stream
    self.budget = Budget(bytes_in_flight)
    self._lock = threading.Lock()          # guards the report, the progress and the job iterator
    self._decoded: 'queue.Queue[Item]' = queue.Queue()
    self._decoders_running = 0
    self._stop = threading.Event()
    self._write_slots = threading.BoundedSemaphore(2 * options.workers + engine.batch_size)
    self._writers: Optional[futures.ThreadPoolExecutor] = None
    self.report = RunReport()
    self.progress: Optional[Progress] = None
    self.profile = Profile() if options.profile else NO_PROFILE

  def run(self, jobs: List[Job]) -> RunReport:
    """Decodes, predicts and writes every job; returns what happened."""
    start = time.time()
    self.report = RunReport(total=len(jobs), max_side=self.options.max_side)
    todo = []
    for job in jobs:
      if job.error:
        self.report.failures.append((job.path, job.error))
      elif not self.options.overwrite and job.done(self.options):
        self.report.skipped += 1
      else:
        todo.append(job)
    self.progress = Progress(len(todo), self.progress_stream)
    self._jobs = iter(todo)
    self._decoders_running = self.options.workers
    self._writers = futures.ThreadPoolExecutor(self.options.workers)
    for _ in range(self.options.workers):
      threading.Thread(target=self._decode_loop, daemon=True).start()
    try:
      self._batch_and_run()
    except KeyboardInterrupt:  # finish the writes under way; the next run does the rest
      self.report.interrupted = True
      self._stop.set()
      with self._lock:
        self.progress.stream.write('\n')
    self._writers.shutdown(wait=True)
    self.report.seconds = time.time() - start
    self.report.peak_bytes_held = self.budget.peak
    return self.report

  # decode --------------------------------------------------------------------------------

  def _decode_loop(self) -> None:
    resize_side = self.options.max_side if self.options.large_images == 'resize' else None
    while not self._stop.is_set():
      with self._lock:
        job = next(self._jobs, None)
      if job is None:
        break
      try:
        image, original = load_image(job.path, resize_side, self.profile)
      except Exception as e:  # a bad file is reported and skipped, never fatal to the run
        self._finish(job, e)
        continue
      held = item_bytes(image.nbytes, original, self.options.overlay)
      if image.shape[:2] != tuple(original) and getattr(self.engine, 'multi_scale', False):
        # its scores come back as the whole canvas's probabilities (`Engine.features`)
        held += 4 * self.engine.config.model.num_classes * int(np.prod(
            self.engine.bucket(*image.shape[:2])))
      self.budget.acquire(held)
      item = Item(job, image, original, held=held,
                  tiled=max(image.shape[:2]) > self.options.max_side)
      with self._lock:
        self.report.resized += item.resized
        self.report.tiled += item.tiled
      self._decoded.put(item)
    with self._lock:
      self._decoders_running -= 1

  def _decoding_done(self) -> bool:
    with self._lock:
      return self._decoders_running == 0

  # batch and run -------------------------------------------------------------------------

  def _batch_and_run(self) -> None:
    pending: Dict[Hashable, List[Item]] = {}
    while True:
      try:
        item = self._decoded.get(timeout=0.05)
      except queue.Empty:
        done = self._decoding_done()
        if done and self._decoded.empty() and not pending:
          return
        if pending and (done or self.budget.waiting):  # no full batch is coming: run the largest
          self._run_batch(pending.pop(max(pending, key=lambda k: len(pending[k]))))
        continue
      if item.tiled:
        self._run_tiled(item)
        continue
      key = self.engine.bucket(*item.image.shape[:2])
      group = pending.setdefault(key, [])
      group.append(item)
      if len(group) >= self.engine.batch_size:
        self._run_batch(pending.pop(key))

  def _run_batch(self, items: List[Item]) -> None:
    try:
      run_items(self.engine, items, self.options.want_probabilities, self.profile)
    except Exception as e:
      for item in items:
        self._drop(item, e)
      return
    for item in items:
      self._submit_write(item)

  def _run_tiled(self, item: Item) -> None:
    try:
      with self.profile.stage('network'):
        predict_tiled(self.engine, item, self.options.max_side,
                      probability_file_for(item.job.stem, self.options))
    except Exception as e:
      self._drop(item, e)
      return
    self._submit_write(item)

  # write ---------------------------------------------------------------------------------

  def _submit_write(self, item: Item) -> None:
    self._write_slots.acquire()
    self._writers.submit(self._write, item)

  def _write(self, item: Item) -> None:
    try:
      write_item(item, self.options, self.profile)
      self._finish(item.job)
    except Exception as e:
      self._finish(item.job, e)
    finally:
      self.budget.release(item.held)
      self._write_slots.release()

  # bookkeeping ---------------------------------------------------------------------------

  def _drop(self, item: Item, error: Exception) -> None:
    if item.prob_file is not None:
      item.prob_file.discard()
    self.budget.release(item.held)
    self._finish(item.job, error)

  def _finish(self, job: Job, error=None) -> None:
    with self._lock:
      if error is None:
        self.report.processed += 1
      else:
        reason = error if isinstance(error, str) else failure_reason(error)
        self.report.failures.append((job.path, reason))
      self.progress.update(failed=error is not None)


def run_items(engine, items: List[Item], want_probabilities: bool = False,
              profile=NO_PROFILE) -> None:
  """The network on decoded items of one padding bucket (`engine.bucket`): a downscaled
  image gets the logits of its canvas's feature grid (`item.features`; with several scales
  or flips, the canvas's averaged probabilities), which `complete` takes to the full size;
  the others get their mask, and their probabilities where wanted (`item.probs`)."""
  resized = [item for item in items if item.resized]
  plain = [item for item in items if not item.resized]
  if resized:
    with profile.stage('network'):
      results = engine.features([item.image for item in resized])
    averaged = getattr(engine, 'features_are_probabilities', False)
    for item, (features, canvas) in zip(resized, results):
      item.features, item.canvas, item.averaged = features, canvas, averaged
  if plain and want_probabilities and getattr(engine, 'multi_scale', False):
    with profile.stage('network'):
      all_probabilities = engine.probabilities([item.image for item in plain])
    for item, probabilities in zip(plain, all_probabilities):
      item.probs = probabilities
      with profile.stage('argmax'):
        item.mask = probabilities.argmax(axis=-1).astype(np.uint8)
  elif plain and want_probabilities:
    with profile.stage('network'):
      all_logits = engine.logits([item.image for item in plain])
    for item, logits in zip(plain, all_logits):
      with profile.stage('upsample'):
        item.probs = softmax(logits)
      with profile.stage('argmax'):
        item.mask = logits.argmax(axis=-1).astype(np.uint8)
  elif plain:
    with profile.stage('network'):
      masks = engine.predict([item.image for item in plain])
    for item, mask in zip(plain, masks):
      item.mask = mask


def complete(item: Item, open_probabilities: Optional[OpenProbabilities] = None,
             profile=NO_PROFILE) -> None:
  """`item.mask` at the input's full size (a downscaled image's logits taken there,
  `seg.predict.upsampling`); with `open_probabilities`, its probabilities written into
  `item.prob_file = open_probabilities(classes, height, width)` as well (row strips of a
  downscaled image, the whole of another; a tiled item's are written already)."""
  if item.resized:
    resized = item.image.shape[:2]
    if open_probabilities is not None:
      item.prob_file = open_probabilities(item.features.shape[-1], *item.original)
      item.mask = np.empty(item.original, np.uint8)
      for row, scores in strips(item.features, item.original, resized, item.canvas):
        with profile.stage('upsample'):
          item.prob_file.write(row, 0, scores if item.averaged else softmax(scores))
        with profile.stage('argmax'):
          item.mask[row:row + len(scores)] = scores.argmax(axis=-1)
    else:
      with profile.stage('upsample'):
        item.mask = class_map(item.features, item.original, resized, item.canvas)
    item.features = None
  elif open_probabilities is not None and item.prob_file is None:
    item.prob_file = open_probabilities(item.probs.shape[-1], *item.mask.shape)
    item.prob_file.write(0, 0, item.probs)


def write_item(item: Item, options: Options, profile=NO_PROFILE) -> None:
  """Writes every output of one predicted item (a resized one is taken to full size first)."""
  stem = item.job.stem
  os.makedirs(os.path.dirname(stem) or '.', exist_ok=True)
  try:
    complete(item, probability_file_for(stem, options), profile)
    def full_size():  # for the overlay: a downscaled image's pixels at full size, decoded again
      with profile.stage('decode'):
        return load_rgb_image(item.job.path)
    image = full_size if item.resized else (lambda: Image.fromarray(item.image))
    write_masks(stem, item.mask, options, image, profile)
    if item.prob_file is not None:
      item.prob_file.commit()
  except BaseException:
    if item.prob_file is not None:
      item.prob_file.discard()
    raise


def inference_passes(workdir: str, scales: Optional[Sequence[float]] = None,
                     flip: Optional[bool] = None) -> Tuple[Tuple[float, ...], bool]:
  """(scales, flip) of a `predict` run: those given, else the workdir's config.eval ones."""
  from seg import checkpoint
  from seg.inference.forward import chosen_passes
  return chosen_passes(checkpoint.load_config(workdir).eval, scales, flip)  # older: defaults


def predict_paths(workdir: str, inputs, output_dir: str, options: Optional[Options] = None,
                  batch_size: int = 8, engine=None, log=print, progress_stream=None,
                  dtype: str = 'float32', devices=None, calibration: Optional[str] = None,
                  calibration_count: Optional[int] = None,
                  scales: Optional[Sequence[float]] = None, flip: Optional[bool] = None) -> int:
  """`main.py predict`: masks for every input; prints a summary, returns the number of failures.

  Ctrl-C stops reading new inputs, lets the writes under way finish, prints the summary and
  raises KeyboardInterrupt again.

  Args:
    inputs: a path or a list of input values (see `seg.predict.files.collect_inputs`).
    engine: the model to run (default: an `Engine` for the latest checkpoint of `workdir`
      with `batch_size`, `dtype` and `devices`; int8 calibrated on `calibration`'s images,
      `seg.inference.engine.int8_scales_for`).
    scales, flip: the default engine's multi-scale and flipped inference; None: the
      workdir's `config.eval.scales` / `config.eval.flip`, so that the masks are those `eval`
      scores.
  """
  options = options or Options()
  inputs = [inputs] if isinstance(inputs, str) else list(inputs)
  found = collect_inputs(inputs)
  files = found.files
  check_output_folder(files, found.roots, output_dir)
  if not files:
    raise FileNotFoundError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) in {", ".join(inputs)}')
  if engine is None:
    from seg.inference.engine import Engine
    from seg.inference.forward import describe_passes
    scales, flip = inference_passes(workdir, scales, flip)
    # kernel builds and checks, calibration: said here, before the progress bar
    engine, step = Engine.from_workdir(workdir, calibration, calibration_count,
                                       batch_size=batch_size, dtype=dtype, devices=devices,
                                       log=log, scales=scales, flip=flip)
    engine.log = None  # its compilations would come under the progress bar
    parts = engine.parts(batch_size)
    split = f', each batch of {batch_size} as {parts} parts at once' if parts > 1 else ''
    log(f'{len(files)} input file(s) from {", ".join(inputs)}; model of {workdir} at step '
        f'{step}{split}')
    if engine.multi_scale:
      log(describe_passes(engine.scales, engine.flip))
  own_colours = getattr(getattr(engine, 'config', None), 'data', {}).get('class_colours')
  if options.palette is None and own_colours:  # a folder dataset's labelmap.txt colours
    options = dataclasses.replace(options, palette=palette(own_colours))
  jobs = plan_jobs(files, output_dir, options)  # all inputs: names never depend on the shard
  index, count = options.shard
  if count > 1:
    jobs = [job for job, item in zip(jobs, files) if shard_of(item.relative, count) == index]
    log(f'shard {index}/{count}: {len(jobs)} of {len(files)} input file(s)')
  pipeline = Pipeline(engine, options, progress_stream)
  if pipeline.memory is not None:
    log(pipeline.memory.describe())
  report = pipeline.run(jobs)
  report.ignored, report.duplicates = found.ignored, found.duplicates
  log(report.format(output_dir))
  if options.profile:
    log(pipeline.profile.format(report.processed))
  if report.interrupted:
    raise KeyboardInterrupt
  return len(report.failures)
