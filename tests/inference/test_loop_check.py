"""The kernels' first-use loop checks (seg/inference/loop_check.py): every loop of this CPU
(and every stand-in) computes the check product right, a loop computing it wrong is caught,
left out with a warning and refused when forced, and the engine then takes the next loop."""

import functools
import warnings

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from seg.inference import cpu_features, engine, float_kernel, int8_kernel, loop_check

pytestmark = pytest.mark.skipif(
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


@pytest.mark.parametrize('kind', ['int8', 'bfloat16', 'float32'])
def test_the_check_catches_a_loop_computing_wrong(kind, monkeypatch):
  """The check runs the real loop and compares: weights out of place (as a loop reading
  them wrong would use them) give a described mismatch, for every loop."""
  _fresh_state(monkeypatch)
  if kind == 'int8':
    module, loops, check = int8_kernel, int8_kernel.loops(), int8_kernel._check_loop
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
  real_int8 = int8_kernel._check_loop
  monkeypatch.setattr(int8_kernel, '_check_loop', lambda loop: (
      'made wrong by the test' if loop == fastest else real_int8(loop)))
  with pytest.warns(RuntimeWarning, match=f"int8 loop '{fastest}'"):
    assert int8_kernel.isa() == int8_kernel.loops(cpu_features.cpu_flags())[-2]
  int8_kernel._state.pop('isa')
  monkeypatch.setenv('SEG_INT8_KERNEL_ISA', fastest)
  with pytest.raises(RuntimeError, match=f'{fastest} failed its first-use check'):
    int8_kernel.isa()
