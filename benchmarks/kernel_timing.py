"""What the kernel benchmarks (int8_kernel_layers.py, float_kernel_layers.py) share: their
flags, one compiled call's median time, and the kernel loops a --loops flag picks."""

import argparse
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
