"""What the kernel benchmarks (int8_kernel_layers.py, float_kernel_layers.py) share: their
flags, one compiled call's median time, and the kernel loops a --loops flag picks; and what
the A/B scripts (int8_ab.py, engine_ab.py) share: settings in the environment while traced,
calls alternated, the report."""

import argparse
import contextlib
import os
import statistics
import time


def parse_args(description: str, loops_example: str = ''):
  """--width, --size, --iters and --loops, parsed; then mimalloc, as main.py runs (glibc's
  fresh pages at every call would add page faults to every layer that writes megabytes)."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument('--width', type=float, default=1.0)
  parser.add_argument('--size', type=int, default=513)
  parser.add_argument('--iters', type=int, default=15)
  parser.add_argument('--loops', default=None,
                      help='the kernel loops to time, comma-separated (default: all this CPU '
                           f'runs){loops_example}')
  args = parser.parse_args()
  from seg.cli import process
  process.reexec_with_mimalloc()
  return args


def median_ms(fn, *operands, iters: int) -> float:
  """The median of `iters` timed calls of `fn` jitted and compiled for `operands`, in ms,
  after three untimed ones."""
  import jax
  compiled = jax.jit(fn).lower(*operands).compile()
  for _ in range(3):
    compiled(*operands).block_until_ready()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    compiled(*operands).block_until_ready()
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1000


def chosen_loops(available: tuple, wanted) -> tuple:
  """The loops of `available` that `wanted` (a --loops value: comma-separated, or None for
  all) names; exits with a message on a loop the CPU lacks."""
  if not wanted:
    return available
  unknown = set(wanted.split(',')) - set(available)
  if unknown:
    raise SystemExit(f'--loops: {sorted(unknown)} not among this CPU\'s {available}')
  return tuple(loop for loop in available if loop in wanted.split(','))


@contextlib.contextmanager
def environment(variables):
  """The SEG_* `variables` ({name: value}) set inside the block (read when a function is
  traced or an engine built), the previous values back after it."""
  saved = {k: os.environ.get(k) for k in variables}
  os.environ.update(variables)
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def alternate(runs, iters: int, per_call: int):
  """{name: ms per image of each call}: every run of `runs` ({name: a function that runs one
  call and waits for it}) three times untimed, then `iters` times each, alternating, so that
  a machine whose speed drifts treats them alike; `per_call`: images per call."""
  for run in runs.values():
    for _ in range(3):
      run()
  times = {name: [] for name in runs}
  for _ in range(iters):
    for name, run in runs.items():
      start = time.perf_counter()
      run()
      times[name].append((time.perf_counter() - start) * 1e3 / per_call)
  return times


def print_ab(times) -> None:
  """Per setting the median, 25th percentile and fastest ms per image; the median of the
  per-pair ratios B / A (`alternate`'s two runs, A first)."""
  import numpy as np
  for name, t in times.items():
    print(f'  {name}: median {np.median(t):.2f}  p25 {np.percentile(t, 25):.2f}  '
          f'fastest {min(t):.2f}')
  a, b = (np.asarray(t) for t in times.values())
  print(f'  B / A, median of the pairs: {np.median(b / a):.3f}')
