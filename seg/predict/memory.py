"""`predict --memory-budget`: the largest compiled shape and the images in flight follow one
budget for the whole process, instead of growing with batch size x largest side.

The budget is spent on three things (`plan_memory`):
  held        what the process holds once the model is loaded (JAX, the weights, compiled
              code), read from /proc/self/statm when the run starts;
  activations the network's working memory for its largest canvas: XLA's own figure for the
              compiled eval-size program (`memory_analysis().temp_size_in_bytes`), per canvas
              pixel, times the pixels of the largest canvas, for every part run at once;
  in flight   decoded images and their full-size outputs between decoding and writing
              (`item_bytes`), held under what is left (`seg.predict.runner.Budget`, which
              always lets one image through).
The largest side (`--max-side`, or the model's `data.predict_max_side` by default, its eval
size unless `train` found larger eval images) is lowered until its activations take at most
half of what the held memory leaves, so images keep flowing (its log line says so).
"""

import dataclasses
import os
import re
from typing import Tuple


DEFAULT_BUDGET = 1536 << 20   # bytes: the whole process under ~1.5 GB
SLACK = 128 << 20             # Python objects, decoder and encoder temporaries, allocator slack
_UNITS = {'': 1 << 20, 'k': 1 << 10, 'm': 1 << 20, 'g': 1 << 30}


def parse_budget(text: str) -> int:
  """'1536', '1536M', '1.5G', '800MB' -> bytes (a plain number is MiB)."""
  match = re.fullmatch(r'\s*([\d.]+)\s*([kmgKMG]?)i?[bB]?\s*', str(text))
  if not match:
    raise ValueError(f'--memory-budget {text!r}: give a size such as 1536M or 1.5G')
  return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def resident_bytes() -> int:
  """This process's resident set now (0 where /proc is missing)."""
  try:
    with open('/proc/self/statm') as f:
      return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
  except (OSError, ValueError, IndexError):
    return 0


def item_bytes(image_bytes: int, original: Tuple[int, int], overlay: bool) -> int:
  """What one image holds between decoding and writing: its decoded pixels, its full-size
  class map with the temporaries of `seg.predict.upsampling` (about twice the map), and
  with an overlay the image re-read at full size (4 bytes a pixel in Pillow's memory, where
  it is blended) and its JPEG (counted as 6 bytes a pixel)."""
  pixels = original[0] * original[1]
  return image_bytes + 2 * pixels + (6 * pixels if overlay else 0)


@dataclasses.dataclass
class Plan:
  budget: int
  held: int
  activation_per_pixel: float   # bytes of the network's working memory per canvas pixel
  parts: int                    # canvases computed at once (one per device)
  max_side: int
  in_flight: int                # bytes for decoded images and outputs
  asked: int = 0                # the largest side asked for, when the budget lowered it

  def activations(self, side: int) -> int:
    return int(self.activation_per_pixel * side * side * self.parts)

  def describe(self) -> str:
    mib = lambda n: f'{n / (1 << 20):,.0f} MiB'
    return (f'memory budget {mib(self.budget)}: {mib(self.held)} held, '
            f'{mib(self.activations(self.max_side))} network at side {self.max_side}, '
            f'{mib(self.in_flight)} for images in flight'
            + (f' (the largest side lowered from {self.asked} px to fit; --memory-budget '
               'raises it)' if self.asked > self.max_side else ''))


def activation_per_pixel(engine) -> Tuple[float, int]:
  """(bytes of working memory per canvas pixel, parts run at once) from XLA's analysis of
  the eval-size program (compiled anyway: every image up to the eval size uses it)."""
  parts = engine.parts(engine.batch_size)
  size = engine.eval_size
  compiled = engine.compiled('classes', engine.batch_size // parts, size, size)
  try:
    temp = compiled.memory_analysis().temp_size_in_bytes
  except Exception:  # a backend without the analysis: a generous figure for float32 features
    temp = 0
  per_pixel = temp / (size * size) if temp else 4096.0
  return per_pixel, parts


def plan_memory(engine, max_side: int, budget: int, held: int) -> Plan:
  """The largest side and the bytes in flight that keep the process within `budget`.

  Raises ValueError when the budget does not even hold the loaded model and one
  eval-size canvas.
  """
  per_pixel, parts = activation_per_pixel(engine)
  spare = budget - held - SLACK
  eval_side = engine.eval_size
  if spare <= per_pixel * eval_side * eval_side * parts:
    passes = (f' or run fewer passes than {len(engine.scales) * (2 if engine.flip else 1)} '
              '(--scales, --flip)' if getattr(engine, 'multi_scale', False) else '')
    raise ValueError(f'--memory-budget {budget >> 20} MiB is below what the model needs '
                     f'({(held + SLACK) >> 20} MiB held, plus its eval-size canvas): raise it'
                     f'{passes}')
  side = max_side
  while side > eval_side and per_pixel * parts * _canvas_pixels(engine, side) > spare / 2:
    side = max(eval_side, side - 64)
  result = Plan(budget, held, per_pixel, parts, side, 0, max_side)
  result.in_flight = int(spare - per_pixel * parts * _canvas_pixels(engine, side))
  return result


def _canvas_pixels(engine, side: int) -> int:
  """Pixels of the largest canvas of images up to `side` (`engine.bucket`)."""
  h, w = engine.bucket(side, side)
  return h * w
