"""The float kernel (seg/inference/float_product.h) against NumPy's bfloat16 rounding and
float64 sums, and the engine's 'kernel' float32 and bfloat16 formulations against XLA's."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from helpers import EVAL_SIZE, random_variables, tiny_engine_config
from seg.inference import benchmark, float_kernel, cpu_features, engine, export, int8_kernel
from seg.inference.forward import forward
from seg.model import block_specs
from seg.preprocessing import preprocess

pytestmark = pytest.mark.skipif(
    not int8_kernel.cpu_supported(), reason='the kernels need an x86-64 CPU with AVX2 and FMA')


def _skip_without_f32(loop=None):
  """Skips unless the float32 kernel runs here (and its loop `loop`, 'avx2' or 'avx512')."""
  if not float_kernel.available(jnp.float32):
    pytest.skip(f'no float32 kernel here: {float_kernel.unavailable_reason(jnp.float32)}')
  if loop and loop not in float_kernel.f32_loops():
    pytest.skip(f'this CPU runs the float32 loops {float_kernel.f32_loops()}, not {loop}')


def _use_loop(loop, monkeypatch):
  """Skips unless this CPU runs `loop` ('avx2', 'avx512': the float32 loops); 'amx' runs in
  its stand-in (`int8_kernel.emulate_loops`) where the CPU lacks AMX-BF16 but has AVX-512,
  for this test only."""
  assert int8_kernel.available(), int8_kernel.unavailable_reason()
  if loop in float_kernel.F32_LOOPS:
    return _skip_without_f32(loop)
  if loop == 'amx' and loop not in float_kernel.loops() and (
      int8_kernel.EMULATED['amx'] <= cpu_features.cpu_flags()):
    monkeypatch.setattr(int8_kernel, '_state', dict(int8_kernel._state))  # restored afterwards
    int8_kernel.emulate_loops(True)
  if loop not in float_kernel.loops():
    pytest.skip(f'this CPU runs the bfloat16 loops {float_kernel.loops()}, not {loop}')


def _bf16(x):
  """x rounded to bfloat16 (ml_dtypes: to nearest even), as float64."""
  return np.asarray(x, np.float32).astype(jnp.bfloat16).astype(np.float64)


@pytest.mark.parametrize('loop', ['avx512bf16', 'amx'])
def test_the_kernel_rounds_its_inputs_to_nearest_even(loop, monkeypatch):
  """Through identity weights the output is the input as the kernel rounded it: NumPy's
  bfloat16 of every value, ties (exactly half a bfloat16 step above a value whose last bit
  is even, and above one whose last bit is odd) included."""
  _use_loop(loop, monkeypatch)
  rng = np.random.default_rng(1)
  k = 40
  base = rng.uniform(-300, 300, (37, k)).astype(np.float32).astype(jnp.bfloat16)
  bits = base.view(np.uint16).astype(np.uint32) << 16
  x = rng.uniform(-300, 300, (37, k)).astype(np.float32)
  x[:10] = (bits[:10] | 0x8000).view(np.float32)  # ties, after even and odd last bits
  x[10:12] = (bits[10:12] | 0x7fff).view(np.float32)  # just below a tie
  assert {0, 1} <= set(((bits[:10] >> 16) & 1).ravel().tolist())
  y = float_kernel.product(jnp.asarray(x), jnp.asarray(float_kernel.pack_weights(np.eye(k))),
                          jnp.zeros(k), loop=loop)
  np.testing.assert_array_equal(np.asarray(y), _bf16(x).astype(np.float32))


@pytest.mark.parametrize('mode', ['linear', 'relu6', 'relu', 'residual'])
@pytest.mark.parametrize('loop,k', [('avx512bf16', 7), ('avx512bf16', 52), ('avx512bf16', 136),
                                    ('amx', 7), ('amx', 52), ('amx', 136)])
def test_the_kernel_computes_the_bfloat16_product(mode, loop, k, monkeypatch):
  """Each loop the CPU runs (or AMX's stand-in), with an odd number of inputs (7: half a pair
  at the end), one partial 32-input tile (52) or four and a part (136), 45 rows (not whole
  4-row or 16-row tiles) in a batch of 3, 101 outputs (7 panels: the loops' 4-, 2- and
  1-panel tiles): the float32 result is within float32 summation error of the exact sum
  of bfloat16-rounded inputs times bfloat16-rounded weights, and farther than that from the
  float32 product (it multiplied in bfloat16)."""
  _use_loop(loop, monkeypatch)
  rng = np.random.default_rng(k)
  x = rng.normal(0, 1, (3, 45, k)).astype(np.float32)
  w = rng.normal(0, 0.2, (k, 101)).astype(np.float32)
  b = rng.normal(0, 1, 101).astype(np.float32)
  residual = rng.normal(0, 1, (3, 45, 101)).astype(np.float32) if mode == 'residual' else None
  y = np.asarray(float_kernel.product(
      jnp.asarray(x), jnp.asarray(float_kernel.pack_weights(w)), jnp.asarray(b),
      mode='linear' if mode == 'residual' else mode,
      residual=None if residual is None else jnp.asarray(residual), loop=loop))
  sums = _bf16(x) @ _bf16(w) + b
  magnitude = np.abs(_bf16(x)) @ np.abs(_bf16(w)) + np.abs(b)
  act = {'relu6': lambda v: np.clip(v, 0, 6), 'relu': lambda v: np.maximum(v, 0)}.get(
      mode, lambda v: v)
  reference = act(sums) + (0 if residual is None else residual)
  bound = (k + 2) * 2.0**-24 * (magnitude + (0 if residual is None else np.abs(residual)))
  assert y.shape == (3, 45, 101) and y.dtype == np.float32
  assert np.all(np.abs(y - reference) <= bound)
  exact = act(x.astype(np.float64) @ w.astype(np.float64) + b)
  assert np.abs(y - exact - (0 if residual is None else residual)).max() > 10 * bound.max()


@pytest.mark.parametrize('mode', ['linear', 'relu6', 'relu', 'residual'])
@pytest.mark.parametrize('k', [1, 7, 52, 136])
@pytest.mark.parametrize('loop', list(float_kernel.F32_LOOPS))
def test_the_kernel_computes_the_float32_product(mode, k, loop):
  """float32 weights, each loop: 45 rows (not whole 6- or 8-row tiles) in a batch of 3, 101
  outputs (7 panels: the 4-, 2- and 1-panel tiles; a partial one), 1 to 136 inputs: within
  float32 summation error of the exact float64 sum, and far closer to it than bfloat16
  inputs would allow (nothing is rounded on the way in)."""
  _skip_without_f32(loop)
  rng = np.random.default_rng(100 + k)
  x = rng.normal(0, 1, (3, 45, k)).astype(np.float32)
  w = rng.normal(0, 0.2, (k, 101)).astype(np.float32)
  b = rng.normal(0, 1, 101).astype(np.float32)
  residual = rng.normal(0, 1, (3, 45, 101)).astype(np.float32) if mode == 'residual' else None
  y = np.asarray(float_kernel.product(
      jnp.asarray(x), jnp.asarray(float_kernel.pack_weights(w, jnp.float32)), jnp.asarray(b),
      mode='linear' if mode == 'residual' else mode,
      residual=None if residual is None else jnp.asarray(residual), loop=loop))
  act = {'relu6': lambda v: np.clip(v, 0, 6), 'relu': lambda v: np.maximum(v, 0)}.get(
      mode, lambda v: v)
  x64, w64 = x.astype(np.float64), w.astype(np.float64)
  reference = act(x64 @ w64 + b) + (0 if residual is None else residual)
  magnitude = np.abs(x64) @ np.abs(w64) + np.abs(b)
  bound = (k + 2) * 2.0**-24 * (magnitude + (0 if residual is None else np.abs(residual)))
  assert y.shape == (3, 45, 101) and y.dtype == np.float32
  assert np.all(np.abs(y - reference) <= bound)
  if mode in ('linear', 'residual'):
    rounded = _bf16(x) @ _bf16(w) + b + (0 if residual is None else residual)
    assert np.abs(rounded - reference).max() > 10 * bound.max()


def test_float32_weights_are_packed_in_panels_of_16_channels():
  """Panel p, input g, channel c: w[g, 16p + c] exactly, zeros beyond the outputs; no
  padding of the inputs."""
  rng = np.random.default_rng(3)
  w = rng.normal(0, 1, (37, 21)).astype(np.float32)
  packed = float_kernel.pack_weights(w, jnp.float32)
  assert packed.dtype == np.float32 and packed.shape == (2 * 37 * 16,)
  assert float_kernel.packed_size(37, 21, jnp.float32) == packed.size
  panels = packed.reshape(2, 37, 16)
  np.testing.assert_array_equal(panels[0], w[:, :16])
  np.testing.assert_array_equal(panels[1, :, :5], w[:, 16:])
  assert not panels[1, :, 5:].any()
  with pytest.raises(ValueError, match='float32 or bfloat16, not int8'):
    float_kernel.pack_weights(w, jnp.int8)


def _numpy_depthwise(x, w, b, stride, dilation):
  """relu6(3x3 'SAME' depthwise conv + b) in float64, TensorFlow's 'SAME' padding."""
  n, h, wd, c = x.shape
  oh, ow = -(-h // stride), -(-wd // stride)
  pads = [max((o - 1) * stride + 2 * dilation + 1 - size, 0) for o, size in ((oh, h), (ow, wd))]
  xp = np.zeros((n, h + pads[0], wd + pads[1], c))
  xp[:, pads[0] // 2:pads[0] // 2 + h, pads[1] // 2:pads[1] // 2 + wd] = x
  y = np.zeros((n, oh, ow, c)) + b
  for i in range(3):
    for j in range(3):
      y += xp[:, i * dilation:i * dilation + (oh - 1) * stride + 1:stride,
              j * dilation:j * dilation + (ow - 1) * stride + 1:stride] * w[i, j]
  return np.clip(y, 0, 6)


@pytest.mark.parametrize('stride,dilation', float_kernel.DEPTHWISE_STRIDES)
@pytest.mark.parametrize('shape', [(2, 17, 23, 40), (1, 12, 9, 13)])
@pytest.mark.parametrize('loop', list(float_kernel.F32_LOOPS))
def test_the_float32_depthwise_layer_is_numpys(stride, dilation, shape, loop):
  """The kernel engines' depthwise layer (float32 in and out, ReLU6) in each loop against
  NumPy's sums in float64: odd sizes, a batch, channels beyond whole 16-channel vectors (40)
  or fewer than one (13: the AVX-512 loop only; the AVX2 loop refuses them)."""
  _skip_without_f32(loop)
  rng = np.random.default_rng(shape[-1] + stride + dilation)
  x = rng.uniform(0, 6, shape).astype(np.float32)
  w = rng.normal(0, 0.5, (3, 3, shape[-1])).astype(np.float32)
  b = rng.normal(0, 1, shape[-1]).astype(np.float32)
  if loop == 'avx2' and shape[-1] % 8:
    assert not float_kernel.depthwise_supported(shape[-1], loop)
    with pytest.raises(ValueError, match='takes channels in multiples of 8'):
      float_kernel.depthwise(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), stride, dilation,
                             loop)
    return
  y = np.asarray(float_kernel.depthwise(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), stride,
                                        dilation, loop))
  expected = _numpy_depthwise(x, w, b, stride, dilation)
  assert y.shape == expected.shape and y.dtype == np.float32
  np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5)
  assert 0 < (y == 0).mean() < 1 and 0 < (y == 6).mean() < 1  # both ends of ReLU6 met
  with pytest.raises(ValueError, match='3x3 weights'):
    float_kernel.depthwise(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), 2, 2)


@pytest.mark.parametrize('loop', ['avx512bf16', 'amx', 'avx2', 'avx512'])
@pytest.mark.parametrize('stride,dilation', float_kernel.DEPTHWISE_STRIDES)
def test_the_fused_pass_computes_the_expansion_then_the_depthwise_layer(stride, dilation, loop,
                                                                       monkeypatch):
  """Bands of rows through both layers give exactly the two calls' numbers (odd sizes, a
  batch of 2, expanded channels beyond whole panels), in each precision; with the
  projection after them too."""
  _use_loop(loop, monkeypatch)
  dtype = jnp.float32 if loop in float_kernel.F32_LOOPS else jnp.bfloat16
  rng = np.random.default_rng(stride * 10 + dilation)
  x = jnp.asarray(rng.uniform(-1, 1, (2, 19, 14, 24)), jnp.float32)
  wp = jnp.asarray(float_kernel.pack_weights(rng.normal(0, 0.3, (24, 40)).astype(np.float32),
                                             dtype))
  b = jnp.asarray(rng.normal(0, 1, 40), jnp.float32)
  wd = jnp.asarray(rng.normal(0, 0.3, (3, 3, 40)), jnp.float32)
  bd = jnp.asarray(rng.normal(0, 1, 40), jnp.float32)
  fused = float_kernel.expand_depthwise(x, wp, b, wd, bd, stride, dilation, loop=loop)
  two = float_kernel.depthwise(float_kernel.product(x, wp, b, 'relu6', loop=loop), wd, bd,
                              stride, dilation)
  assert fused.shape == (2, -(-19 // stride), -(-14 // stride), 40)
  np.testing.assert_array_equal(np.asarray(fused), np.asarray(two))
  with pytest.raises(ValueError, match='weights for 24 inputs and 49 outputs'):
    float_kernel.expand_depthwise(x, wp, jnp.zeros(49), wd, bd, stride, dilation, loop=loop)
  # The projection (24 outputs, with a residual sum, and without) in the same pass: the
  # depthwise output as the product takes it (bfloat16: rounded) through `product`.
  pw = jnp.asarray(float_kernel.pack_weights(rng.normal(0, 0.2, (40, 24)).astype(np.float32),
                                             dtype))
  pb = jnp.asarray(rng.normal(0, 1, 24), jnp.float32)
  residual = jnp.asarray(rng.normal(0, 1, fused.shape[:3] + (24,)), jnp.float32)
  for r in (residual, None):
    projected = float_kernel.expand_depthwise(x, wp, b, wd, bd, stride, dilation, loop=loop,
                                              project=(pw, pb), residual=r)
    np.testing.assert_array_equal(
        np.asarray(projected),
        np.asarray(float_kernel.product(two.astype(dtype), pw, pb, residual=r, loop=loop)))
  with pytest.raises(ValueError, match='a residual goes with a projection'):
    float_kernel.expand_depthwise(x, wp, b, wd, bd, stride, dilation, loop=loop,
                                  residual=residual)


def _numpy_stem(x, ws, bs):
  """relu6(3x3 stride-2 'SAME' conv + bs) in float64."""
  n, h, w, _ = x.shape
  oh, ow = -(-h // 2), -(-w // 2)
  pads = [max((o - 1) * 2 + 3 - size, 0) for o, size in ((oh, h), (ow, w))]
  xp = np.zeros((n, h + pads[0], w + pads[1], 3))
  xp[:, pads[0] // 2:pads[0] // 2 + h, pads[1] // 2:pads[1] // 2 + w] = x
  y = np.zeros((n, oh, ow, ws.shape[-1])) + bs
  for i in range(3):
    for j in range(3):
      y += xp[:, i:i + 2 * oh - 1:2, j:j + 2 * ow - 1:2] @ ws[i, j]
  return np.clip(y, 0, 6)


@pytest.mark.parametrize('shape,c', [((2, 33, 29, 3), 16), ((1, 40, 65, 3), 32),
                                     ((1, 21, 18, 3), 24)])
@pytest.mark.parametrize('loop', list(float_kernel.F32_LOOPS))
def test_the_stem_pass_is_numpys_stem_then_depthwise_layer(shape, c, loop):
  """The kernel engines' stem pass (stem, ReLU6, block 0's depthwise layer, ReLU6; float32)
  in each loop against NumPy in float64: odd and even sizes (the 'SAME' padding's sides), a
  batch, channels in 16s and not (24: the AVX2 loops even where AVX-512 runs)."""
  _skip_without_f32(loop)
  rng = np.random.default_rng(c + shape[1])
  x = rng.uniform(-1, 1, shape).astype(np.float32)
  ws = rng.normal(0, 0.5, (3, 3, 3, c)).astype(np.float32)
  bs = rng.normal(0, 1, c).astype(np.float32)
  wd = rng.normal(0, 0.5, (3, 3, c)).astype(np.float32)
  bd = rng.normal(0, 1, c).astype(np.float32)
  y = np.asarray(float_kernel.stem(*map(jnp.asarray, (x, ws, bs, wd, bd)), loop=loop))
  expected = _numpy_depthwise(_numpy_stem(x, ws, bs), wd, bd, 1, 1)
  assert y.shape == expected.shape and y.dtype == np.float32
  np.testing.assert_allclose(y, expected, rtol=0, atol=2e-5)
  assert 0 < (y == 0).mean() < 1 and 0 < (y == 6).mean() < 1
  assert not float_kernel.stem_supported(shape, (3, 3, 3, 20))  # 8 channels per vector
  with pytest.raises(ValueError, match='a multiple of 8'):
    float_kernel.stem(jnp.asarray(x), jnp.zeros((3, 3, 3, 20)), jnp.zeros(20),
                      jnp.zeros((3, 3, 20)), jnp.zeros(20), loop=loop)


@pytest.mark.parametrize('layer', ['depthwise', 'fused avx512bf16', 'fused amx', 'stem'])
@pytest.mark.parametrize('c', [16, 40, 13])
def test_a_bfloat16_output_is_the_float32_output_rounded_to_nearest_even(layer, c,
                                                                        monkeypatch):
  """The depthwise layer, the fused pass (in each bfloat16 loop) and the stem pass asked for
  bfloat16 write their float32 outputs as ml_dtypes rounds them, to the bit (whole 16-channel
  vectors, a masked last one, fewer than one); the stem pass in 16s only, the AVX2 loops
  refuse (they write float32)."""
  _skip_without_f32('avx512')
  if layer.startswith('fused'):
    _use_loop(layer.split()[1], monkeypatch)
  rng = np.random.default_rng(c)
  wd = jnp.asarray(rng.normal(0, 0.4, (3, 3, c)), jnp.float32)
  bd = jnp.asarray(rng.normal(0, 1, c), jnp.float32)
  if layer == 'stem':
    if c % 16:
      return
    images = jnp.asarray(rng.uniform(-1, 1, (2, 31, 22, 3)), jnp.float32)
    ws = jnp.asarray(rng.normal(0, 0.5, (3, 3, 3, c)), jnp.float32)
    bs = jnp.asarray(rng.normal(0, 1, c), jnp.float32)
    run = lambda dtype, loop=None: float_kernel.stem(images, ws, bs, wd, bd, loop=loop,
                                                     out_dtype=dtype)
  elif layer == 'depthwise':
    x = jnp.asarray(rng.uniform(0, 6, (2, 17, 14, c)), jnp.float32)
    run = lambda dtype, loop=None: float_kernel.depthwise(x, wd, bd, 1, 2, loop=loop,
                                                          out_dtype=dtype)
  else:
    x = jnp.asarray(rng.uniform(-1, 1, (2, 19, 14, 24)), jnp.float32)
    wp = jnp.asarray(float_kernel.pack_weights(rng.normal(0, 0.3, (24, c)).astype(np.float32)))
    b = jnp.asarray(rng.normal(0, 1, c), jnp.float32)
    loop = layer.split()[1]
    run = lambda dtype, _=None: float_kernel.expand_depthwise(x, wp, b, wd, bd, 2, 1,
                                                              loop=loop, out_dtype=dtype)
  f32, bf16 = np.asarray(run(jnp.float32)), np.asarray(run(jnp.bfloat16))
  assert f32.dtype == np.float32 and bf16.dtype == jnp.bfloat16 and bf16.shape == f32.shape
  np.testing.assert_array_equal(bf16.view(np.uint16), f32.astype(jnp.bfloat16).view(np.uint16))
  inside = (f32 > 0) & (f32 < 6)  # (ReLU6's ends are bfloat16 already)
  assert inside.mean() > 0.3 and (bf16.astype(np.float32) != f32)[inside].mean() > 0.9
  if layer in ('depthwise', 'stem') and 'avx2' in float_kernel.f32_loops() and c % 8 == 0:
    with pytest.raises(ValueError, match='a bfloat16 output needs the AVX-512 loops'):
      run(jnp.bfloat16, 'avx2')
  with pytest.raises(ValueError, match='out_dtype is float32 or bfloat16'):
    run(jnp.int8)


@pytest.mark.parametrize('loop', ['avx512bf16', 'amx'])
@pytest.mark.parametrize('k,rows', [(7, 45), (64, 45), (64, 96), (136, 96)])
def test_the_bfloat16_product_takes_bfloat16_inputs(loop, k, rows, monkeypatch):
  """x handed over in bfloat16 gives exactly the float32 x of the same values' outputs:
  inputs read in place (k a multiple of 32 and whole 32-row blocks: 64 x 96) or copied into
  the padded rows (7 and 136 inputs, 45 rows), with a residual sum; a bfloat16 x with float32
  weights is refused."""
  _use_loop(loop, monkeypatch)
  rng = np.random.default_rng(k + rows)
  xb = jnp.asarray(rng.normal(0, 1, (rows, k)), jnp.bfloat16)
  w = jnp.asarray(float_kernel.pack_weights(rng.normal(0, 0.2, (k, 40)).astype(np.float32)))
  b = jnp.asarray(rng.normal(0, 1, 40), jnp.float32)
  residual = jnp.asarray(rng.normal(0, 1, (rows, 40)), jnp.float32)
  for mode, r in (('relu6', None), ('linear', residual)):
    got = float_kernel.product(xb, w, b, mode=mode, residual=r, loop=loop)
    np.testing.assert_array_equal(
        np.asarray(got),
        np.asarray(float_kernel.product(xb.astype(jnp.float32), w, b, mode=mode, residual=r,
                                        loop=loop)))
  f32 = jnp.asarray(float_kernel.pack_weights(np.ones((k, 40), np.float32), jnp.float32))
  if float_kernel.available(jnp.float32):
    with pytest.raises(ValueError, match='a bfloat16 x goes with bfloat16 weights'):
      float_kernel.product(xb, f32, b)


@pytest.mark.parametrize('shape,c', [((2, 33, 29, 3), 16), ((1, 70, 65, 3), 32),
                                     ((1, 21, 18, 3), 24)])
@pytest.mark.parametrize('loop', ['avx512bf16', 'amx', 'avx2', 'avx512'])
def test_the_stem_pass_and_projection_in_one_pass_are_the_two_calls(shape, c, loop, monkeypatch):
  """`stem_project` gives exactly the stem pass's output (bfloat16 for the bfloat16 loops,
  which round it so anyway) through `product`, in each loop (AMX's stand-in), over odd sizes,
  a batch of 2, a taller image than one chunk of rows (70 -> 35 rows), outputs beyond whole
  panels (20); the bfloat16 loops refuse a stem whose channels are not in 16s (24)."""
  _use_loop(loop, monkeypatch)
  _skip_without_f32('avx512')  # (the bfloat16 loops' stem pass is the AVX-512 one)
  dtype = jnp.float32 if loop in float_kernel.F32_LOOPS else jnp.bfloat16
  rng = np.random.default_rng(c + shape[1])
  images = jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32)
  ws, bs, wd, bd = (jnp.asarray(rng.normal(0, 0.5, s_), jnp.float32)
                    for s_ in ((3, 3, 3, c), (c,), (3, 3, c), (c,)))
  wp = jnp.asarray(float_kernel.pack_weights(rng.normal(0, 0.3, (c, 20)).astype(np.float32),
                                             dtype))
  b = jnp.asarray(rng.normal(0, 1, 20), jnp.float32)
  if dtype == jnp.bfloat16 and c % 16:
    with pytest.raises(ValueError, match='channels in multiples of 16'):
      float_kernel.stem_project(images, ws, bs, wd, bd, wp, b, loop=loop)
    return
  stem_loop = loop if dtype == jnp.float32 else 'avx512'
  mid = float_kernel.stem(images, ws, bs, wd, bd, loop=stem_loop, out_dtype=dtype)
  two = np.asarray(float_kernel.product(mid, wp, b, loop=loop))
  one = np.asarray(float_kernel.stem_project(images, ws, bs, wd, bd, wp, b, loop=loop))
  assert one.shape == (shape[0], -(-shape[1] // 2), -(-shape[2] // 2), 20)
  np.testing.assert_array_equal(one, two)
  with pytest.raises(ValueError, match='weights for'):
    float_kernel.stem_project(images, ws, bs, wd, bd, wp[:-16], b, loop=loop)


@pytest.mark.parametrize('stride,dilation', float_kernel.DEPTHWISE_STRIDES)
@pytest.mark.parametrize('loop', ['avx512bf16', 'amx', 'avx2', 'avx512'])
def test_the_depthwise_layer_and_projection_in_one_pass_are_the_two_calls(stride, dilation,
                                                                         loop, monkeypatch):
  """`depthwise_project` gives exactly `depthwise` (bfloat16 out for the bfloat16 loops, as
  the product rounds it) then `product` with a residual, in each loop (AMX's stand-in): a
  batch of 2, odd sizes, taller than one chunk of rows, 40 channels (beyond whole vectors),
  20 outputs; without a residual too; a residual of another shape is refused."""
  _use_loop(loop, monkeypatch)
  _skip_without_f32('avx512')
  dtype = jnp.float32 if loop in float_kernel.F32_LOOPS else jnp.bfloat16
  rng = np.random.default_rng(stride * 10 + dilation)
  x = jnp.asarray(rng.uniform(0, 6, (2, 37, 15, 40)), jnp.float32)
  wd = jnp.asarray(rng.normal(0, 0.3, (3, 3, 40)), jnp.float32)
  bd = jnp.asarray(rng.normal(0, 1, 40), jnp.float32)
  wp = jnp.asarray(float_kernel.pack_weights(rng.normal(0, 0.2, (40, 20)).astype(np.float32),
                                             dtype))
  b = jnp.asarray(rng.normal(0, 1, 20), jnp.float32)
  shape = (2, -(-37 // stride), -(-15 // stride), 20)
  residual = jnp.asarray(rng.normal(0, 1, shape), jnp.float32)
  mid = float_kernel.depthwise(x, wd, bd, stride, dilation,
                               loop=loop if dtype == jnp.float32 else 'avx512', out_dtype=dtype)
  for r in (residual, None):
    one = np.asarray(float_kernel.depthwise_project(x, wd, bd, stride, dilation, wp, b,
                                                    residual=r, loop=loop))
    assert one.shape == shape
    np.testing.assert_array_equal(one, np.asarray(float_kernel.product(mid, wp, b, residual=r,
                                                                       loop=loop)))
  with pytest.raises(ValueError, match='the residual must be'):
    float_kernel.depthwise_project(x, wd, bd, stride, dilation, wp, b, residual=residual[:1],
                                   loop=loop)


def test_packed_weights_follow_the_kernels_layout():
  """Panel p, pair g, channel c, j: the bfloat16 of w[2g + j, 16p + c], zeros beyond the
  weights (inputs to a multiple of 32, outputs to whole panels)."""
  rng = np.random.default_rng(2)
  w = rng.normal(0, 1, (37, 21)).astype(np.float32)
  packed = float_kernel.pack_weights(w)
  assert packed.dtype == np.uint16 and packed.shape == (64 * 32,)  # 2 panels x 64 inputs
  as_float = (packed.astype(np.uint32) << 16).view(np.float32).reshape(2, 32, 16, 2)
  for p, g, c, j in [(0, 0, 0, 0), (0, 3, 5, 1), (1, 18, 4, 0), (1, 17, 4, 1)]:
    assert as_float[p, g, c, j] == np.float32(_bf16(w[2 * g + j, 16 * p + c]))
  assert not as_float[1, :, 5:].any()   # outputs 21..31
  assert not as_float[:, 19:].any()     # inputs 38..63 (input 37's pair partner too)
  assert not as_float[:, 18, :, 1].any()


def test_the_kernel_rejects_what_it_cannot_run():
  if not float_kernel.available():
    pytest.skip(f'no bfloat16 kernel here: {float_kernel.unavailable_reason()}')
  x = jnp.ones((4, 40), jnp.float32)
  packed = jnp.asarray(float_kernel.pack_weights(np.ones((40, 20), np.float32)))
  with pytest.raises(ValueError, match='weights for 40 inputs and 20 outputs'):
    float_kernel.product(x, packed[:-1], jnp.zeros(20))
  with pytest.raises(ValueError, match="a residual is mode 'linear's"):
    float_kernel.product(x, packed, jnp.zeros(20), mode='relu6', residual=jnp.zeros((4, 20)))
  with pytest.raises(ValueError, match='the residual must be'):
    float_kernel.product(x, packed, jnp.zeros(20), residual=jnp.zeros((4, 21)))
  with pytest.raises(ValueError, match='mode must be one of'):
    float_kernel.product(x, packed, jnp.zeros(20), mode='gelu')
  with pytest.raises(ValueError, match='is not one of this CPU'):
    float_kernel.product(x, packed, jnp.zeros(20), loop='neon')
  f32 = jnp.asarray(float_kernel.pack_weights(np.ones((40, 20), np.float32), jnp.float32))
  with pytest.raises(ValueError, match='float32 weights for 40 inputs and 20 outputs'):
    float_kernel.product(x, f32[:-16], jnp.zeros(20))
  with pytest.raises(ValueError, match="float32 loop 'amx' is not one of this CPU"):
    float_kernel.product(x, f32, jnp.zeros(20), loop='amx')
  with pytest.raises(ValueError, match='packed weights are float32 or uint16'):
    float_kernel.product(x, f32.astype(jnp.int32), jnp.zeros(20))


def test_the_cpu_choice_of_the_bfloat16_formulation(monkeypatch):
  """The kernel where the CPU has AVX-512 BF16 or AMX-BF16 (with AVX2 and FMA), XLA's
  bfloat16 elsewhere; SEG_BF16_FORMULATION overrides, and is checked."""
  base = 'fpu sse2 avx avx2 fma avx512f avx512bw avx512vl avx512dq'
  choose = lambda flags, machine='x86_64': cpu_features.choose(flags, machine).bf16_formulation
  assert choose(base) == 'xla'
  assert choose(base + ' avx512_bf16') == 'kernel'
  assert choose(base + ' avx512_vnni amx_bf16 amx_int8 amx_tile') == 'kernel'
  assert choose('avx512_bf16 avx2') == 'xla'  # no FMA: the library is not built
  assert choose('Features : fp asimd bf16', machine='aarch64') == 'xla'
  assert 'bfloat16 kernel in AVX-512 BF16' in cpu_features.choose(base + ' avx512_bf16',
                                                                  'x86_64').reason
  assert choose('fpu sse2 avx avx2 fma avx512_bf16') == 'xla'  # its loops are AVX-512's
  monkeypatch.setenv('SEG_BF16_FORMULATION', 'xla')
  assert engine.float_formulation_for('bfloat16', 'cpu') == 'xla'
  monkeypatch.setenv('SEG_BF16_FORMULATION', 'fast')
  with pytest.raises(ValueError, match='SEG_BF16_FORMULATION must be auto or one of'):
    engine.float_formulation_for('bfloat16', 'cpu')


def test_the_cpu_choice_of_the_float32_formulation(monkeypatch):
  """The kernel where the CPU has AVX-512 F, BW, VL and DQ (with AVX2 and FMA), XLA's float32
  elsewhere; SEG_F32_FORMULATION overrides, and is checked; the bfloat16 variable does not
  touch float32."""
  choose = lambda flags, machine='x86_64': cpu_features.choose(flags, machine).f32_formulation
  avx2 = 'fpu sse2 avx avx2 fma'
  assert choose(avx2) == 'xla'
  assert choose(avx2 + ' avx512f avx512bw avx512vl avx512dq') == 'kernel'
  assert choose(avx2 + ' avx512f avx512dq') == 'xla'  # no BW and VL (Xeon Phi)
  assert choose('avx2 avx512f avx512bw avx512vl avx512dq') == 'xla'  # no FMA: not built
  assert choose('Features : fp asimd', machine='aarch64') == 'xla'
  assert 'float32 kernel in AVX-512' in cpu_features.choose(
      avx2 + ' avx512f avx512bw avx512vl avx512dq', 'x86_64').reason
  monkeypatch.setenv('SEG_BF16_FORMULATION', 'xla')
  monkeypatch.setenv('SEG_F32_FORMULATION', 'kernel')
  assert cpu_features.float_formulation_override('float32') == 'kernel'
  monkeypatch.setenv('SEG_F32_FORMULATION', 'xla')
  assert engine.float_formulation_for('float32', 'cpu') == 'xla'
  monkeypatch.setenv('SEG_F32_FORMULATION', 'fast')
  with pytest.raises(ValueError, match='SEG_F32_FORMULATION must be auto or one of'):
    engine.float_formulation_for('float32', 'cpu')


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_without_the_kernel_the_engine_runs_xlas_products(dtype, monkeypatch):
  """Accelerators never get the CPU kernel, nor does a CPU that cannot run it; when it was
  asked for by name, the engine says why it runs XLA's products instead."""
  said = []
  assert engine.float_formulation_for(dtype, 'gpu', 'kernel', said.append) == 'xla'
  assert 'the engine runs on gpu' in said[-1] and f"XLA's {dtype} products" in said[-1]
  assert engine.float_formulation_for(dtype, 'gpu') == 'xla'  # the CPU's choice is not asked
  monkeypatch.setattr(float_kernel, 'available', lambda dtype=None, log=None: False)
  monkeypatch.setattr(float_kernel, 'unavailable_reason', lambda dtype=None: 'no AVX-512')
  assert engine.float_formulation_for(dtype, 'cpu', 'kernel', said.append) == 'xla'
  assert 'no AVX-512' in said[-1]
  said.clear()
  assert engine.float_formulation_for(dtype, 'cpu', log=said.append) == 'xla' and not said


@pytest.fixture(scope='module')
def tiny_model():
  config = tiny_engine_config()
  _, variables = random_variables(config.model, seed=7)
  return config, variables


def _kernel_engine(config, variables, dtype='bfloat16', **kwargs):
  if not float_kernel.available(engine.DTYPES[dtype]):
    pytest.skip(f'no {dtype} kernel here: '
                f'{float_kernel.unavailable_reason(engine.DTYPES[dtype])}')
  if dtype == 'float32':
    return engine.Engine(config, variables, f32_formulation='kernel', **kwargs)
  return engine.Engine(config, variables, dtype='bfloat16', bf16_formulation='kernel', **kwargs)


def _xla_float32(config, variables, **kwargs):
  return engine.Engine(config, variables, f32_formulation='xla', **kwargs)


def _network_and_calls(eng, config, dtype, seed, upsample=True):
  """(images, run, targets) for a kernel engine's network on 2 random images: run() a fresh
  function of (folded, images) (a fresh trace reads the SEG_* variables anew), targets() the
  FFI targets its trace calls, in order."""
  m = config.model
  images = preprocess(np.random.default_rng(seed).integers(0, 256, (2, EVAL_SIZE, EVAL_SIZE, 3),
                                                           np.uint8))
  run = lambda: lambda f, x: forward(f, x, width=m.width, output_stride=m.output_stride,
                                     dtype=engine.DTYPES[dtype], upsample=upsample)
  targets = lambda: [e.params['target_name'] for e in jax.make_jaxpr(run())(eng.folded,
                                                                          images).eqns
                     if e.primitive.name == 'ffi_call']
  return images, run, targets


@pytest.mark.parametrize('from_stride', ['2', '16'])
def test_the_engine_runs_the_products_from_the_chosen_stride_in_the_kernel(
    tiny_model, from_stride, monkeypatch):
  """Counted in the traced program: the expansion and projection of each block whose input
  has stride >= SEG_BF16_FROM_STRIDE (at most the output stride), and the head's aspp0,
  concat projection and logits; every depthwise layer (in float32; block 0's in one pass with
  the stem, and with block 0's projection where that is in the kernel). Their logits are as
  close to float32's as XLA's bfloat16 engine's, and the classes float32's."""
  config, variables = tiny_model
  monkeypatch.setenv('SEG_BF16_FROM_STRIDE', from_stride)
  eng = _kernel_engine(config, variables)
  assert eng.bf16_formulation == 'kernel'
  m = config.model
  images = preprocess(np.random.default_rng(3).integers(0, 256, (1, EVAL_SIZE, EVAL_SIZE, 3),
                                                        np.uint8))
  run = lambda f, x: forward(f, x, width=m.width, output_stride=m.output_stride,
                             dtype=jnp.bfloat16)
  jaxpr = jax.make_jaxpr(run)(eng.folded, images)
  calls = [e for e in jaxpr.eqns if e.primitive.name == 'ffi_call'
           and e.params['target_name'] == 'seg_float_product']
  depthwise = [e for e in jaxpr.eqns if e.primitive.name == 'ffi_call'
               and e.params['target_name'] == 'seg_f32_depthwise']
  with_projection = [e for e in jaxpr.eqns if e.primitive.name == 'ffi_call'
                     and e.params['target_name'] == 'seg_float_depthwise_project']
  stem = [e.params['target_name'] for e in jaxpr.eqns if e.primitive.name == 'ffi_call'
          and e.params['target_name'] in (int8_kernel.STEM_TARGET, 'seg_float_stem_project')]
  # All, any stride: block 0's in one pass with the stem (and its projection from stride
  # 2), the others alone or with their projection where that is in the kernel.
  assert stem == ['seg_float_stem_project' if from_stride == '2' else int8_kernel.STEM_TARGET]
  assert len(depthwise) + len(with_projection) == len(block_specs(m.width, m.output_stride)) - 1
  assert with_projection
  strides = [2]
  for _, _, stride, _ in block_specs(m.width, m.output_stride):
    strides.append(strides[-1] * stride)
  threshold = min(int(from_stride), m.output_stride)
  # ... + the head's aspp0, concat projection, logits and image pooling's two products (one
  # image: the pooling in the kernel, `test_the_head_pools_in_the_kernel_for_one_image`).
  want = sum((2 if i else 1) for i, s in enumerate(strides[:-1]) if s >= threshold) + 3 + 2
  assert len(calls) + len(with_projection) + (from_stride == '2') == want
  # No XLA product in bfloat16 on a feature map: the kernel rounds what it reads (or takes
  # the depthwise layers' bfloat16, test_the_depthwise_layers_hand_the_bfloat16_products...).
  assert not [e for e in jaxpr.eqns if e.primitive.name == 'dot_general'
              and e.invars[0].aval.dtype == jnp.bfloat16 and e.outvars[0].aval.ndim == 4]
  got = np.asarray(jax.jit(run)(eng.folded, images))
  xla = engine.Engine(config, variables, dtype='bfloat16', bf16_formulation='xla')
  reference = np.asarray(jax.jit(run)(xla.folded, images))
  f32 = _xla_float32(config, variables)
  exact = np.asarray(jax.jit(lambda f, x: forward(f, x, width=m.width,
                                                  output_stride=m.output_stride))(
                                                      f32.folded, images))
  rms = lambda v: np.sqrt(np.mean(np.square(v)))
  # bfloat16's error, no larger than XLA's bfloat16 engine's (which also stores the
  # activations between layers in bfloat16), and within the bound test_engine.py sets it.
  assert 1e-5 * rms(exact) < rms(got - exact) <= 0.05 * rms(exact)
  assert rms(got - exact) <= 1.2 * rms(reference - exact)
  assert (got.argmax(-1) == exact.argmax(-1)).mean() >= 0.98


def test_the_float32_engine_runs_every_layer_but_the_heads_pooling_in_the_kernel(
    tiny_model, monkeypatch):
  """float32 kernel engine, counted in the traced program: every expansion and projection
  and the head's aspp0, concat projection and logits in the kernel's products (large
  expansions fused with their depthwise layer: all of them with the threshold at 0, with
  the same logits), every depthwise layer in its loop, block 0's with the stem; no XLA
  product on a feature map left. Its logits are XLA's float32 engine's up to float32
  summation order, its classes XLA's but for near-ties."""
  from seg.inference import forward as forward_module
  config, variables = tiny_model
  eng = _kernel_engine(config, variables, dtype='float32')
  assert eng.f32_formulation == 'kernel' and eng.bf16_formulation is None
  m = config.model
  images = preprocess(np.random.default_rng(8).integers(0, 256, (2, EVAL_SIZE, EVAL_SIZE, 3),
                                                        np.uint8))
  run = lambda: lambda f, x: forward(f, x, width=m.width, output_stride=m.output_stride,
                                     upsample=False)  # (resizing is a product, XLA's)
  jaxpr = jax.make_jaxpr(run())(eng.folded, images)
  targets = [e.params['target_name'] for e in jaxpr.eqns if e.primitive.name == 'ffi_call']
  blocks = block_specs(m.width, m.output_stride)
  products = sum(2 if 'expand' in block else 1 for block in eng.folded['blocks']) + 3
  assert targets.count('seg_float_product') + targets.count('seg_float_expand_depthwise') + (
      targets.count('seg_float_stem_project') + targets.count('seg_float_depthwise_project')
  ) == products
  assert targets.count('seg_f32_depthwise') + targets.count('seg_float_expand_depthwise') + (
      targets.count('seg_float_depthwise_project')) == len(blocks) - 1
  assert targets.count('seg_float_depthwise_project') >= 1
  assert targets.count('seg_float_stem_project') == 1  # the stem, block 0's depthwise, project
  assert not [e for e in jaxpr.eqns if e.primitive.name == 'dot_general'
              and e.outvars[0].aval.ndim == 4]
  got = np.asarray(jax.jit(run())(eng.folded, images))
  xla = _xla_float32(config, variables)
  exact = np.asarray(jax.jit(run())(xla.folded, images))
  assert 0 < np.abs(got - exact).max() <= 1e-5 * np.abs(exact).max()
  assert (got.argmax(-1) == exact.argmax(-1)).mean() >= 0.999
  monkeypatch.setattr(forward_module, 'FUSE_FROM_ELEMENTS', 0)
  targets = [e.params['target_name'] for e in jax.make_jaxpr(run())(eng.folded, images).eqns
             if e.primitive.name == 'ffi_call']
  assert targets.count('seg_float_expand_depthwise') == len(blocks) - 1  # block 0: none
  np.testing.assert_array_equal(np.asarray(jax.jit(run())(eng.folded, images)), got)
  # Every loop (SEG_F32_KERNEL_ISA, read when traced) sums in the same order: the same bits.
  for loop in float_kernel.f32_loops():
    monkeypatch.setenv('SEG_F32_KERNEL_ISA', loop)
    np.testing.assert_array_equal(np.asarray(jax.jit(run())(eng.folded, images)), got)
  monkeypatch.setenv('SEG_F32_KERNEL_ISA', 'sse')
  with pytest.raises(ValueError, match='SEG_F32_KERNEL_ISA must be auto, avx2, avx512'):
    jax.make_jaxpr(run())(eng.folded, images)


@pytest.mark.parametrize('from_stride', ['2', '16'])
def test_the_depthwise_layers_hand_the_bfloat16_products_bfloat16(tiny_model, from_stride,
                                                                 monkeypatch):
  """Every depthwise layer (and the stem pass, where it does not compute the projection
  itself) whose projection runs in the bfloat16 kernel writes bfloat16, the others float32
  (from stride 16: only those from there), and the logits are the float32 hand-offs'
  (SEG_BF16_HANDOFF=float32) to the bit: the product rounds its input as the depthwise loop
  rounds its output. The float32 engine hands over float32; another value is refused."""
  config, variables = tiny_model
  monkeypatch.setenv('SEG_BF16_FROM_STRIDE', from_stride)
  monkeypatch.setenv('SEG_DEPTHWISE_PROJECT', 'two')  # (one pass: nothing handed over)
  eng = _kernel_engine(config, variables)
  m = config.model
  images = preprocess(np.random.default_rng(12).integers(0, 256, (2, EVAL_SIZE, EVAL_SIZE, 3),
                                                         np.uint8))
  run = lambda: lambda f, x: forward(f, x, width=m.width, output_stride=m.output_stride,
                                     dtype=jnp.bfloat16, upsample=False)
  handoffs = lambda folded: [
      e.outvars[0].aval.dtype for e in jax.make_jaxpr(run())(folded, images).eqns
      if e.primitive.name == 'ffi_call' and e.params['target_name'] in (
          'seg_f32_depthwise', 'seg_float_expand_depthwise', int8_kernel.STEM_TARGET)]
  strides = [2]
  for _, _, stride, _ in block_specs(m.width, m.output_stride):
    strides.append(strides[-1] * stride)
  low = [s >= min(int(from_stride), m.output_stride) for s in strides[:-1]]
  if low[0]:  # block 0's projection in the stem pass itself: no hand-off
    low = low[1:]
  got = handoffs(eng.folded)
  assert got == [jnp.bfloat16 if is_low else jnp.float32 for is_low in low]
  logits = np.asarray(jax.jit(run())(eng.folded, images))
  monkeypatch.setenv('SEG_BF16_HANDOFF', 'float32')
  assert set(handoffs(eng.folded)) == {jnp.dtype(jnp.float32)}
  np.testing.assert_array_equal(np.asarray(jax.jit(run())(eng.folded, images)), logits)
  monkeypatch.setenv('SEG_BF16_HANDOFF', 'bfloat16')
  float32 = _kernel_engine(config, variables, dtype='float32')
  f32_run = lambda f, x: forward(f, x, width=m.width, output_stride=m.output_stride,
                                 upsample=False)
  assert not [e for e in jax.make_jaxpr(f32_run)(float32.folded, images).eqns
              if e.primitive.name == 'ffi_call' and e.outvars[0].aval.dtype == jnp.bfloat16]
  monkeypatch.setenv('SEG_BF16_HANDOFF', 'half')
  with pytest.raises(ValueError, match='SEG_BF16_HANDOFF must be bfloat16 or float32'):
    handoffs(eng.folded)


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_depthwise_layers_run_in_one_pass_with_their_projections(tiny_model, dtype,
                                                                  monkeypatch):
  """Every depthwise layer not fused with its expansion runs with its projection in one call
  (the residual sum included), with the same logits to the bit as two calls
  (SEG_DEPTHWISE_PROJECT=two, for A/B timings); another value is refused."""
  config, variables = tiny_model
  eng = _kernel_engine(config, variables, dtype=dtype)
  m = config.model
  images, run, targets = _network_and_calls(eng, config, dtype, 13, upsample=False)
  blocks = len(block_specs(m.width, m.output_stride))
  one = np.asarray(jax.jit(run())(eng.folded, images))
  assert targets().count('seg_float_depthwise_project') == blocks - 1  # (block 0: the stem's)
  assert 'seg_f32_depthwise' not in targets()
  monkeypatch.setenv('SEG_DEPTHWISE_PROJECT', 'two')
  assert targets().count('seg_f32_depthwise') == blocks - 1
  assert 'seg_float_depthwise_project' not in targets()
  np.testing.assert_array_equal(np.asarray(jax.jit(run())(eng.folded, images)), one)
  monkeypatch.setenv('SEG_DEPTHWISE_PROJECT', 'three')
  with pytest.raises(ValueError, match='SEG_DEPTHWISE_PROJECT must be one or two'):
    targets()


def test_large_expansions_run_in_one_pass_with_their_depthwise_layers(tiny_model, monkeypatch):
  """Expansions whose output reaches `FUSE_FROM_ELEMENTS` (none at this size; all with the
  threshold at 0) run with their depthwise layer in one pass, with the same logits."""
  from seg.inference import forward as forward_module
  config, variables = tiny_model
  eng = _kernel_engine(config, variables)
  m = config.model
  images = preprocess(np.random.default_rng(5).integers(0, 256, (1, EVAL_SIZE, EVAL_SIZE, 3),
                                                        np.uint8))
  monkeypatch.setenv('SEG_BF16_FROM_STRIDE', '2')
  # A new function each time: JAX reuses a function's trace, which read the threshold.
  run = lambda: lambda f, x: forward(f, x, width=m.width, output_stride=m.output_stride,
                                     dtype=jnp.bfloat16)
  fused_calls = lambda: [e for e in jax.make_jaxpr(run())(eng.folded, images).eqns
                         if e.primitive.name == 'ffi_call' and
                         e.params['target_name'] == 'seg_float_expand_depthwise']
  assert not fused_calls()
  separate = np.asarray(jax.jit(run())(eng.folded, images))
  monkeypatch.setattr(forward_module, 'FUSE_FROM_ELEMENTS', 0)
  assert len(fused_calls()) == len(block_specs(m.width, m.output_stride)) - 1  # block 0: none
  np.testing.assert_array_equal(np.asarray(jax.jit(run())(eng.folded, images)), separate)


def test_the_mean_is_the_row_major_float32_sum_over_the_count():
  """`mean`: per image and channel, the float32 sum over pixels in row-major order (NumPy's
  float32 additions one pixel at a time), divided by the pixel count, bit for bit."""
  _skip_without_f32()
  x = np.random.default_rng(21).normal(0, 3, (2, 5, 7, 40)).astype(np.float32)
  sums = np.zeros((2, 40), np.float32)
  for pixel in x.reshape(2, 35, 40).transpose(1, 0, 2):
    sums = sums + pixel  # float32 + float32: one rounding per pixel, as the kernel's
  np.testing.assert_array_equal(np.asarray(float_kernel.mean(jnp.asarray(x))),
                                sums / np.float32(35))
  np.testing.assert_allclose(np.asarray(float_kernel.mean(jnp.asarray(x))),
                             x.astype(np.float64).mean(axis=(1, 2)), rtol=0, atol=1e-5)
  with pytest.raises(ValueError, match=r'x is \[n, h, w, c\]'):
    float_kernel.mean(jnp.zeros((2, 0, 7, 4)))


def _flops(compiled) -> float:
  """XLA's flop count of a compiled program (its CPU client runs one under 1000 inline)."""
  analysis = compiled.cost_analysis()
  return (analysis[0] if isinstance(analysis, (list, tuple)) else analysis).get('flops', 0.0)


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_the_head_pools_in_the_kernel_for_one_image(tiny_model, dtype, monkeypatch):
  """For one image (a call's batch, or each image of a batch run image by image) the head's
  image pooling runs in the kernel (its mean and two products, the second the concat
  projection's bias), the logits as XLA's pooling gives them but for roundings
  (SEG_HEAD_POOL=xla, for A/B timings), and the network keeps no XLA arithmetic: under XLA's
  1000 flops, so its CPU client runs it inline. A batch run whole keeps XLA's pooling (one
  pooled vector per image); another value is refused."""
  config, variables = tiny_model
  eng = _kernel_engine(config, variables, dtype=dtype)
  m = config.model
  images, _, _ = _network_and_calls(eng, config, dtype, 17, upsample=False)
  run = lambda image_by_image: lambda f, x: forward(
      f, x, width=m.width, output_stride=m.output_stride, dtype=engine.DTYPES[dtype],
      upsample=False, image_by_image=image_by_image)
  targets = lambda x, image_by_image=False: [
      e.params['target_name'] for e in jax.make_jaxpr(run(image_by_image))(eng.folded, x).eqns
      if e.primitive.name == 'ffi_call']
  compiled = lambda x, image_by_image=False: jax.jit(run(image_by_image)).lower(
      eng.folded, x).compile()
  one = images[:1]
  assert targets(one).count('seg_float_mean') == 1 and 'seg_float_mean' not in targets(images)
  kernel = {1: np.asarray(compiled(one)(eng.folded, one)),
            2: np.asarray(compiled(images, True)(eng.folded, images))}
  assert _flops(compiled(one)) < 1000 and _flops(compiled(images, True)) < 1000
  monkeypatch.setenv('SEG_HEAD_POOL', 'xla')
  assert 'seg_float_mean' not in targets(one)
  assert _flops(compiled(one)) >= 1000
  for n, got in kernel.items():
    xla = np.asarray(compiled(images[:n], n > 1)(eng.folded, images[:n]))
    np.testing.assert_allclose(got, xla, rtol=0, atol=(1e-5 if dtype == 'float32' else 1e-3)
                               * np.abs(xla).max())
  monkeypatch.setenv('SEG_HEAD_POOL', 'fast')
  with pytest.raises(ValueError, match='SEG_HEAD_POOL must be one of kernel, xla'):
    targets(one)


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_the_stem_pass_takes_block_0s_projection_or_leaves_it(tiny_model, dtype, monkeypatch):
  """By default the stem pass computes block 0's projection too (one call); SEG_FLOAT_STEM
  (A/B timings) =pass leaves the projection to its own call, with the same logits to the bit;
  =xla leaves the stem to XLA and block 0's depthwise layer to the kernel (with its
  projection), with nearly the same logits; another value is refused."""
  config, variables = tiny_model
  eng = _kernel_engine(config, variables, dtype=dtype)
  m = config.model
  images, run, targets = _network_and_calls(eng, config, dtype, 6)
  fused = np.asarray(jax.jit(run())(eng.folded, images))
  assert targets()[0] == 'seg_float_stem_project'
  assert int8_kernel.STEM_TARGET not in targets()
  monkeypatch.setenv('SEG_FLOAT_STEM', 'pass')
  assert targets()[:2] == [int8_kernel.STEM_TARGET, 'seg_float_product']
  np.testing.assert_array_equal(np.asarray(jax.jit(run())(eng.folded, images)), fused)
  monkeypatch.setenv('SEG_FLOAT_STEM', 'xla')
  assert not {int8_kernel.STEM_TARGET, 'seg_float_stem_project'} & set(targets())
  assert targets().count('seg_float_depthwise_project') == len(block_specs(m.width,
                                                                          m.output_stride))
  without = np.asarray(jax.jit(run())(eng.folded, images))
  np.testing.assert_allclose(without, fused, rtol=0, atol=1e-3 * np.abs(fused).max())
  monkeypatch.setenv('SEG_FLOAT_STEM', 'fast')
  with pytest.raises(ValueError, match='SEG_FLOAT_STEM must be one of kernel, pass, xla'):
    targets()


def _equations(jaxpr):
  """A jaxpr's equations and those of the jaxprs inside them (lax.map's body), in order."""
  for e in jaxpr.eqns:
    yield e
    for value in e.params.values():
      inner = getattr(value, 'jaxpr', value)
      if hasattr(inner, 'eqns'):
        yield from _equations(inner)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16', 'int8'])
def test_class_maps_hand_the_kernels_the_uint8_pixels(tiny_model, tiny_int8, dtype,
                                                      monkeypatch):
  """`class_map` hands the kernel's stem pass the uint8 pixels and their sizes (no float32
  image in the program: the pass preprocesses as it reads, image by image or a batch whole),
  with the class maps and logits of XLA's preprocessing first (SEG_PIXELS=xla, for A/B
  timings) but for the roundings of XLA's unoptimised programs that the tests run (the
  kernel computes what its optimised ones do, `test_int8_kernel.py`); another value is
  refused."""
  from seg.inference import forward as forward_module, quantize
  if dtype == 'int8':
    config, _, folded, scales = tiny_int8
    params = quantize.quantize_folded(config.model, folded, scales, 'kernel')
  else:
    config, variables = tiny_model
    params = _kernel_engine(config, variables, dtype=dtype).folded
  m = config.model
  rng = np.random.default_rng(9)
  pixels = jnp.asarray(rng.integers(0, 256, (3, EVAL_SIZE, EVAL_SIZE, 3), np.uint8))
  sizes = jnp.asarray([[EVAL_SIZE, EVAL_SIZE], [EVAL_SIZE - 9, EVAL_SIZE],
                       [EVAL_SIZE, EVAL_SIZE - 20]], jnp.int32)
  run = lambda by_image: lambda p, x, s, upsample_argmax='kernel': forward_module.class_map(
      p, x, s, width=m.width, output_stride=m.output_stride, dtype=engine.DTYPES[dtype],
      image_by_image=by_image, upsample_argmax=upsample_argmax)
  stem_inputs = lambda: [e.invars[0].aval.dtype for e in _equations(jax.make_jaxpr(run(True))(
      params, pixels, sizes).jaxpr) if e.primitive.name == 'ffi_call' and 'stem' in
      e.params['target_name']]  # (inside lax.map's body)
  assert stem_inputs() == [jnp.uint8]
  got = {by_image: np.asarray(jax.jit(run(by_image))(params, pixels, sizes))
         for by_image in (True, False)}
  logits = np.asarray(jax.jit(lambda p, x, s: forward_module.forward(
      p, x, width=m.width, output_stride=m.output_stride, dtype=engine.DTYPES[dtype],
      sizes=s))(params, pixels, sizes))
  monkeypatch.setenv('SEG_PIXELS', 'xla')
  assert stem_inputs() == [jnp.float32]
  xla = np.asarray(jax.jit(run(True))(params, pixels, sizes))
  xla_logits = np.asarray(jax.jit(lambda p, x, s: forward_module.forward(
      p, forward_module.preprocessed(x, s), width=m.width, output_stride=m.output_stride,
      dtype=engine.DTYPES[dtype]))(params, pixels, sizes))
  np.testing.assert_array_equal(got[True], got[False])
  assert (got[True] == xla).mean() > 0.99
  np.testing.assert_allclose(logits, xla_logits, rtol=0, atol=2e-2 * np.abs(xla_logits).max())
  monkeypatch.setenv('SEG_PIXELS', 'fast')
  with pytest.raises(ValueError, match='SEG_PIXELS must be one of kernel, xla'):
    stem_inputs()


def test_the_kernel_engine_predicts_the_float32_classes(tiny_model, monkeypatch):
  """Whole predictions (preprocessing, padding, argmax, two images of other sizes), with
  bfloat16 from the same stride in both formulations."""
  config, variables = tiny_model
  monkeypatch.setenv('SEG_BF16_FROM_STRIDE', '2')
  eng = _kernel_engine(config, variables, batch_size=2)
  rng = np.random.default_rng(4)
  images = [rng.integers(0, 256, shape, np.uint8) for shape in
            [(EVAL_SIZE, EVAL_SIZE - 7, 3), (EVAL_SIZE - 20, EVAL_SIZE, 3)]]
  got = eng.predict(images)
  expected = _xla_float32(config, variables, batch_size=2).predict(images)
  xla = engine.Engine(config, variables, dtype='bfloat16', batch_size=2,
                      bf16_formulation='xla').predict(images)
  assert [g.shape for g in got] == [e.shape for e in expected]
  agree = lambda a: np.mean([(g == e).mean() for g, e in zip(a, expected)])
  # A random model's classes are close calls (a trained one's agree on 99.97% of the pixels,
  # docs/performance.md): as many as XLA's bfloat16 engine keeps, near enough. (The kernel
  # preprocesses the pixels as XLA's optimised programs do, in one fused multiply-add; the
  # tests run XLA unoptimised, whose two roundings move some close calls: 94.9% here.)
  assert agree(got) >= 0.94 and agree(got) >= agree(xla) - 0.01


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_an_export_never_carries_the_kernel(tiny_model, dtype):
  """The kernel lives in this project's library: an export of a kernel engine carries XLA's
  products in the engine's dtype, the export of an XLA engine (`main.py export`'s) to the
  pixel; an int8 kernel engine is refused."""
  config, variables = tiny_model
  eng = _kernel_engine(config, variables, dtype=dtype)
  xla = engine.Engine(config, variables, dtype=dtype, bf16_formulation='xla',
                      f32_formulation='xla')
  exported = export.export_engine(eng, platforms=('cpu',), batch_size=1)
  text = exported.mlir_module()
  assert 'seg_float_product' not in text and 'seg_f32_depthwise' not in text
  assert ('bf16' in text) == (dtype == 'bfloat16')
  images = np.random.default_rng(9).integers(0, 256, (1, EVAL_SIZE, EVAL_SIZE, 3), np.uint8)
  sizes = np.array([[EVAL_SIZE, EVAL_SIZE]], np.int32)
  np.testing.assert_array_equal(np.asarray(exported.call(images, sizes))[0],
                                xla.predict(images)[0])
  from seg.inference.quantize import scale_names
  int8 = engine.Engine(config, variables, dtype='int8', int8_formulation='kernel',
                       int8_scales=dict.fromkeys(scale_names(config.model), 6 / 127))
  if int8.int8_formulation == 'kernel':
    with pytest.raises(ValueError, match='which an export cannot carry'):
      export.export_engine(int8, platforms=('cpu',))


def test_the_benchmark_names_the_float_formulation_and_loop(monkeypatch):
  if not float_kernel.available():
    pytest.skip(f'no bfloat16 kernel here: {float_kernel.unavailable_reason()}')
  from experiments import tiny
  record = benchmark.benchmark(tiny.get_config(), height=65, width=65, dtype='bfloat16',
                               warmup=1, iters=2, log=lambda *a: None)
  assert record['bf16_formulation'] == 'kernel' and record['bf16_loop'] == float_kernel.isa()
  assert record['int8_loop'] is None and record['f32_formulation'] is None
  assert f'(kernel formulation, {float_kernel.isa()} loop)' in benchmark.format_record(record)
  record = benchmark.benchmark(tiny.get_config(), height=65, width=65, warmup=1, iters=2,
                               log=lambda *a: None)
  assert record['f32_formulation'] == 'kernel' and record['f32_loop'] == 'avx512'
  assert record['bf16_formulation'] is None
  assert 'engine float32 (kernel formulation, avx512 loop)' in benchmark.format_record(record)
  monkeypatch.setenv('SEG_F32_KERNEL_ISA', 'avx2')
  record = benchmark.benchmark(tiny.get_config(), height=65, width=65, warmup=1, iters=2,
                               log=lambda *a: None)
  assert record['f32_loop'] == 'avx2'
