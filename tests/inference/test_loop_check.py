"""The kernels' first-use loop checks (seg/inference/loop_check.py): every loop of this CPU
(and every stand-in) computes the check product right, a loop computing it wrong is caught,
left out with a warning and refused when forced, and the engine then takes the next loop; a
loop whose separate process crashes or hangs is left out without running in the asking one."""

import functools
import json
import os
import sys
import textwrap
import warnings

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from seg.inference import cpu_features, engine, float_kernel, int8_kernel, loop_check

needs_kernels = pytest.mark.skipif(
    not int8_kernel.cpu_supported(), reason='the kernels need an x86-64 CPU with AVX2 and FMA')


def _fresh_state(monkeypatch, emulate=False):
  """Both kernel modules' cached loops and checks forgotten (restored after the test); the
  stand-ins on where `emulate` and the CPU runs them."""
  assert int8_kernel.available(), int8_kernel.unavailable_reason()
  monkeypatch.setattr(int8_kernel, '_state', dict(int8_kernel._state))
  monkeypatch.setattr(float_kernel, '_state', {})
  for name in ('loops', 'isa'):
    int8_kernel._state.pop(name, None)
  for key in list(int8_kernel._state):
    if isinstance(key, tuple) and key[0] == 'verdicts':
      del int8_kernel._state[key]
  if emulate:
    if not int8_kernel.EMULATED['amx'] <= cpu_features.cpu_flags():
      pytest.skip('the stand-ins need AVX-512 F, BW, VL and DQ')
    int8_kernel.emulate_loops(True)


def test_the_check_problem_is_exact_and_mismatches_are_described():
  x, w, b, expected = loop_check.integer_problem(-4, 4)
  xu, wu, bu, expected_u = loop_check.integer_problem(0, 4)
  assert np.array_equal(w, wu) and np.array_equal(b, bu) and x.min() < 0 <= xu.min()
  # Every sum is an integer well inside float32's (and bfloat16 products') exact range.
  assert np.abs(expected).max() < 2**11 and set(np.unique(w)) <= set(range(-3, 4))
  assert np.array_equal(np.float64(x) @ np.float64(w) + b, expected)
  assert loop_check.mismatch(expected, expected.astype(np.float32)) is None
  wrong = expected.astype(np.float32)
  wrong[3, 17] += 1
  assert loop_check.mismatch(expected, wrong) == (
      f'1 of {expected.size} outputs wrong (first at (3, 17): {wrong[3, 17]!r} instead of '
      f'{expected[3, 17]!r})')
  assert 'shape' in loop_check.mismatch(expected, wrong[:, :8])


@needs_kernels
@pytest.mark.parametrize('emulate', [False, True])
def test_every_loop_here_computes_the_check_right(emulate, monkeypatch):
  """Each loop the CPU offers (and with `emulate`, the AMX and AVX-VNNI stand-ins) passes:
  nothing is left out, and the checks ran (a verdict per loop)."""
  _fresh_state(monkeypatch, emulate)
  offered = {
      'int8': (int8_kernel.loops(cpu_features.cpu_flags()), int8_kernel.loops,
               int8_kernel.loop_verdicts),
      'bfloat16': (float_kernel.loops(cpu_features.cpu_flags()), float_kernel.loops,
                   float_kernel.loop_verdicts),
  }
  for what, (candidates, checked, verdicts) in offered.items():
    assert checked() == candidates, what
    assert verdicts() == {loop: None for loop in candidates}, what
  assert float_kernel.f32_loops() == (('avx2', 'avx512') if int8_kernel.AVX512_FLAGS <=
                                      cpu_features.cpu_flags() else ('avx2',))
  assert float_kernel.loop_verdicts(jnp.float32) == {
      loop: None for loop in float_kernel.f32_loops()}
  if emulate:
    assert 'amx' in int8_kernel.loops() and 'amx' in float_kernel.loops()


@needs_kernels
def test_the_checks_run_where_the_engine_first_asks_inside_a_trace(monkeypatch):
  """The engine first asks for its loops while tracing its network: the checks' own products
  then run apart from that trace, and every loop still passes."""
  _fresh_state(monkeypatch)
  asked = {}

  def traced(x):
    asked.update(int8=int8_kernel.isa(), float32=float_kernel.f32_isa(),
                 bfloat16=float_kernel.loops())
    return x + 1

  with warnings.catch_warnings():
    warnings.simplefilter('error')  # a failed check warns
    assert float(jax.jit(traced)(1.0)) == 2.0
  assert asked['int8'] == int8_kernel.loops(cpu_features.cpu_flags())[-1]
  assert asked['float32'] == float_kernel.f32_loops()[-1]
  assert asked['bfloat16'] == float_kernel.loops(cpu_features.cpu_flags())
  verdicts = {**int8_kernel.loop_verdicts(), **float_kernel.loop_verdicts(jnp.float32)}
  assert verdicts and set(verdicts.values()) == {None}


def _swap_two_inputs(pack):
  """A packer that swaps the weights of inputs 0 and 5: the wrong numbers a loop reading
  its panels at the wrong place would give."""
  def packed(w, *args):
    w = np.array(w)
    w[[0, 5]] = w[[5, 0]]
    return pack(w, *args)
  return packed


@needs_kernels
@pytest.mark.parametrize('kind', ['int8', 'bfloat16', 'float32'])
def test_the_check_catches_a_loop_computing_wrong(kind, monkeypatch):
  """The check runs the real loop and compares: weights out of place (as a loop reading
  them wrong would use them) give a described mismatch, for every loop."""
  _fresh_state(monkeypatch)
  if kind == 'int8':
    module, loops, check = int8_kernel, int8_kernel.loops(), int8_kernel.check_loop
  else:
    dtype = jnp.float32 if kind == 'float32' else jnp.bfloat16
    module, check = float_kernel, functools.partial(float_kernel._check_loop, dtype=dtype)
    loops = float_kernel.f32_loops() if kind == 'float32' else float_kernel.loops()
  if not loops:
    pytest.skip(f'no {kind} loop here')
  for loop in loops:
    assert check(loop) is None
  monkeypatch.setattr(module, 'pack_weights', _swap_two_inputs(module.pack_weights))
  for loop in loops:
    assert 'outputs wrong (first at' in check(loop), loop


@needs_kernels
def test_a_loop_computing_wrong_is_left_out_and_refused(monkeypatch):
  """A failing loop is not offered (a RuntimeWarning names it), the engine's choice takes the
  next one down, and forcing it says why it is refused; where no bfloat16 loop is left the
  bfloat16 kernel is unavailable and the engine's formulation falls back to XLA."""
  _fresh_state(monkeypatch, emulate=True)
  real = float_kernel._check_loop
  monkeypatch.setattr(float_kernel, '_check_loop', lambda loop, dtype: (
      'made wrong by the test' if loop == 'amx' else real(loop, dtype)))
  with pytest.warns(RuntimeWarning, match="bfloat16 loop 'amx' computed its first-use check "
                                          "product wrong on this CPU"):
    assert 'amx' not in float_kernel.loops()
  assert float_kernel.isa() == float_kernel.loops()[-1]
  monkeypatch.setenv('SEG_BF16_KERNEL_ISA', 'amx')
  with pytest.raises(RuntimeError, match='amx failed its first-use check: made wrong by'):
    float_kernel.isa()
  monkeypatch.delenv('SEG_BF16_KERNEL_ISA')

  # Every bfloat16 loop wrong: no bfloat16 kernel, XLA's bfloat16 instead.
  float_kernel._state.clear()
  monkeypatch.setattr(float_kernel, '_check_loop', lambda loop, dtype: (
      real(loop, dtype) if dtype == jnp.float32 else 'made wrong by the test'))
  with pytest.warns(RuntimeWarning):
    assert float_kernel.loops() == ()
  assert 'no bfloat16 loop computed its first-use check product right' in (
      float_kernel.unavailable_reason())
  assert engine.float_formulation_for('bfloat16', 'cpu', 'kernel') == 'xla'
  assert float_kernel.f32_isa() in float_kernel.F32_LOOPS  # float32 unaffected

  # int8: the fastest loop wrong, the next one chosen; forcing it refused.
  fastest = int8_kernel.loops(cpu_features.cpu_flags())[-1]
  real_int8 = int8_kernel.check_loop
  monkeypatch.setattr(int8_kernel, 'check_loop', lambda loop: (
      'made wrong by the test' if loop == fastest else real_int8(loop)))
  with pytest.warns(RuntimeWarning, match=f"int8 loop '{fastest}'"):
    assert int8_kernel.isa() == int8_kernel.loops(cpu_features.cpu_flags())[-2]
  int8_kernel._state.pop('isa')
  monkeypatch.setenv('SEG_INT8_KERNEL_ISA', fastest)
  with pytest.raises(RuntimeError, match=f'{fastest} failed its first-use check'):
    int8_kernel.isa()


# A stand-in check module for the separate process: each "loop" behaves as its name says.
_CHECKS = '''
import os, signal, time

def check(loop):
  if loop.startswith('segv'):
    os.kill(os.getpid(), signal.SIGSEGV)  # what a loop reading outside its memory gets
  if loop == 'sigill':
    os.kill(os.getpid(), signal.SIGILL)  # an instruction the CPU or Linux refuses
  if loop == 'exits':
    os._exit(3)
  if loop == 'hangs':
    time.sleep(600)
  return 'made wrong by the test' if loop == 'wrong' else None
'''


@pytest.fixture
def stand_in_checks(tmp_path, monkeypatch):
  """'checks_for_test:check' importable here and in the separate process; returns where to
  run them apart: a library at tmp_path/lib.so (it need not exist). The working directory
  holds another `seg` package, which the separate process must not import."""
  (tmp_path / 'checks_for_test.py').write_text(_CHECKS)
  (tmp_path / 'user' / 'seg').mkdir(parents=True)
  (tmp_path / 'user' / 'seg' / '__init__.py').write_text('raise ImportError("not this seg")')
  monkeypatch.chdir(tmp_path / 'user')
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setenv('PYTHONPATH', str(tmp_path))
  return loop_check.Apart(str(tmp_path / 'lib.so'), {})


def test_loops_that_crash_their_separate_process_are_left_out_and_remembered(
    stand_in_checks, monkeypatch):
  """A loop whose process dies (a signal, an exit) is left out with a warning saying how,
  without running in this process (it would take it down); the loops after it are still
  checked apart and here; the record keeps how each ended, and a later process reads it
  instead of running them again."""
  told = []
  apart = stand_in_checks._replace(log=told.append)
  loops = ['fine', 'segv', 'wrong', 'sigill', 'exits', 'after']
  verdicts = {}
  with pytest.warns(RuntimeWarning) as caught:
    passed = loop_check.agreeing(loops, 'checks_for_test:check', verdicts, 'test', apart)
  assert passed == ('fine', 'after')
  assert told == [  # one process, then one for the loops after each that did not survive
      f"running the kernel's test loops ({', '.join(loops[i:])}) in a separate process "
      f"first (once per CPU) ..." for i in (0, 2, 4, 5)]
  assert verdicts == {
      'fine': None, 'segv': 'its process was killed by SIGSEGV',
      'wrong': 'made wrong by the test', 'sigill': 'its process was killed by SIGILL',
      'exits': 'its process exited with status 3', 'after': None}
  said = ' | '.join(str(w.message) for w in caught)
  assert ("the test loop 'segv' did not survive its first-use check, run in a separate "
          "process on this CPU, and is not used: its process was killed by SIGSEGV") in said
  assert "'wrong' computed its first-use check product wrong" in said and 'SIGILL' in said
  with open(loop_check.record_path(apart.library)) as f:
    assert json.load(f) == {'test': {
        'fine': None, 'segv': 'its process was killed by SIGSEGV', 'wrong': None,
        'sigill': 'its process was killed by SIGILL',
        'exits': 'its process exited with status 3', 'after': None}}

  # Later: from the record, no process started (none could be); a new loop, needing one,
  # is checked here only.
  monkeypatch.setattr(sys, 'executable', '/nonexistent/python')
  verdicts = {}
  with pytest.warns(RuntimeWarning) as caught:
    assert loop_check.agreeing(loops, 'checks_for_test:check', verdicts, 'test',
                               apart) == ('fine', 'after')
  assert [str(w.message).split("'")[1] for w in caught] == ['segv', 'sigill', 'exits', 'wrong']
  assert verdicts['exits'] == 'its process exited with status 3'
  with pytest.warns(RuntimeWarning, match='could not be run in a separate process before '
                                          'this one'):
    assert loop_check.survived(['fine', 'new'], 'checks_for_test:check', 'test',
                               apart) == {'fine': None}
  # Another library has its own record; a library in a directory that cannot be written has
  # it in the temporary directory.
  beside = loop_check.record_path(apart.library)
  assert loop_check.record_path(apart.library + '2') != beside
  library_dir = os.path.dirname(apart.library)
  assert os.path.dirname(beside) == library_dir
  real_access = os.access
  monkeypatch.setattr(os, 'access', lambda path, mode: path != library_dir and real_access(
      path, mode))
  elsewhere = loop_check.record_path(apart.library)
  assert elsewhere == os.path.join(loop_check.tempfile.gettempdir(),
                                   f'seg-kernels-{os.getuid()}', os.path.basename(beside))


def test_a_loop_that_hangs_is_left_out_but_not_remembered(stand_in_checks, monkeypatch):
  """A check that does not end within the time allowed marks its loop left out in this
  process only (a loaded machine can be slow); the loops before it are remembered."""
  monkeypatch.setattr(loop_check, 'TIMEOUT_S', 5.0)
  with pytest.warns(RuntimeWarning, match="'hangs' did not survive .* did not end within 5 s"):
    assert loop_check.agreeing(['fine', 'hangs', 'after'], 'checks_for_test:check', {},
                               'test', stand_in_checks) == ('fine', 'after')
  with open(loop_check.record_path(stand_in_checks.library)) as f:
    assert json.load(f) == {'test': {'fine': None, 'after': None}}


def test_where_the_separate_process_fails_the_loops_are_checked_here(stand_in_checks):
  """A separate process that fails before any loop (here its check cannot be imported)
  says so, and the loops are then checked in this process alone; nothing is recorded."""
  def check(loop):
    return None if loop == 'fine' else 'made wrong by the test'
  sys.modules['checks_in_this_process'] = type(sys)('checks_in_this_process')
  sys.modules['checks_in_this_process'].check = check
  try:
    with pytest.warns(RuntimeWarning) as caught:
      assert loop_check.agreeing(['fine', 'wrong'], 'checks_in_this_process:check', {},
                                 'test', stand_in_checks) == ('fine',)
  finally:
    del sys.modules['checks_in_this_process']
  said = ' | '.join(str(w.message) for w in caught)
  assert 'the test loops fine, wrong could not be run in a separate process' in said
  assert 'the process exited with status 1' in said and 'ModuleNotFoundError' in said
  assert not os.path.exists(loop_check.record_path(stand_in_checks.library))


@needs_kernels
def test_every_real_loop_here_survives_its_separate_process(monkeypatch):
  """This CPU's loops ran apart once per library and CPU: the record beside the library has
  each loop offered, all survived; in the separate process itself nothing is checked."""
  _fresh_state(monkeypatch)
  offered = {'int8': int8_kernel.loops(), 'bfloat16': float_kernel.loops(),
             'float32': float_kernel.f32_loops()}
  library, env, _ = int8_kernel.apart()
  assert env == {'SEG_INT8_LOOP_EMULATION': '0'}
  with open(loop_check.record_path(library)) as f:
    record = json.load(f)
  for what, loops in offered.items():
    assert {loop: record[what][loop] for loop in loops} == {loop: None for loop in loops}
  monkeypatch.setenv(loop_check.CHILD, '1')
  assert loop_check.agreeing(['a', 'b'], 'no_such_module:check', {}, 'test',
                             int8_kernel.apart()) == ('a', 'b')


@needs_kernels
@pytest.mark.parametrize('what', ['int8', 'bfloat16', 'float32'])
def test_the_separate_process_runs_the_network_in_the_loop(what, monkeypatch):
  """What the separate process does for a loop (`exercise`), here in this process: after the
  check, the network runs in the kernel with that loop forced (the kernels' calls recorded
  while it runs, and the slowest loop chosen where it is not the default)."""
  _fresh_state(monkeypatch)
  offered = {'int8': int8_kernel.loops, 'bfloat16': float_kernel.loops,
             'float32': float_kernel.f32_loops}[what]()
  if not offered:
    pytest.skip(f'no {what} loop here')
  loop = offered[0]
  for variable in loop_check.FORCING[what]:
    monkeypatch.setenv(variable, 'auto')  # restored after the test
  check = {'int8': 'seg.inference.int8_kernel:check_loop',
           'bfloat16': 'seg.inference.float_kernel:check_bf16_loop',
           'float32': 'seg.inference.float_kernel:check_f32_loop'}[what]
  int8_kernel.record_call_times(True)
  try:
    loop_check.exercise(what, check, loop)
  finally:
    int8_kernel.record_call_times(False)
  # The check's calls and the network's: 17 blocks, each at least one kernel call.
  assert len(int8_kernel.call_times()) > 17
  chosen = {'int8': int8_kernel.isa, 'bfloat16': float_kernel.isa,
            'float32': float_kernel.f32_isa}[what]()
  assert chosen == loop
