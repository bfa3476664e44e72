"""What the kernel benchmarks (int8_kernel_layers.py, bf16_kernel_layers.py) share: one
compiled call's median time, and the kernel loops a --loops flag picks."""

import statistics
import time


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
