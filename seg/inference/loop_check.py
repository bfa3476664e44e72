"""First-use checks of the kernels' product loops on the CPU at hand.

A loop runs only where the CPU has its instructions, and the test suite runs where the
machines are: the AMX-BF16 loop, for one, has been tested only through its stand-in
(`int8_kernel.emulate_loops`). So before a loop is offered (`float_kernel.loops`,
`float_kernel.f32_loops`, `int8_kernel.loops`), it computes one small product on
integer-valued data, whose sums are exact in any order and in each loop's precision, and the
result must equal NumPy's bit for bit. A loop that disagrees is left out, with a
RuntimeWarning saying which and how (the engine then takes the next loop down, or XLA), and
forcing it (SEG_*_KERNEL_ISA) is refused with the same reason. Once per loop and process; a
loop that crashes cannot be caught this way, only wrong numbers.

The product: ROWS x INPUTS x OUTPUTS, sizes that reach every tiling case (a whole 32-row
block of AMX tiles and a part of one, inputs padded to the loops' multiples, a partly used
panel of 16 outputs); the bfloat16 loops also take 64 bfloat16 inputs, which they read in
place.
"""

import warnings
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

ROWS, INPUTS, OUTPUTS = 40, 72, 40


def integer_problem(x_low: int, x_high: int, seed: int = 0, inputs: int = INPUTS
                    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(x [ROWS, inputs], w [inputs, OUTPUTS], bias [OUTPUTS], x @ w + bias): integers (x in
  [x_low, x_high], w in [-3, 3], bias in [-2, 2]) as int64, the result exact. w and bias
  depend on `seed` and `inputs` alone (not on x's range)."""
  rng = np.random.RandomState(seed)
  w = rng.randint(-3, 4, (inputs, OUTPUTS)).astype(np.int64)
  b = rng.randint(-2, 3, OUTPUTS).astype(np.int64)
  x = rng.randint(x_low, x_high + 1, (ROWS, inputs)).astype(np.int64)
  return x, w, b, x @ w + b


def run_apart(function: Callable, *arrays: np.ndarray) -> list:
  """function(*arrays) compiled for the CPU (where the kernels run, also on a machine whose
  default device is an accelerator) and run on its own, as NumPy arrays: also where the
  first question about a loop comes while another function is being traced (the engine's)."""
  import jax
  with jax.default_device(jax.devices('cpu')[0]):
    compiled = jax.jit(function).lower(*arrays).compile()
    return [np.asarray(out) for out in compiled(*arrays)]


def mismatch(expected: np.ndarray, got: np.ndarray) -> Optional[str]:
  """None where `got` equals `expected` exactly (shape and every value), else what differs."""
  got = np.asarray(got)
  if got.shape != expected.shape:
    return f'shape {got.shape} instead of {expected.shape}'
  wrong = np.argwhere(got != expected)
  if not len(wrong):
    return None
  first = tuple(int(i) for i in wrong[0])
  return (f'{len(wrong)} of {expected.size} outputs wrong (first at {first}: '
          f'{got[first]!r} instead of {expected[first]!r})')


def agreeing(candidates: Sequence[str], check: Callable[[str], Optional[str]],
             verdicts: Dict[str, Optional[str]], what: str) -> tuple:
  """The candidates whose `check(loop)` (None: right; else what was wrong) passes, in order;
  each loop checked once (`verdicts` keeps the answers: loop -> None or the reason). Warns
  for each loop left out."""
  passed = []
  for loop in candidates:
    if loop not in verdicts:
      try:
        verdicts[loop] = check(loop)
      except Exception as e:  # an error in the loop's first call is a failed check too
        verdicts[loop] = f'{type(e).__name__}: {e}'
      if verdicts[loop] is not None:
        warnings.warn(f'the {what} loop {loop!r} computed its first-use check product '
                      f'wrong on this CPU and is not used: {verdicts[loop]}. Please report '
                      f'it with `lscpu` output.', RuntimeWarning, stacklevel=3)
    if verdicts[loop] is None:
      passed.append(loop)
  return tuple(passed)


def refused(verdicts: Dict[str, Optional[str]], loop: str) -> str:
  """' (loop failed its first-use check: ...)' where it did, else ''."""
  reason = verdicts.get(loop)
  return f' ({loop} failed its first-use check: {reason})' if reason else ''
