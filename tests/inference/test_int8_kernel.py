"""The fused int8 product kernel (seg/inference/int8_kernel.cc) against NumPy integer
arithmetic, and the engine's 'kernel' formulation against XLA's int8 and float32."""

import time

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from helpers import EVAL_SIZE
from seg.inference import cpu_features, engine, int8_kernel, quantize

pytestmark = pytest.mark.skipif(
    not int8_kernel.cpu_supported(), reason='the kernel needs an x86-64 CPU with AVX2 and FMA')


def _use_loop(loop, monkeypatch):
  """Skips unless this CPU runs `loop`; 'amx' and 'avxvnni' run in their stand-ins
  (`int8_kernel.emulate_loops`) where the CPU lacks them but runs those, for this test only."""
  if loop in int8_kernel.EMULATED and loop not in int8_kernel.loops() and (
      int8_kernel.EMULATED[loop] <= cpu_features.cpu_flags()):
    monkeypatch.setattr(int8_kernel, '_state', dict(int8_kernel._state))  # restored afterwards
    int8_kernel.emulate_loops(True)
  if loop not in int8_kernel.loops():
    pytest.skip(f'this CPU runs the loops {int8_kernel.loops()}, not {loop}')


def _numpy_product(x, w, scale, bias, mode, inv_out):
  """The kernel's definition in NumPy: exact integer sums, then float32 as written."""
  acc = x.reshape(-1, x.shape[-1]).astype(np.int64) @ w.astype(np.int64)
  # A fused multiply-add: the float32 product is exact in float64, the sum rounded once.
  fma = lambda a, s, b: (a.astype(np.float32).astype(np.float64) * s + b).astype(np.float32)
  if mode in ('relu6_uint8', 'linear_int8', 'linear_offset_uint8'):  # requantised by 1 / inv_out
    y = fma(acc, (scale * inv_out).astype(np.float32), (bias * inv_out).astype(np.float32))
    # round half to even; ReLU6 (inv_out >= 127 / 6: 127 caps it) or symmetric int8
    low = 0 if mode == 'relu6_uint8' else -127
    q = np.clip(np.round(y), low, 127).reshape(x.shape[:-1] + (w.shape[1],))
    if mode == 'linear_offset_uint8':  # + 128, as uint8
      return (q + 128).astype(np.uint8)
    return q.astype(np.uint8 if mode == 'relu6_uint8' else np.int8)
  y = fma(acc, scale, bias)
  if mode != 'linear':
    y = np.maximum(y, np.float32(0))
  if mode == 'relu6':
    y = np.minimum(y, np.float32(6))
  return y.reshape(x.shape[:-1] + (w.shape[1],))


@pytest.mark.parametrize('signed', [False, True, 'offset'])
@pytest.mark.parametrize('mode', ['linear', 'relu6', 'relu', 'relu6_uint8', 'linear_int8',
                                  'linear_offset_uint8'])
@pytest.mark.parametrize('loop,k_multiple,k', [
    ('avx2', 4, 52), ('avx2', 4, 136), ('avxvnni', 4, 52), ('avxvnni', 4, 136),
    ('vnni', 4, 52), ('vnni', 4, 136),
    ('avxvnni', 4, 16), ('avxvnni', 4, 28),  # the VNNI loops' unrolled inputs (k <= 32)
    ('vnni', 4, 16), ('vnni', 4, 28),
    ('vnni', 64, 52),  # weights padded for AMX tiles (an AMX CPU's VNNI fallback)
    ('amx', 64, 52), ('amx', 64, 136)])
def test_the_kernel_computes_the_integer_product_exactly(signed, mode, loop, k_multiple, k,
                                                        monkeypatch):
  """Each loop the CPU runs (the others are skipped), with inputs that are one partial AMX
  tile (52) or two and a part (136), and for the VNNI loops the widths they unroll (16, 28);
  signed inputs go through the VNNI loops' offset, given as int8 or ('offset') as x + 128 in
  uint8."""
  assert int8_kernel.available(), int8_kernel.unavailable_reason()
  _use_loop(loop, monkeypatch)
  rng = np.random.default_rng(hash((signed, mode, k)) % 2**32)
  # Rows not a multiple of the 4-row tile, the 32-row AMX block or the 64-row chunk, outputs
  # not a multiple of the 16-channel panel (7 panels: the VNNI loop's 4-, 2- and 1-panel
  # tiles, the AMX loop's pairs and a single one), a batch axis; extreme values (+-127
  # everywhere) in the first row.
  x = rng.integers(-127 if signed else 0, 128, (3, 45, k)).astype(np.int8 if signed else
                                                                 np.uint8)
  x[0, 0] = 127
  given = (x.astype(np.int16) + 128).astype(np.uint8) if signed == 'offset' else x
  w = rng.integers(-127, 128, (k, 101)).astype(np.int8)
  w[:, 0] = 127 if not signed else -127
  scale = rng.uniform(2e-5, 2e-4, 101).astype(np.float32)
  bias = rng.normal(0, 1, 101).astype(np.float32)
  inv_out = np.float32(127 / 6)
  got = jax.jit(lambda x, w: int8_kernel.product(
      x, w, jnp.asarray(scale), jnp.asarray(bias), mode, inv_out, loop,
      offset_input=signed == 'offset'))(
      jnp.asarray(given), jnp.asarray(int8_kernel.pack_weights(w, k_multiple)))
  expected = _numpy_product(x, w, scale, bias, mode, inv_out)
  assert got.dtype == expected.dtype and got.shape == expected.shape
  np.testing.assert_array_equal(np.asarray(got), expected)
  if mode == 'relu6_uint8':  # clipped at both ends and rounded in between
    assert (expected == 0).any() and (expected == 127).any() and len(np.unique(expected)) > 60
    # and it is ReLU6's output in steps of 1 / inv_out, to within the rounding
    exact = (x.astype(np.int64) @ w.astype(np.int64)) * scale.astype(np.float64) + bias
    direct = np.round(np.clip(exact, 0, 6) * inv_out)
    assert np.abs(np.asarray(got, np.float64) - direct).max() <= 1
    assert (np.asarray(got) == direct).mean() > 0.99
  if mode in ('linear_int8', 'linear_offset_uint8'):  # clipped at both ends, in steps
    if mode == 'linear_offset_uint8':
      expected = expected.astype(np.int16) - 128
      got = np.asarray(got, np.int16) - 128
    assert (expected == -127).any() and (expected == 127).any()
    exact = (x.astype(np.int64) @ w.astype(np.int64)) * scale.astype(np.float64) + bias
    direct = np.clip(np.round(exact * inv_out), -127, 127)
    assert np.abs(np.asarray(got, np.float64) - direct).max() <= 1
    assert (np.asarray(got) == direct).mean() > 0.99


@pytest.mark.parametrize('loop', ['avxvnni', 'amx'])
def test_the_stand_ins_compute_what_the_real_loops_do(loop, monkeypatch):
  """On a CPU with AMX tiles (AVX-VNNI): the emulated tiles (the instruction's AVX-512 VL
  encoding), which check that loop elsewhere, give the real loop's outputs, in both input
  forms and a requantising mode."""
  if loop not in int8_kernel.loops() or int8_kernel.loops_emulated() or not (
      int8_kernel.EMULATED[loop] <= cpu_features.cpu_flags()):
    pytest.skip(f'this CPU has no {loop} loop with a stand-in (loops {int8_kernel.loops()})')
  monkeypatch.setattr(int8_kernel, '_state', dict(int8_kernel._state))  # restored afterwards
  rng = np.random.default_rng(11)
  w = jnp.asarray(int8_kernel.pack_weights(rng.integers(-127, 128, (200, 72)).astype(np.int8),
                                           64))
  scale = jnp.asarray(rng.uniform(2e-5, 2e-4, 72), jnp.float32)
  bias = jnp.asarray(rng.normal(0, 1, 72), jnp.float32)
  for x in (rng.integers(0, 128, (77, 200)).astype(np.uint8),
            rng.integers(-127, 128, (77, 200)).astype(np.int8)):
    got = {}
    for emulated in (False, True):
      int8_kernel.emulate_loops(emulated)
      got[emulated] = np.asarray(jax.jit(lambda x: int8_kernel.product(
          x, w, scale, bias, 'relu6_uint8', 127 / 6, loop))(jnp.asarray(x)))
    np.testing.assert_array_equal(got[True], got[False])
    assert len(np.unique(got[False])) > 60


@pytest.mark.parametrize('loop', ['avx2', 'avxvnni', 'vnni', 'amx'])
@pytest.mark.parametrize('requantised,keep_float,with_residual', [
    ('offset_uint8', True, True), ('offset_uint8', False, True), ('int8', True, False),
    ('int8', False, True), (None, True, True)])
def test_a_projection_adds_the_residual_and_writes_the_next_input(
    loop, requantised, keep_float, with_residual, monkeypatch):
  """Mode 'linear' with a residual sum and the sum requantised for the next product (as
  XLA's add and quantisation compute them), with and without the float32 sum, over each
  loop the CPU runs."""
  assert int8_kernel.available(), int8_kernel.unavailable_reason()
  _use_loop(loop, monkeypatch)
  rng = np.random.default_rng(len(str(requantised)) + keep_float + 2 * with_residual)
  k, n = 64 if loop == 'amx' else 36, 41  # outputs: 2 whole panels and 9 channels more
  x = rng.integers(0, 128, (2, 37, k)).astype(np.uint8)
  w = rng.integers(-127, 128, (k, n)).astype(np.int8)
  scale = rng.uniform(2e-5, 2e-4, n).astype(np.float32)
  bias = rng.normal(0, 1, n).astype(np.float32)
  residual = rng.normal(0, 2, (2, 37, n)).astype(np.float32) if with_residual else None
  inv = np.float32(127 / 5)
  got = jax.jit(lambda x, w, r: int8_kernel.product(
      x, w, jnp.asarray(scale), jnp.asarray(bias), 'linear', inv, loop, residual=r,
      requantised=requantised, keep_float=keep_float))(
          jnp.asarray(x), jnp.asarray(int8_kernel.pack_weights(w, 64 if loop == 'amx' else 4)),
          None if residual is None else jnp.asarray(residual))
  y = _numpy_product(x, w, scale, bias, 'linear', inv)
  if residual is not None:
    y = (y + residual).astype(np.float32)
  q = np.clip(np.round(y * inv), -127, 127)  # XLA's quantisation of the sum
  q = (q + 128).astype(np.uint8) if requantised == 'offset_uint8' else q.astype(np.int8)
  if requantised is None:
    np.testing.assert_array_equal(np.asarray(got), y)
    return
  float_out, q_out = got if keep_float else (None, got)
  if keep_float:
    np.testing.assert_array_equal(np.asarray(float_out), y)
  assert q_out.dtype == q.dtype
  np.testing.assert_array_equal(np.asarray(q_out), q)
  assert len(np.unique(q)) > 100 and (np.abs(q.astype(int) - (128 if q.dtype == np.uint8
                                                              else 0)) == 127).any()


def test_residuals_and_requantised_outputs_are_mode_linears():
  assert int8_kernel.available(), int8_kernel.unavailable_reason()
  x, w = jnp.zeros((3, 4), jnp.uint8), jnp.asarray(int8_kernel.pack_weights(np.ones((4, 16),
                                                                                     np.int8)))
  s, b = jnp.ones(16), jnp.zeros(16)
  with pytest.raises(ValueError, match="mode 'linear'"):
    int8_kernel.product(x, w, s, b, 'relu', requantised='int8')
  with pytest.raises(ValueError, match='keep_float'):
    int8_kernel.product(x, w, s, b, keep_float=False)
  with pytest.raises(ValueError, match='residual must be'):
    int8_kernel.product(x, w, s, b, residual=jnp.zeros((3, 8)))


def _same_pads(size, k, stride, dilation=1):
  """TensorFlow's 'SAME' padding (before, after), written out again for the references."""
  total = max((-(-size // stride) - 1) * stride + (k - 1) * dilation + 1 - size, 0)
  return total // 2, total - total // 2


def _numpy_depthwise(x, w, b, stride, dilation, inv_out):
  """int8_depthwise.cc's definition in NumPy: TensorFlow's 'SAME' zero padding, from the
  bias, each tap added in the order (i, j) by a fused multiply-add (its float32 product is
  exact in float64, the sum rounded once), ReLU6, rounded to the output scale."""
  n, h, wd, c = x.shape
  kh, kw = w.shape[:2]
  out_h, out_w = -(-h // stride), -(-wd // stride)
  xp = np.pad(x.astype(np.float32), ((0, 0), _same_pads(h, kh, stride, dilation),
                                      _same_pads(wd, kw, stride, dilation), (0, 0)))
  acc = np.broadcast_to(b, (n, out_h, out_w, c)).astype(np.float32)
  for i in range(kh):
    for j in range(kw):
      tap = xp[:, i * dilation::stride, j * dilation::stride][:, :out_h, :out_w]
      acc = (tap.astype(np.float64) * w[i, j] + acc).astype(np.float32)
  y = np.clip(acc, np.float32(0), np.float32(6))
  return np.minimum(np.round(y * np.float32(inv_out)), 127).astype(np.uint8)


@pytest.mark.parametrize('loop', ['avx2', 'vnni'])
@pytest.mark.parametrize('shape,stride,dilation', [
    ((2, 13, 11, 24), 1, 1), ((1, 14, 9, 16), 2, 1), ((1, 13, 13, 40), 2, 1),
    ((1, 12, 10, 8), 1, 2), ((1, 11, 12, 32), 1, 4), ((3, 40, 37, 48), 1, 1),
    ((1, 45, 43, 56), 2, 1)])
def test_the_depthwise_kernel_computes_xlas_float32_taps(loop, shape, stride, dilation,
                                                        monkeypatch):
  """Odd and even sizes (at stride 2 'SAME' pads more below and right than above), dilations
  (output stride 16's and 8's last blocks), sizes that are and are not whole 4- and 8-pixel
  steps and bands of rows, 8 channels left after the 16-channel steps (24, 40, 8, 56),
  against NumPy and the engine's XLA taps; in the AVX2 loop and the AVX-512 one (beside the
  VNNI loop)."""
  assert int8_kernel.available(), int8_kernel.unavailable_reason()
  _use_loop(loop, monkeypatch)
  rng = np.random.default_rng(sum(shape) + stride)
  x = rng.integers(0, 128, shape).astype(np.uint8)
  x[0, 0, 0] = 127
  c = shape[-1]
  w = rng.normal(0, 0.02, (3, 3, c)).astype(np.float32)  # a ReLU6 scale (<= 6/127) folded in
  b = rng.normal(0.5, 1, c).astype(np.float32)
  inv_out = np.float32(127 / 5.5)
  got = np.asarray(jax.jit(lambda x: int8_kernel.depthwise(
      x, jnp.asarray(w), jnp.asarray(b), stride, dilation, inv_out, loop))(jnp.asarray(x)))
  expected = _numpy_depthwise(x, w, b, stride, dilation, inv_out)
  assert got.dtype == np.uint8 and got.shape == expected.shape
  np.testing.assert_array_equal(got, expected)
  assert (expected == 0).any() and (expected == 127).any() and len(np.unique(expected)) > 60
  # What the engine computes without the kernel: XLA's taps, ReLU6, then the projection's
  # quantisation of its input.
  from seg.inference.forward import _depthwise
  xla = jax.jit(lambda x: quantize.quantize_input(
      quantize._relu6(_depthwise(x, jnp.asarray(w), jnp.asarray(b), stride, dilation)),
      inv_out, jnp.uint8, signed=False))(jnp.asarray(x))
  assert np.abs(np.asarray(xla, np.int32) - got).max() <= 1
  assert (np.asarray(xla) == got).mean() > 0.999


def _numpy_stem(x, ws, bs, wd, bd, inv_out):
  """int8_stem.cc's definition in NumPy: the stem (3x3, stride 2, 'SAME' zero padding) from
  its bias, the 27 taps added in the order (i, j, k) by fused multiply-adds, ReLU6; then the
  depthwise layer (`_numpy_depthwise`: stride 1, its own zero padding) and the rounding."""
  n, h, w, _ = x.shape
  out_h, out_w = -(-h // 2), -(-w // 2)
  xp = np.pad(x, ((0, 0), _same_pads(h, 3, 2), _same_pads(w, 3, 2), (0, 0)))
  acc = np.broadcast_to(bs, (n, out_h, out_w, ws.shape[-1])).astype(np.float32)
  for i in range(3):
    for j in range(3):
      tap = xp[:, i::2, j::2][:, :out_h, :out_w]
      for k in range(3):
        acc = (tap[..., k:k + 1].astype(np.float64) * ws[i, j, k] + acc).astype(np.float32)
  return _numpy_depthwise(np.clip(acc, np.float32(0), np.float32(6)), wd, bd, 1, 1, inv_out)


@pytest.mark.parametrize('loop', ['avx2', 'vnni'])
@pytest.mark.parametrize('shape,c', [((2, 37, 41, 3), 16), ((1, 20, 18, 3), 24),
                                     ((1, 65, 66, 3), 40), ((1, 2, 3, 3), 8),
                                     ((1, 31, 29, 3), 48), ((2, 513, 513, 3), 32)])
def test_the_stem_kernel_computes_xlas_float32_layers(loop, shape, c, monkeypatch):
  """The stem and block 0's depthwise layer in one pass: odd and even sizes (an even size
  pads only below and right at stride 2), 32-channel steps with 24, 16 or 8 channels left,
  images of one and two stem rows, a full-size pair (several chunks of rows per image),
  against NumPy and the engine's XLA layers; in the AVX2 loops and the AVX-512 ones (beside
  the VNNI loop, for multiples of 16 channels)."""
  assert int8_kernel.available(), int8_kernel.unavailable_reason()
  _use_loop(loop, monkeypatch)
  rng = np.random.default_rng(sum(shape) + c)
  x = rng.uniform(-1, 1, shape).astype(np.float32)
  ws = rng.normal(0, 0.4, (3, 3, 3, c)).astype(np.float32)
  bs = rng.normal(0.5, 1, c).astype(np.float32)
  wd = rng.normal(0, 0.4, (3, 3, c)).astype(np.float32)
  bd = rng.normal(0.5, 1, c).astype(np.float32)
  inv_out = np.float32(127 / 5.5)
  args = [jnp.asarray(a) for a in (ws, bs, wd, bd)]
  got = np.asarray(jax.jit(lambda x: int8_kernel.stem(x, *args, inv_out, loop=loop))(
      jnp.asarray(x)))
  expected = _numpy_stem(x, ws, bs, wd, bd, inv_out)
  assert got.dtype == np.uint8 and got.shape == expected.shape == shape[:1] + (
      -(-shape[1] // 2), -(-shape[2] // 2), c)
  np.testing.assert_array_equal(got, expected)
  if expected.size > 2000:
    assert (expected == 0).any() and (expected == 127).any() and len(np.unique(expected)) > 60
  # What the engine computes without it: XLA's stem and taps, then the quantisation.
  from seg.inference.forward import _depthwise, _stem
  xla = jax.jit(lambda x: quantize.quantize_input(quantize._relu6(_depthwise(
      quantize._relu6(_stem(x, args[0], args[1])), args[2], args[3], 1, 1)), inv_out,
      jnp.uint8, signed=False))(jnp.asarray(x))
  assert np.abs(np.asarray(xla, np.int32) - got).max() <= 1
  assert (np.asarray(xla) == got).mean() > 0.999


@pytest.mark.parametrize('loop', ['avx2', 'avxvnni', 'vnni', 'amx'])
@pytest.mark.parametrize('shape,k,e,stride,dilation,form', [
    ((1, 41, 37), 16, 48, 2, 1, 'offset'), ((2, 30, 29), 24, 40, 1, 1, 'int8'),
    ((1, 33, 35), 8, 24, 2, 1, 'uint8'), ((1, 19, 18), 12, 32, 1, 2, 'offset'),
    ((1, 17, 21), 4, 16, 1, 4, 'int8'), ((2, 129, 131), 24, 144, 1, 1, 'offset')])
def test_the_fused_pass_computes_the_expansion_then_the_depthwise_layer(
    loop, shape, k, e, stride, dilation, form, monkeypatch):
  """int8_kernel.expand_depthwise against the two calls it replaces, bit for bit: every
  stride and dilation, the three input forms, several bands of rows per image (the last
  shape: bands of a few rows, each computing the rows it shares with the next again)."""
  assert int8_kernel.available(), int8_kernel.unavailable_reason()
  _use_loop(loop, monkeypatch)
  rng = np.random.default_rng(k + e + stride)
  xi = rng.integers(0 if form == 'uint8' else -127, 128, shape + (k,))
  x = jnp.asarray((xi + 128).astype(np.uint8) if form == 'offset' else
                  xi.astype(np.uint8 if form == 'uint8' else np.int8))
  w = jnp.asarray(int8_kernel.pack_weights(rng.integers(-127, 128, (k, e)).astype(np.int8),
                                           64 if loop == 'amx' else 4))
  scale = jnp.asarray(rng.uniform(1e-4, 4e-4, e), jnp.float32)
  bias = jnp.asarray(rng.normal(0, 1, e), jnp.float32)
  wd = jnp.asarray(rng.normal(0, 0.02, (3, 3, e)), jnp.float32)
  bd = jnp.asarray(rng.normal(0.5, 1, e), jnp.float32)
  offset = form == 'offset'
  separate = jax.jit(lambda x: int8_kernel.depthwise(int8_kernel.product(
      x, w, scale, bias, 'relu6_uint8', 127 / 6, loop, offset_input=offset), wd, bd, stride,
      dilation, 20.0))(x)
  fused = jax.jit(lambda x: int8_kernel.expand_depthwise(
      x, w, scale, bias, 127 / 6, wd, bd, stride, dilation, 20.0, loop, offset_input=offset))(x)
  assert fused.dtype == jnp.uint8 and fused.shape == separate.shape == shape[:1] + (
      -(-shape[1] // stride), -(-shape[2] // stride), e)
  np.testing.assert_array_equal(np.asarray(fused), np.asarray(separate))
  assert 0 < (np.asarray(fused) > 0).mean() < 1 and len(np.unique(np.asarray(fused))) > 30


def test_the_fused_pass_rejects_what_it_cannot_run():
  assert int8_kernel.available(), int8_kernel.unavailable_reason()
  w = jnp.asarray(int8_kernel.pack_weights(np.ones((8, 12), np.int8)))
  x, s, b = jnp.zeros((1, 9, 9, 8), jnp.uint8), jnp.ones(12), jnp.zeros(12)
  with pytest.raises(ValueError, match='multiple of 8'):  # 12 expanded channels
    int8_kernel.expand_depthwise(x, w, s, b, 20.0, jnp.zeros((3, 3, 12)), b, 1, 1, 20.0)
  w = jnp.asarray(int8_kernel.pack_weights(np.ones((8, 16), np.int8)))
  s, b = jnp.ones(16), jnp.zeros(16)
  with pytest.raises(ValueError, match='stride, dilation'):
    int8_kernel.expand_depthwise(x, w, s, b, 20.0, jnp.zeros((3, 3, 16)), b, 2, 2, 20.0)
  with pytest.raises(ValueError, match='depthwise weights'):
    int8_kernel.expand_depthwise(x, w, s, b, 20.0, jnp.zeros((3, 3, 8)), b, 1, 1, 20.0)


@pytest.mark.parametrize('loop', ['avx2', 'avxvnni', 'vnni', 'amx'])
@pytest.mark.parametrize('shape,c,out,mode', [
    ((2, 37, 41, 3), 16, 8, 'linear_offset_uint8'), ((1, 66, 64, 3), 32, 16, 'linear_int8'),
    ((1, 20, 18, 3), 24, 40, 'linear_offset_uint8')])
def test_the_stem_pass_can_run_block0s_projection_too(loop, shape, c, out, mode, monkeypatch):
  """`stem(..., project=...)` against the stem pass followed by the product, bit for bit.
  With 32 output columns (the second shape) each chunk's rows are whole 32-row AMX blocks
  whose last ends at the end of the chunk's buffer: its rows must be copied into the padded
  buffer, or the 64-input tile loads read past it (the emulated tiles fault on that)."""
  assert int8_kernel.available(), int8_kernel.unavailable_reason()
  _use_loop(loop, monkeypatch)
  rng = np.random.default_rng(sum(shape) + c + out)
  x = jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32)
  ws, wd = (jnp.asarray(rng.normal(0, 0.4, s), jnp.float32) for s in ((3, 3, 3, c), (3, 3, c)))
  bs, bd = (jnp.asarray(rng.normal(0.5, 1, c), jnp.float32) for _ in range(2))
  w = jnp.asarray(int8_kernel.pack_weights(rng.integers(-127, 128, (c, out)).astype(np.int8),
                                           64 if loop == 'amx' else 4))
  scale = jnp.asarray(rng.uniform(1e-3, 3e-3, out), jnp.float32)
  bias = jnp.asarray(rng.normal(0, 1, out), jnp.float32)
  inv_mid, inv_next = np.float32(127 / 5.5), np.float32(127 / 4)
  fused = np.asarray(jax.jit(lambda x: int8_kernel.stem(
      x, ws, bs, wd, bd, inv_mid, (w, scale, bias, mode, inv_next), loop))(x))
  separate = np.asarray(jax.jit(lambda x: int8_kernel.product(
      int8_kernel.stem(x, ws, bs, wd, bd, inv_mid), w, scale, bias, mode, inv_next, loop))(x))
  assert fused.dtype == separate.dtype and fused.shape == separate.shape == shape[:1] + (
      -(-shape[1] // 2), -(-shape[2] // 2), out)
  np.testing.assert_array_equal(fused, separate)
  assert len(np.unique(fused)) > 50


def _numpy_preprocessed(pixels, sizes):
  """seg.preprocessing.preprocess_padded as the stem passes compute it from uint8 pixels (and
  XLA's optimised programs, 2026-12-07): u times float32(1 / 127.5) minus 1 in one fused
  multiply-add (exact in float64, rounded once), 0 outside each image's valid rows and
  columns."""
  x = (pixels.astype(np.float64) * np.float64(np.float32(1 / 127.5)) - 1).astype(np.float32)
  for image, (height, width) in zip(x, sizes):
    image[height:] = 0
    image[:, width:] = 0
  return x


@pytest.mark.parametrize('loop', ['avx2', 'vnni'])
def test_the_stem_passes_read_uint8_pixels_and_their_sizes(loop, monkeypatch):
  """uint8 pixels with each image's valid size (rows, columns; a whole image, fewer rows,
  fewer columns, an empty one): the stem pass (and with block 0's projection) gives the
  outputs of the NumPy-preprocessed float32 images, bit for bit; and as XLA's
  `preprocess_padded` in the engine but for its roundings."""
  assert int8_kernel.available(), int8_kernel.unavailable_reason()
  _use_loop(loop, monkeypatch)
  rng = np.random.default_rng(31)
  pixels = rng.integers(0, 256, (4, 37, 41, 3), np.uint8)
  sizes = np.array([[37, 41], [30, 41], [37, 25], [0, 0]], np.int32)
  ws = rng.normal(0, 0.4, (3, 3, 3, 16)).astype(np.float32)
  bs, bd = rng.normal(0.5, 1, 16).astype(np.float32), rng.normal(0.5, 1, 16).astype(np.float32)
  wd = rng.normal(0, 0.4, (3, 3, 16)).astype(np.float32)
  args = [jnp.asarray(a) for a in (ws, bs, wd, bd)]
  w = jnp.asarray(int8_kernel.pack_weights(rng.integers(-127, 128, (16, 24)).astype(np.int8)))
  project = (w, jnp.full(24, 1e-3, jnp.float32), jnp.zeros(24, jnp.float32), 'linear_int8',
             30.0)
  x = jnp.asarray(_numpy_preprocessed(pixels, sizes))
  for fused in (None, project):
    from_pixels = np.asarray(jax.jit(lambda p, s: int8_kernel.stem(
        p, *args, 20.0, fused, loop=loop, sizes=s))(jnp.asarray(pixels), jnp.asarray(sizes)))
    np.testing.assert_array_equal(
        from_pixels, np.asarray(int8_kernel.stem(x, *args, 20.0, fused, loop=loop)))
    assert len(np.unique(from_pixels)) > 20
  from seg.preprocessing import preprocess_padded
  xla = np.asarray(int8_kernel.stem(preprocess_padded(jnp.asarray(pixels), jnp.asarray(sizes)),
                                    *args, 20.0, loop=loop))
  got = np.asarray(int8_kernel.stem(jnp.asarray(pixels), *args, 20.0, loop=loop,
                                    sizes=jnp.asarray(sizes)))
  assert np.abs(xla.astype(np.int32) - got).max() <= 1 and (xla == got).mean() > 0.99


def test_the_stem_kernel_rejects_what_it_cannot_run():
  assert int8_kernel.available(), int8_kernel.unavailable_reason()
  x = jnp.zeros((1, 9, 9, 3), jnp.float32)
  ws, b, wd = jnp.zeros((3, 3, 3, 12)), jnp.zeros(12), jnp.zeros((3, 3, 12))
  with pytest.raises(ValueError, match='multiple of 8'):
    int8_kernel.stem(x, ws, b, wd, b, 1.0)  # 12 channels
  ws, b = jnp.zeros((3, 3, 3, 16)), jnp.zeros(16)
  with pytest.raises(ValueError, match='depthwise weights'):
    int8_kernel.stem(x, ws, b, jnp.zeros((3, 3, 8)), b, 1.0)
  with pytest.raises(ValueError, match='float .preprocessed. or uint8 pixels'):
    int8_kernel.stem(x.astype(jnp.int32), ws, b, jnp.zeros((3, 3, 16)), b, 1.0)
  with pytest.raises(ValueError, match=r'sizes are \[n, 2\] for 1 images'):
    int8_kernel.stem(x.astype(jnp.uint8), ws, b, jnp.zeros((3, 3, 16)), b, 1.0,
                     sizes=jnp.zeros((2, 2), jnp.int32))
  assert not int8_kernel.stem_supported((1, 9, 9, 4), (3, 3, 3, 16))


def test_the_depthwise_kernel_rejects_what_it_cannot_run():
  x = jnp.zeros((1, 5, 5, 12), jnp.uint8)  # 12 channels: not a multiple of 8
  with pytest.raises(ValueError, match='multiple of 8'):
    int8_kernel.depthwise(x, jnp.zeros((3, 3, 12)), jnp.zeros(12), 1, 1, 1.0)
  with pytest.raises(ValueError, match='uint8'):
    int8_kernel.depthwise(x.astype(jnp.float32)[..., :8], jnp.zeros((3, 3, 8)), jnp.zeros(8),
                          1, 1, 1.0)
  with pytest.raises(ValueError, match='stride, dilation'):
    int8_kernel.depthwise(x[..., :8], jnp.zeros((3, 3, 8)), jnp.zeros(8), 2, 2, 1.0)
  with pytest.raises(ValueError, match='not one of'):
    int8_kernel.depthwise(x[..., :8], jnp.zeros((3, 3, 8)), jnp.zeros(8), 1, 1, 1.0, 'sse')
  assert not int8_kernel.depthwise_supported((1, 5, 5, 8), 2, 2)
  assert int8_kernel.depthwise_supported((1, 5, 5, 8), 1, 4)
  assert not int8_kernel.depthwise_supported((1, 5, 5, 12), 1, 1)


def test_packed_weights_follow_the_kernels_layout():
  w = np.arange(8 * 20, dtype=np.int64).reshape(8, 20).astype(np.int8)
  packed = int8_kernel.pack_weights(w).reshape(2, 2, 16, 4)  # panels, groups, channels, 4
  assert packed[1, 1, 2, 3] == w[4 + 3, 16 + 2]
  assert packed[0, 0, 5, 1] == w[1, 5]
  assert (packed[1, :, 4:] == 0).all()  # channels 20..31 do not exist
  # Padded to 64 inputs for AMX tiles: zero weights beyond the 8 real inputs.
  padded = int8_kernel.pack_weights(w, 64).reshape(2, 16, 16, 4)
  assert padded[1, 1, 2, 3] == w[4 + 3, 16 + 2] and (padded[:, 2:] == 0).all()
  with pytest.raises(ValueError, match='multiple of 4'):
    int8_kernel.pack_weights(np.zeros((6, 3), np.int8))
  with pytest.raises(ValueError, match='int8'):
    int8_kernel.pack_weights(np.zeros((8, 3), np.float32))


def _lowered(config, params, images):
  """The int8 network's StableHLO text, traced anew (the SEG_INT8_* variables are read when
  a function is traced)."""
  m = config.model
  return jax.jit(lambda p, x: quantize.forward_int8(
      p, x, width=m.width, output_stride=m.output_stride, upsample=False)).lower(
          params, images).as_text()


def _nearly_the_same(got, reference):
  """Logits that differ only where an input fell next to a rounding boundary."""
  rms = lambda x: np.sqrt(np.mean(np.square(x)))
  assert rms(got - reference) <= 0.02 * rms(reference)
  assert (got.argmax(-1) == reference.argmax(-1)).mean() >= 0.98


def _logits(config, params, images):
  m = config.model
  return np.asarray(jax.jit(lambda p, x: quantize.forward_int8(
      p, x, width=m.width, output_stride=m.output_stride, upsample=False))(params, images))


def test_the_kernel_formulation_gives_xla_int8s_numbers(tiny_int8, monkeypatch):
  """With float32 depthwise inputs and XLA's stem the kernel computes what XLA's int8
  products do."""
  monkeypatch.setenv('SEG_INT8_STEM', 'xla')
  config, _, folded, scales = tiny_int8
  images = jnp.asarray(np.random.default_rng(6).uniform(-1, 1, (1, EVAL_SIZE, EVAL_SIZE, 3)),
                       jnp.float32)
  xla = _logits(config, quantize.quantize_folded(config.model, folded, scales, 'int8'), images)
  kernel_params = quantize.quantize_folded(config.model, folded, scales, 'kernel',
                                           uint8_depthwise_inputs=False)
  assert kernel_params['blocks'][1]['expand']['w'].ndim == 1  # packed: the kernel runs
  np.testing.assert_array_equal(_logits(config, kernel_params, images), xla)


def test_the_kernel_engine_predicts_the_float32_classes(tiny_int8):
  """uint8 depthwise inputs (the default) add one rounding per block: still float32's classes."""
  config, variables, _, scales = tiny_int8
  images = np.random.default_rng(5).integers(0, 256, (2, EVAL_SIZE, EVAL_SIZE, 3), np.uint8)
  expected = engine.Engine(config, variables, batch_size=2).logits(images)
  xla = engine.Engine(config, variables, dtype='int8', batch_size=2, int8_scales=scales,
                      int8_formulation='int8').logits(images)
  eng = engine.Engine(config, variables, dtype='int8', batch_size=2, int8_scales=scales,
                      int8_formulation='kernel')
  got = eng.logits(images)
  assert eng.int8_formulation == 'kernel'
  assert eng.folded['blocks'][1]['expand']['inv_out_scale'] > 0
  rms = lambda x: np.sqrt(np.mean(np.square(x)))
  # As XLA's int8 against float32 (test_quantize), with at most a little more error.
  assert rms(got - expected) <= max(0.2 * rms(expected), 1.5 * rms(xla - expected))
  assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.8
  assert not np.array_equal(got, xla)  # the depthwise inputs really were uint8


def test_the_engine_runs_the_depthwise_layers_in_the_kernel(tiny_int8, monkeypatch):
  """With uint8 depthwise inputs every expanded block's depthwise layer is the kernel's
  (SEG_INT8_DEPTHWISE=xla: XLA's taps), and both give nearly the same logits."""
  config, _, folded, scales = tiny_int8
  params = quantize.quantize_folded(config.model, folded, scales, 'kernel')
  images = jnp.asarray(np.random.default_rng(7).uniform(-1, 1, (1, EVAL_SIZE, EVAL_SIZE, 3)),
                       jnp.float32)
  text = lambda: _lowered(config, params, images)
  expanded = sum('expand' in blk for blk in params['blocks'])
  assert text().count(int8_kernel.DEPTHWISE_TARGET) == expanded > 0
  got = _logits(config, params, images)
  monkeypatch.setenv('SEG_INT8_DEPTHWISE', 'xla')
  assert int8_kernel.DEPTHWISE_TARGET not in text()
  xla = _logits(config, params, images)
  # The same taps; a product's input differs by one step where XLA contracted a tap into a
  # fused multiply-add and the sum fell next to a rounding boundary.
  _nearly_the_same(got, xla)
  monkeypatch.setenv('SEG_INT8_DEPTHWISE', 'fast')
  with pytest.raises(ValueError, match='SEG_INT8_DEPTHWISE'):
    text()


def test_the_engine_runs_the_stem_in_the_kernel_and_hands_block0_on_in_int8(tiny_int8,
                                                                             monkeypatch):
  """The stem and block 0's depthwise layer are one kernel call (SEG_INT8_STEM=xla: XLA's),
  block 0's projection writes int8 for block 1's expansion (the only projection whose output
  feeds nothing else: no residual sum in block 0 or 1), and the logits barely move."""
  config, _, folded, scales = tiny_int8
  params = quantize.quantize_folded(config.model, folded, scales, 'kernel')
  from seg.model import block_specs
  specs = block_specs(config.model.width, config.model.output_stride)
  assert [s[2] for s in specs[:3]] == [1, 2, 1]  # block 2 sums a residual, 0 and 1 do not
  handed = [i for i, blk in enumerate(params['blocks'])
            if 'inv_int8_out_scale' in blk['project']]
  assert handed == [0]
  assert params['blocks'][0]['project']['inv_int8_out_scale'] == \
      params['blocks'][1]['expand']['inv_x_scale']
  images = jnp.asarray(np.random.default_rng(8).uniform(-1, 1, (2, EVAL_SIZE, EVAL_SIZE, 3)),
                       jnp.float32)
  text = lambda: _lowered(config, params, images)
  lowered = text()  # block 0's projection runs in the stem's pass
  assert lowered.count(int8_kernel.STEM_PROJECT_TARGET) == 1
  assert f'"{int8_kernel.STEM_TARGET}"' not in lowered
  got = _logits(config, params, images)
  monkeypatch.setenv('SEG_INT8_STEM', 'xla')
  assert int8_kernel.STEM_TARGET not in text()
  xla_stem = _logits(config, params, images)
  # The same layers summed in another order, and block 1's input rounded once, not twice.
  _nearly_the_same(got, xla_stem)


def test_the_engine_fuses_large_expansions_with_their_depthwise_layers(tiny_int8, monkeypatch):
  """Blocks whose expansion output reaches FUSE_FROM_BYTES run it and the depthwise layer in
  one pass (here every expanded block, the threshold lowered to 0), with the very logits of
  the separate calls (SEG_INT8_FUSE=xla); at the default none of the tiny model's does."""
  config, _, folded, scales = tiny_int8
  params = quantize.quantize_folded(config.model, folded, scales, 'kernel')
  images = jnp.asarray(np.random.default_rng(10).uniform(-1, 1, (2, EVAL_SIZE, EVAL_SIZE, 3)),
                       jnp.float32)
  text = lambda: _lowered(config, params, images)
  assert int8_kernel.EXPAND_DEPTHWISE_TARGET not in text()
  monkeypatch.setattr(quantize, 'FUSE_FROM_BYTES', 0)
  expanded = sum('expand' in blk for blk in params['blocks'])
  fused_text = text()
  assert fused_text.count(int8_kernel.EXPAND_DEPTHWISE_TARGET) == expanded > 0
  assert int8_kernel.DEPTHWISE_TARGET + '"' not in fused_text.replace(
      int8_kernel.EXPAND_DEPTHWISE_TARGET, '')
  fused = _logits(config, params, images)
  monkeypatch.setenv('SEG_INT8_FUSE', 'xla')
  assert int8_kernel.EXPAND_DEPTHWISE_TARGET not in text()
  np.testing.assert_array_equal(fused, _logits(config, params, images))


def test_projections_hand_the_next_product_its_input(tiny_int8, monkeypatch):
  """Each kernel projection adds its block's residual and writes the next product's input
  (block 0's: mode 'linear_int8' or 5 instead), keeping its float32 sum only where a residual
  sum or the head needs it; the logits are those of XLA's sums and quantisations
  (SEG_INT8_HANDOFF=xla) bit for bit."""
  config, _, folded, scales = tiny_int8
  params = quantize.quantize_folded(config.model, folded, scales, 'kernel')
  images = jnp.asarray(np.random.default_rng(11).uniform(-1, 1, (2, EVAL_SIZE, EVAL_SIZE, 3)),
                       jnp.float32)
  text = lambda: _lowered(config, params, images)
  from seg.model import block_specs
  specs = block_specs(config.model.width, config.model.output_stride)
  handed = [quantize._handoff(params, specs, i, None) for i in range(len(specs))]
  assert handed[0] is None and all(h is not None for h in handed[1:])
  kept = [i for i, h in enumerate(handed) if h and h[2]]
  residual = [i for i in range(1, len(specs))
              if specs[i][2] == 1 and specs[i][1] == specs[i - 1][1]]
  assert kept == [i - 1 for i in residual if i - 1 > 0] + [len(specs) - 1]
  adds = text().count('stablehlo.add')
  got = _logits(config, params, images)
  monkeypatch.setenv('SEG_INT8_HANDOFF', 'xla')
  assert text().count('stablehlo.add') > adds  # XLA's residual sums are back
  np.testing.assert_array_equal(got, _logits(config, params, images))


@pytest.mark.parametrize('loop', ['avxvnni', 'vnni', 'amx'])
def test_each_loop_runs_the_whole_network_as_the_avx2_loop_does(loop, tiny_int8, monkeypatch):
  """Every product, the fused expansions and the stem pass's projection in `loop` (its
  stand-in where the CPU lacks it: `_use_loop`), with its weights (packed to 64 inputs for
  AMX tiles) and input forms (the VNNI loops' signed inputs, expansions and aspp0, quantised
  as x + 128 in uint8, and block 0's projection writing block 1's input so): the same
  integers and exact sums, so the AVX2 loop's logits bit for bit."""
  _use_loop(loop, monkeypatch)
  config, _, folded, scales = tiny_int8
  images = jnp.asarray(np.random.default_rng(10).uniform(-1, 1, (1, EVAL_SIZE, EVAL_SIZE, 3)),
                       jnp.float32)
  monkeypatch.setattr(int8_kernel, '_state', dict(int8_kernel._state))  # restored afterwards
  logits, texts = {}, {}
  for each in (loop, 'avx2'):
    int8_kernel._state.pop('isa', None)
    monkeypatch.setenv('SEG_INT8_KERNEL_ISA', each)
    params = quantize.quantize_folded(config.model, folded, scales, 'kernel')
    k_multiple = 64 if each == 'amx' else 4
    assert params['blocks'][1]['expand']['w'].size % (k_multiple * 16) == 0
    texts[each] = _lowered(config, params, images)
    logits[each] = _logits(config, params, images)
  products = sum(1 for blk in params['blocks'] for name in ('expand', 'project') if name in blk)
  isa = f'isa = {int8_kernel.ISAS[loop]} '
  assert texts[loop].count(isa) >= products and 'isa = 0 ' not in texts[loop]
  signed = sum('expand' in blk for blk in params['blocks']) + 1  # and aspp0
  offset = loop in int8_kernel.OFFSET_LOOPS
  assert texts[loop].count('offset_input = true') == (signed if offset else 0)
  assert 'offset_input = true' not in texts['avx2']
  assert texts[loop].count('mode = 5') == (1 if offset else 0)
  assert texts['avx2'].count('mode = 4') == 1
  assert (int8_kernel.EMULATION in texts[loop]) == (loop in int8_kernel.EMULATED and
                                                   int8_kernel.loops_emulated())
  np.testing.assert_array_equal(logits[loop], logits['avx2'])


def test_the_benchmark_names_the_formulation_and_the_loop(monkeypatch):
  """`main.py benchmark --dtype int8` says which int8 formulation and kernel loop it timed
  (its record and its summary), so that a figure can be traced to the code that made it."""
  from experiments import tiny
  from seg.inference import benchmark
  config = tiny.get_config()
  record = benchmark.benchmark(config, height=65, width=65, dtype='int8', warmup=1, iters=2,
                               log=lambda *a: None)
  assert record['int8_formulation'] == 'kernel' and record['int8_loop'] == int8_kernel.isa()
  assert f'(kernel formulation, {int8_kernel.isa()} loop)' in benchmark.format_record(record)
  record = benchmark.benchmark(config, height=65, width=65, warmup=1, iters=2,
                               log=lambda *a: None)
  assert record['int8_loop'] is None and record['int8_formulation'] is None


def test_calibration_records_the_depthwise_inputs(tiny_int8):
  config, _, _, scales = tiny_int8
  names = quantize.scale_names(config.model)
  assert set(scales) == set(names)
  assert 'block1/depthwise' in names and 'block0/depthwise' not in names  # no expansion
  # ReLU6 outputs: their largest value is at most 6, so the scale at most 6 / 127.
  assert all(0 < scales[n] <= 6 / 127 + 1e-7 for n in names if n.endswith('/depthwise'))


def test_without_the_kernel_the_engine_falls_back_to_xla_int8(tiny_int8, monkeypatch, capsys):
  config, variables, _, scales = tiny_int8
  monkeypatch.setattr(int8_kernel, '_state', {'ok': False, 'reason': 'no C++ compiler'})
  messages = []
  eng = engine.Engine(config, variables, dtype='int8', int8_scales=scales,
                      int8_formulation='kernel', log=messages.append)
  assert eng.int8_formulation == 'int8'
  assert any('no C++ compiler' in m for m in messages)
  capsys.readouterr()
  assert engine.int8_formulation_for('cpu', 'kernel') == 'int8'
  # Without a log (benchmark, predict, a library user) the fallback still says so.
  assert "XLA's int8 products instead" in capsys.readouterr().err
  assert eng.folded['blocks'][1]['expand']['w'].ndim == 2


def test_accelerators_never_get_the_cpu_kernel(monkeypatch):
  monkeypatch.delenv('SEG_INT8_FORMULATION', raising=False)
  messages = []
  assert engine.int8_formulation_for('gpu', 'kernel', messages.append) == 'int8'
  assert 'runs on gpu' in messages[0]
  monkeypatch.setattr(cpu_features, 'choose', lambda *a, **k: cpu_features.Choice(
      (), 'float32', 'a CPU without int8 instructions'))
  assert engine.int8_formulation_for('gpu') == 'int8'  # the CPU's choice is not asked
  assert engine.int8_formulation_for('cpu') == 'float32'


def test_a_failed_build_says_why(tmp_path, monkeypatch):
  monkeypatch.setattr(int8_kernel, 'SOURCES', (str(tmp_path / 'broken.cc'),))
  (tmp_path / 'broken.cc').write_text('this is not C++\n')
  with pytest.raises(RuntimeError, match='failed on'):
    int8_kernel.build(str(tmp_path / 'kernels'))
  assert not list((tmp_path / 'kernels').glob('*.so'))  # nothing half-written left behind


def test_an_unwritable_cache_sends_the_build_to_the_temporary_directory(tmp_path, monkeypatch):
  """A home whose cache cannot be written (here: a file where the directory would be) sends
  the library to $TMPDIR/seg-kernels-UID, and says so; a directory chosen by SEG_KERNEL_DIR
  is an error instead."""
  import os
  import shutil
  import tempfile
  built = int8_kernel.build()  # this session's library, copied below instead of rebuilt
  monkeypatch.delenv('SEG_KERNEL_DIR', raising=False)
  (tmp_path / 'not_a_directory').write_text('')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'not_a_directory'))
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
  fallback = tmp_path / f'seg-kernels-{os.getuid()}'
  fallback.mkdir()
  shutil.copy(built, fallback / os.path.basename(built))
  said = []
  assert int8_kernel.build(log=said.append) == str(fallback / os.path.basename(built))
  assert len(said) == 1 and 'cannot be written' in said[0] and str(fallback) in said[0]
  monkeypatch.setenv('SEG_KERNEL_DIR', str(tmp_path / 'not_a_directory' / 'kernels'))
  with pytest.raises(RuntimeError, match='cannot write the int8 kernel'):
    int8_kernel.build()


def test_another_compiler_behind_the_same_name_builds_afresh(tmp_path, monkeypatch):
  """The library is kept per compiler as resolved: `g++` pointed at another version (a link
  switched, as update-alternatives does) builds a new one, which the old version might
  lack loops of (int8_kernel.built); the same compiler again reuses its library."""
  import os
  calls = tmp_path / 'calls'
  for name in ('g++-10', 'g++-12'):  # stand-ins: record the call, write the output file
    script = tmp_path / name
    script.write_text(f'#!/bin/sh\necho {name} >> {calls}\n'
                      'while [ "$1" != -o ]; do shift; done; : > "$2"\n')
    script.chmod(0o755)
  link = tmp_path / 'g++'
  os.symlink(tmp_path / 'g++-10', link)
  monkeypatch.setenv('CXX', str(link))
  first = int8_kernel.build(str(tmp_path / 'kernels'))
  assert int8_kernel.build(str(tmp_path / 'kernels')) == first  # kept: built once
  os.remove(link)
  os.symlink(tmp_path / 'g++-12', link)
  second = int8_kernel.build(str(tmp_path / 'kernels'))
  assert second != first and os.path.exists(second)
  assert calls.read_text().split() == ['g++-10', 'g++-12']


def test_the_formulation_can_be_forced(monkeypatch):
  monkeypatch.setenv('SEG_INT8_FORMULATION', 'int8')
  assert cpu_features.formulation_override() == 'int8'
  monkeypatch.setenv('SEG_INT8_FORMULATION', 'auto')
  assert cpu_features.formulation_override() is None
  monkeypatch.setenv('SEG_INT8_FORMULATION', 'fast')
  with pytest.raises(ValueError, match='SEG_INT8_FORMULATION'):
    cpu_features.formulation_override()


def test_the_kernel_loop_follows_the_cpu_and_the_override(monkeypatch):
  assert int8_kernel.available(), int8_kernel.unavailable_reason()
  monkeypatch.setattr(int8_kernel, '_state', dict(int8_kernel._state))  # restored afterwards
  flags = cpu_features.cpu_flags()
  has_vnni = {'avx512f', 'avx512bw', 'avx512vl', 'avx512_vnni'} <= flags
  has_avxvnni = 'avx_vnni' in flags
  has_amx = 'amx_int8' in flags  # and Linux grants it, as it does on the machines seen
  expected = ('avx2',) + (('avxvnni',) if has_avxvnni else ()) + (
      ('vnni',) if has_vnni else ()) + (('amx',) if has_amx else ())
  assert int8_kernel.loops() == expected
  assert int8_kernel.isa() == expected[-1]
  assert int8_kernel.k_multiple() == (64 if has_amx else 4)
  # Other CPUs' flags.
  assert int8_kernel.loops({'avx2', 'fma'}) == ('avx2',)
  assert int8_kernel.loops({'avx2', 'fma', 'avx_vnni'}) == ('avx2', 'avxvnni')
  assert int8_kernel.loops({'avx2', 'fma', 'avx512f', 'avx512bw', 'avx512vl', 'avx512dq',
                            'avx512_vnni'}) == ('avx2', 'vnni')
  for forced in ('avx2',) + (('avxvnni',) if has_avxvnni else ()) + (
      ('vnni',) if has_vnni else ()):
    int8_kernel._state.pop('isa')
    monkeypatch.setenv('SEG_INT8_KERNEL_ISA', forced)
    assert int8_kernel.isa() == forced and int8_kernel.k_multiple() == 4
  int8_kernel._state.pop('isa')
  int8_kernel._state.pop('loops')
  monkeypatch.setattr(cpu_features, 'cpu_flags', lambda: frozenset({'avx2', 'fma'}))
  for missing in ('avxvnni', 'vnni', 'amx'):  # asked for, but the CPU has none
    monkeypatch.setenv('SEG_INT8_KERNEL_ISA', missing)
    with pytest.raises(RuntimeError, match='offers only avx2'):
      int8_kernel.isa()
  with pytest.raises(ValueError, match='not one of'):  # nor can a product ask for it
    int8_kernel.product(jnp.zeros((2, 4), jnp.uint8), jnp.zeros(64, jnp.int8),
                        jnp.ones(16), jnp.zeros(16), loop='vnni')
  monkeypatch.setenv('SEG_INT8_KERNEL_ISA', 'fast')
  with pytest.raises(ValueError, match='SEG_INT8_KERNEL_ISA'):
    int8_kernel.isa()


def test_the_kernel_refuses_a_loop_the_cpu_lacks(monkeypatch):
  """Asked past `loops()` for a loop whose instructions this CPU lacks, the kernel returns an
  error instead of running into an illegal instruction."""
  flags = cpu_features.cpu_flags()
  missing = [loop for loop, flag in (('avxvnni', 'avx_vnni'), ('vnni', 'avx512_vnni'))
             if flag not in flags]
  if not missing:
    pytest.skip('this CPU has every VNNI loop')
  monkeypatch.setattr(int8_kernel, '_state', dict(int8_kernel._state))  # restored afterwards
  int8_kernel.emulate_loops(False)
  monkeypatch.setattr(int8_kernel, 'loops', lambda flags=None: ('avx2', *missing))
  x, w = jnp.ones((3, 8), jnp.uint8), jnp.asarray(int8_kernel.pack_weights(np.ones((8, 16),
                                                                               np.int8)))
  for loop in missing:
    with pytest.raises(Exception, match='lacks the instructions of that loop'):
      jax.block_until_ready(int8_kernel.product(x, w, jnp.ones(16), jnp.zeros(16), loop=loop))


def test_a_compiler_without_avxvnni_and_amx_builds_the_other_loops(tmp_path, monkeypatch):
  """Before GCC 11 and clang 12 no compiler knew AVX-VNNI's and AMX's intrinsics (RHEL 8's
  GCC 8, Ubuntu 20.04's GCC 9): the library then leaves those loops out (as it does with
  -DSEG_WITHOUT_NEW_LOOPS, which stands in for such a compiler here) and says so, and
  `loops()` offers the others."""
  import ctypes
  assert int8_kernel.available(), int8_kernel.unavailable_reason()
  lib = ctypes.cdll.LoadLibrary(int8_kernel.build(str(tmp_path),
                                                  defines=('SEG_WITHOUT_NEW_LOOPS',)))
  assert [lib.SegHasLoop(int8_kernel.ISAS[loop]) for loop in ('avx2', 'vnni', 'avxvnni', 'amx')
          ] == [1, 1, 0, 0]
  assert lib.SegAmxPermitted() == 0
  assert int8_kernel.built('avx2') and int8_kernel.built('vnni')  # whatever the compiler
  monkeypatch.setattr(int8_kernel, '_state', dict(int8_kernel._state))  # restored afterwards
  int8_kernel.emulate_loops(False)
  monkeypatch.setattr(int8_kernel, 'built', lambda loop: loop in ('avx2', 'vnni'))
  everything = {'avx2', 'fma', 'avx_vnni', 'amx_int8'} | int8_kernel.VNNI_FLAGS
  assert int8_kernel.loops(everything) == ('avx2', 'vnni')


def test_the_stand_ins_are_asked_for_and_need_avx512(monkeypatch):
  """SEG_INT8_LOOP_EMULATION=1 (or `emulate_loops`) offers the AMX loop, its tiles emulated,
  on CPUs with AVX-512 F, BW, VL and DQ, and the AVX-VNNI loop, its instruction in the AVX-512
  VL encoding, on CPUs with AVX-512 VNNI, and never on others."""
  assert int8_kernel.available(), int8_kernel.unavailable_reason()
  monkeypatch.setattr(int8_kernel, '_state', dict(int8_kernel._state))  # restored afterwards
  for name in ('emulate', 'loops', 'isa'):
    int8_kernel._state.pop(name, None)
  monkeypatch.setenv('SEG_INT8_LOOP_EMULATION', 'yes')
  with pytest.raises(ValueError, match='SEG_INT8_LOOP_EMULATION must be 0 or 1'):
    int8_kernel.loops_emulated()
  monkeypatch.setenv('SEG_INT8_LOOP_EMULATION', '1')
  assert int8_kernel.loops_emulated()
  avx512 = {'avx2', 'fma', 'avx512f', 'avx512bw', 'avx512vl', 'avx512dq'}
  assert int8_kernel.loops(avx512) == ('avx2', 'amx')
  assert int8_kernel.loops(avx512 | {'avx512_vnni'}) == ('avx2', 'avxvnni', 'vnni', 'amx')
  assert int8_kernel.loops(avx512 - {'avx512dq'}) == ('avx2',)
  assert int8_kernel.loops({'avx2', 'fma', 'avx_vnni'}) == ('avx2',)  # no stand-in runs there
  if int8_kernel.AVX512_FLAGS <= cpu_features.cpu_flags():
    assert int8_kernel.isa() == 'amx' and int8_kernel.k_multiple() == 64
  int8_kernel.emulate_loops(False)
  assert not int8_kernel.loops_emulated()
  assert int8_kernel.loops(avx512 | {'avx512_vnni'}) == ('avx2', 'vnni')  # the CPU's own


def test_kernel_call_times_are_recorded_while_asked():
  """record_call_times / call_times: each kernel call's start and end while recording, in
  call order, on time.monotonic's clock (a product, then a depthwise layer: each inside the
  interval around its own call), nothing after it stops; starting again starts afresh.
  (Durations are not compared: on a loaded machine a small call can stall longer than a
  large one runs, as one did in CI on 2026-12-07.)"""
  assert int8_kernel.available(), int8_kernel.unavailable_reason()
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.integers(0, 128, (64, 32)), jnp.uint8)
  w = jnp.asarray(int8_kernel.pack_weights(rng.integers(-127, 128, (32, 16)).astype(np.int8)))
  s, b = jnp.full(16, 1e-3, jnp.float32), jnp.zeros(16, jnp.float32)
  product = jax.jit(lambda x: int8_kernel.product(x, w, s, b))
  y = jnp.asarray(rng.integers(0, 128, (1, 96, 96, 64)), jnp.uint8)
  depthwise = jax.jit(lambda y: int8_kernel.depthwise(
      y, jnp.full((3, 3, 64), 0.01, jnp.float32), jnp.zeros(64, jnp.float32), 1, 1, 20.0))
  product(x).block_until_ready(), depthwise(y).block_until_ready()  # compiled before timing
  try:
    int8_kernel.record_call_times(True)
    before = time.monotonic()
    product(x).block_until_ready()
    between = time.monotonic()
    depthwise(y).block_until_ready()
    after = time.monotonic()
    int8_kernel.record_call_times(False)
    product(x).block_until_ready()
    times = int8_kernel.call_times()
    assert times.shape == (2, 2)
    (start0, end0), (start1, end1) = times
    assert before <= start0 < end0 <= between <= start1 < end1 <= after
    int8_kernel.record_call_times(True)
    assert int8_kernel.call_times().shape == (0, 2)
  finally:
    int8_kernel.record_call_times(False)
