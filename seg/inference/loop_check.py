"""First-use checks of the kernels' product loops on the CPU at hand.

A loop runs only where the CPU has its instructions, and the test suite runs where the
machines are: the AMX-BF16 loop, for one, has been tested only through its stand-in
(`int8_kernel.emulate_loops`). So before a loop is offered (`float_kernel.loops`,
`float_kernel.f32_loops`, `int8_kernel.loops`), it computes one small product on
integer-valued data, whose sums are exact in any order and in each loop's precision, and the
result must equal NumPy's bit for bit. A loop that disagrees is left out, with a
RuntimeWarning saying which and how (the engine then takes the next loop down, or XLA), and
forcing it (SEG_*_KERNEL_ISA) is refused with the same reason. Once per loop and process.

A loop that crashes (an instruction the CPU or Linux refuses, a tile fault) or never ends
would take the asking process with it, so each loop first runs in a separate process
(`python -m seg.inference.loop_check`), once per kernel library and CPU: the same check,
then (`exercise`) the paper's network with random weights, two 257 x 257 images, in the
loop's dtype with the loop forced in every kernel that takes one. A loop whose process dies
in it (or does not end within TIMEOUT_S) is left out the same way, its process's end as
the reason. How each loop's process ended is kept beside the library (`record_path`), so
later processes skip this step (timeouts are not kept).

The product: ROWS x INPUTS x OUTPUTS, sizes that reach every tiling case (a whole 32-row
block of AMX tiles and a part of one, inputs padded to the loops' multiples, a partly used
panel of 16 outputs); the bfloat16 loops also take 64 bfloat16 inputs, which they read in
place.
"""

import hashlib
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import warnings
from typing import Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

ROWS, INPUTS, OUTPUTS = 40, 72, 40
CHILD = '_SEG_LOOP_CHECK_CHILD'  # set in the separate process: it runs the loops it is told
TIMEOUT_S = 300.0  # for the separate process (a check takes a fraction of a second)
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The variables that force each dtype's loop and its kernel formulation (`exercise`).
FORCING = {'int8': ('SEG_INT8_KERNEL_ISA', 'SEG_INT8_FORMULATION'),
           'bfloat16': ('SEG_BF16_KERNEL_ISA', 'SEG_BF16_FORMULATION'),
           'float32': ('SEG_F32_KERNEL_ISA', 'SEG_F32_FORMULATION')}
NETWORK_SIZE, NETWORK_BATCH = 257, 2


class Apart(NamedTuple):
  """Where the loops run apart first: the kernel library they are in (their record is kept
  beside it), what the separate process needs in its environment to run the same ones, and
  what to tell when one starts (None: nothing)."""
  library: str
  env: Mapping[str, str]
  log: Optional[Callable[[str], None]] = None


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


def agreeing(candidates: Sequence[str], check: str, verdicts: Dict[str, Optional[str]],
             what: str, apart: Optional[Apart] = None) -> tuple:
  """The candidates whose `check(loop)` (None: right; else what was wrong) passes, in order;
  each loop checked once (`verdicts` keeps the answers: loop -> None or the reason). Warns
  for each loop left out. `check`: 'module:function', looked up when called; `what`: the
  loops' dtype ('int8', 'bfloat16', 'float32'), or another name (no network is run).

  `apart` (None: skip this step): each loop first runs in a separate process (`survived`);
  one that does not survive it is left out without running here."""
  if os.environ.get(CHILD) == '1':  # the separate process: its loops run as it is told
    return tuple(candidates)
  if apart is not None:
    for loop, ended in survived(candidates, check, what, apart).items():
      if ended and loop not in verdicts:
        verdicts[loop] = ended
        warnings.warn(f'the {what} loop {loop!r} did not survive its first-use check, run in '
                      f'a separate process on this CPU, and is not used: {ended}. Please '
                      f'report it with `lscpu` output.', RuntimeWarning, stacklevel=3)
  passed = []
  for loop in candidates:
    if loop not in verdicts:
      try:
        verdicts[loop] = _function(check)(loop)
      except Exception as e:  # an error in the loop's first call is a failed check too
        verdicts[loop] = f'{type(e).__name__}: {e}'
      if verdicts[loop] is not None:
        warnings.warn(f'the {what} loop {loop!r} computed its first-use check product '
                      f'wrong on this CPU and is not used: {verdicts[loop]}. Please report '
                      f'it with `lscpu` output.', RuntimeWarning, stacklevel=3)
    if verdicts[loop] is None:
      passed.append(loop)
  return tuple(passed)


def _function(name: str) -> Callable:
  module, _, attribute = name.partition(':')
  return getattr(importlib.import_module(module), attribute)


def record_path(library: str) -> str:
  """Where how each loop's separate process ended is kept: beside `library` (or, where its
  directory cannot be written, in $TMPDIR/seg-kernels-UID), per CPU (its model and flags
  in /proc/cpuinfo)."""
  try:
    with open('/proc/cpuinfo') as f:
      cpu = f.read().split('\n\n')[0]
  except OSError:
    cpu = ''
  keep = ('vendor_id', 'cpu family', 'model', 'model name', 'stepping', 'flags')
  cpu = '\n'.join(line for line in cpu.splitlines() if line.split(':')[0].strip() in keep)
  directory, name = os.path.split(os.path.abspath(library))
  if not os.access(directory, os.W_OK):  # a library installed read-only
    directory = os.path.join(tempfile.gettempdir(), f'seg-kernels-{os.getuid()}')
  return os.path.join(directory,
                      f'{name}.loops-{hashlib.sha256(cpu.encode()).hexdigest()[:12]}.json')


def survived(loops: Sequence[str], check: str, what: str,
             apart: Apart) -> Dict[str, Optional[str]]:
  """loop -> None where `exercise(what, check, loop)` ran to its end in a separate process
  (`apart.env` added to its environment), else how that process ended in it (killed by a
  signal, exited, or not done within TIMEOUT_S); loops whose process failed before reaching
  them (then a RuntimeWarning) are absent. Read from `record_path(apart.library)` (`what`'s
  entry) where a process ran them before; what is learnt is added there, timeouts apart."""
  path = record_path(apart.library)
  try:
    with open(path) as f:
      record = json.load(f)
  except (OSError, ValueError):
    record = {}
  known = dict(record.get(what, {}))
  pending = [loop for loop in loops if loop not in known]
  lasting = {}
  while pending:
    if apart.log:
      apart.log(f"running the kernel's {what} loops ({', '.join(pending)}) in a separate "
                f'process first (once per CPU) ...')
    ran, stopped_in, ended, timed_out = _run_separately(what, check, pending, apart.env)
    lasting.update((loop, None) for loop in ran)
    known.update((loop, None) for loop in ran)
    if stopped_in is None:
      if ended:
        warnings.warn(f'the {what} loops {", ".join(pending[len(ran):])} could not be run '
                      f'in a separate process before this one ({ended}); they are checked '
                      f'in this process only', RuntimeWarning, stacklevel=3)
      break
    known[stopped_in] = ended
    if not timed_out:
      lasting[stopped_in] = ended
    pending = pending[pending.index(stopped_in) + 1:]
  if lasting:
    record[what] = {**record.get(what, {}), **lasting}
    try:  # atomically: processes beside this one read it
      os.makedirs(os.path.dirname(path), exist_ok=True)
      fd, tmp = tempfile.mkstemp(suffix='.json', dir=os.path.dirname(path))
      with os.fdopen(fd, 'w') as f:
        json.dump(record, f, indent=1, sort_keys=True)
      os.replace(tmp, path)
    except OSError:
      pass  # not kept: the next process runs them again
  return {loop: known[loop] for loop in loops if loop in known}


def _run_separately(what: str, check: str, loops: Sequence[str], env: Mapping[str, str]
                    ) -> Tuple[list, Optional[str], Optional[str], bool]:
  """Runs `exercise` on `loops` in order in a fresh Python process: (the loops it ended for
  there, the loop it stopped in or None, how it ended where it did not end well, whether it
  ran out of time)."""
  path = os.environ.get('PYTHONPATH')
  child_env = {**os.environ, **env, CHILD: '1', 'JAX_PLATFORMS': 'cpu',
               'PYTHONPATH': _ROOT + (os.pathsep + path if path else '')}
  command = [sys.executable, '-m', 'seg.inference.loop_check', what, check, *loops]
  timed_out = False
  try:
    done = subprocess.run(command, env=child_env, capture_output=True, timeout=TIMEOUT_S,
                          cwd=_ROOT)  # this `seg` first (`-m` puts the directory first)
    out, err, status = done.stdout, done.stderr, done.returncode
  except subprocess.TimeoutExpired as e:
    out, err, status, timed_out = e.stdout or b'', e.stderr or b'', None, True
  except OSError as e:
    return [], None, f'{type(e).__name__}: {e}', False
  lines = [line.split() for line in out.decode(errors='replace').splitlines()]
  started = [words[1] for words in lines if len(words) == 2 and words[0] == 'start']
  ran = [words[1] for words in lines if len(words) == 2 and words[0] == 'done']
  if timed_out:
    ended = f'its check did not end within {TIMEOUT_S:g} s'
  elif status < 0:
    try:
      ended = f'its process was killed by {signal.Signals(-status).name}'
    except ValueError:
      ended = f'its process was killed by signal {-status}'
  elif status:
    ended = f'its process exited with status {status}'
  else:
    return ran, None, None, False
  said = err.decode(errors='replace').strip().splitlines()
  if len(started) == len(ran):  # before any loop, or between two: not the loops' doing
    return ran, None, ended.replace('its ', 'the ', 1) + (
        f': {" / ".join(said[-3:])}' if said else ''), timed_out
  if status and status > 0 and said:  # an error: its last line
    ended += f' ({said[-1]})'
  return ran, started[-1], ended, timed_out


def refused(verdicts: Dict[str, Optional[str]], loop: str) -> str:
  """' (loop failed its first-use check: ...)' where it did, else ''."""
  reason = verdicts.get(loop)
  return f' ({loop} failed its first-use check: {reason})' if reason else ''


def exercise(what: str, check: str, loop: str) -> None:
  """What the separate process runs for `loop`: `check(loop)`, then, where `what` is a dtype
  (`FORCING`), the paper's network (random weights) on NETWORK_BATCH random images of
  NETWORK_SIZE squared in that dtype, with `loop` forced in the kernel. The check's errors
  are ignored (the asking process judges its numbers); the network's end the process."""
  try:
    _function(check)(loop)
  except Exception:
    pass
  if what not in FORCING:
    return
  from seg.config import default_config
  from seg.inference import benchmark, int8_kernel
  isa, formulation = FORCING[what]
  os.environ.update({isa: loop, formulation: 'kernel'})
  int8_kernel._state.pop('isa', None)  # the int8 loop is chosen once per process
  compile_network, engine, images = benchmark.random_network(
      default_config(), NETWORK_BATCH, NETWORK_SIZE, what)
  np.asarray(compile_network()(engine.folded, images))


def _main(argv: Sequence[str]) -> None:
  """The separate process: `python -m seg.inference.loop_check WHAT MODULE:FUNCTION LOOP...`
  runs `exercise` for each loop in order, saying when each starts and ends."""
  import resource
  resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a loop that crashes leaves no core file
  what, check = argv[:2]
  _function(check)  # importable, before any loop
  for loop in argv[2:]:
    print('start', loop, flush=True)
    exercise(what, check, loop)
    print('done', loop, flush=True)


if __name__ == '__main__':
  _main(sys.argv[1:])
