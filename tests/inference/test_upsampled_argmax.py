"""The class map's upsampling and argmax in the CPU kernel (`float_kernel.upsampled_argmax`,
and `class_map_blocks` for predict's large images) against NumPy's float32 arithmetic on the
aligned-corner rule and against XLA's resize and argmax, and the engine's choice of it."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from helpers import EVAL_SIZE, random_variables, tiny_engine_config
from seg.inference import benchmark, engine, export, float_kernel, int8_kernel
from seg.model.layers import resize_bilinear

pytestmark = pytest.mark.skipif(
    not int8_kernel.cpu_supported(), reason='the kernels need an x86-64 CPU with AVX2 and FMA')


@pytest.fixture(autouse=True)
def _kernel():
  if not float_kernel.available(jnp.float32):
    pytest.skip(f'no CPU kernel here: {float_kernel.unavailable_reason(jnp.float32)}')


def _taps(out, size):
  """Output pixel o of `out` reads input position o * (size - 1) / (out - 1): (lo, frac)."""
  if out == 1 or size == 1:
    return np.zeros(out, int), np.zeros(out, np.float32)
  src = np.arange(out) * (size - 1) / (out - 1)
  lo = np.minimum(np.floor(src).astype(int), size - 2)
  return lo, (src - lo).astype(np.float32)


def _numpy_class_map(logits, height, width):
  """NumPy in the logits' dtype (float32 taps): the rows, then the columns, each as
  lo * (1 - t) + hi * t; the first class of the largest value. Returns (classes uint8, the
  upsampled logits)."""
  _, fh, fw, _ = logits.shape
  lo, t = _taps(height, fh)
  t = t[None, :, None, None]
  rows = logits[:, lo] * (1 - t) + logits[:, np.minimum(lo + 1, fh - 1)] * t
  lo, t = _taps(width, fw)
  t = t[None, None, :, None]
  full = rows[:, :, lo] * (1 - t) + rows[:, :, np.minimum(lo + 1, fw - 1)] * t
  assert full.dtype == logits.dtype
  return full.argmax(-1).astype(np.uint8), full


def _kernel_class_map(logits, height, width):
  return np.asarray(jax.jit(lambda x: float_kernel.upsampled_argmax(x, height, width))(logits))


@pytest.mark.parametrize('shape,size', [
    ((2, 33, 33, 21), (513, 513)),   # the paper's canvas at output stride 16
    ((1, 33, 33, 21), (500, 375)),   # cells of 15-16 pixels, rows not a multiple of 8
    ((1, 5, 7, 3), (37, 50)),
    ((3, 1, 4, 2), (9, 13)),         # one feature row
    ((1, 6, 1, 5), (17, 1)),         # one feature column, one output column
    ((1, 9, 9, 1), (65, 65)),        # one class
    ((1, 4, 6, 256), (21, 19)),      # the most classes a uint8 map holds
])
def test_the_class_map_is_numpys_float32_upsampling_then_argmax(shape, size):
  """Bit for bit: the same roundings in the same order (rows, then columns)."""
  logits = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32) * 4
  expected, _ = _numpy_class_map(logits, *size)
  got = _kernel_class_map(logits, *size)
  assert got.shape == (shape[0], *size) and got.dtype == np.uint8
  np.testing.assert_array_equal(got, expected)


def test_ties_go_to_the_lower_class():
  """As argmax: of equal largest logits the first class wins; NaN never wins."""
  logits = np.zeros((1, 3, 3, 7), np.float32)
  assert not _kernel_class_map(logits, 17, 17).any()
  logits[..., 2] = logits[..., 5] = 1.0
  np.testing.assert_array_equal(_kernel_class_map(logits, 17, 17), 2)
  logits[..., 6] = np.nan
  np.testing.assert_array_equal(_kernel_class_map(logits, 17, 17), 2)


def test_the_class_map_is_xlas_but_where_two_classes_tie_to_a_rounding():
  """XLA's resize sums the same two terms in its own order: every pixel whose two best
  classes are more than a rounding apart gets XLA's class."""
  rng = np.random.default_rng(3)
  logits = rng.standard_normal((2, 33, 33, 21)).astype(np.float32) * 5
  got = _kernel_class_map(logits, 513, 513)
  xla = np.asarray(jnp.argmax(resize_bilinear(jnp.asarray(logits), (513, 513)), -1))
  _, full = _numpy_class_map(logits.astype(np.float64), 513, 513)
  top2 = np.sort(full, -1)[..., -2:]
  clear = top2[..., 1] - top2[..., 0] > 1e-5 * np.abs(full).max()
  assert clear.mean() > 0.999
  np.testing.assert_array_equal(got[clear], xla[clear])


def test_the_kernel_refuses_what_it_cannot_compute():
  with pytest.raises(ValueError, match='1 to 256 classes'):
    float_kernel.upsampled_argmax(jnp.zeros((1, 3, 3, 257)), 9, 9)
  with pytest.raises(ValueError, match=r'\[n, fh, fw, classes\]'):
    float_kernel.upsampled_argmax(jnp.zeros((3, 3, 21)), 9, 9)
  # Its own checks, for callers of the FFI target: taps that leave the grid or go back.
  call = jax.ffi.ffi_call(int8_kernel._TARGETS['SegUpsampledArgmax'],
                          jax.ShapeDtypeStruct((1, 2, 3), jnp.uint8))
  rows = (np.zeros(2, np.int32), np.zeros(2, np.float32))
  for lo, message in [([0, 2, 1], 'ascending'), ([0, 1, 3], 'on the feature grid')]:
    with pytest.raises(Exception, match=message):
      call(jnp.zeros((1, 3, 3, 4)), *rows, np.array(lo, np.int32), np.zeros(3, np.float32))


def test_the_engine_takes_the_kernel_on_cpus_where_it_runs(monkeypatch):
  """'kernel' on this CPU unless SEG_UPSAMPLE_ARGMAX says otherwise; XLA's on accelerators
  and where the kernel cannot run, said when the kernel was asked for by name."""
  monkeypatch.delenv('SEG_UPSAMPLE_ARGMAX', raising=False)
  assert engine.upsample_argmax_for('cpu') == 'kernel'
  said = []
  assert engine.upsample_argmax_for('gpu', log=said.append) == 'xla' and not said
  assert engine.upsample_argmax_for('gpu', 'kernel', said.append) == 'xla'
  assert 'the engine runs on gpu' in said[-1]
  monkeypatch.setenv('SEG_UPSAMPLE_ARGMAX', 'xla')
  assert engine.upsample_argmax_for('cpu') == 'xla'
  monkeypatch.setenv('SEG_UPSAMPLE_ARGMAX', 'numpy')
  with pytest.raises(ValueError, match='SEG_UPSAMPLE_ARGMAX'):
    engine.upsample_argmax_for('cpu')
  monkeypatch.setenv('SEG_UPSAMPLE_ARGMAX', 'kernel')
  monkeypatch.setattr(float_kernel, 'available', lambda dtype=None, log=None: False)
  monkeypatch.setattr(float_kernel, 'unavailable_reason', lambda dtype=None: 'no AVX2')
  said.clear()
  assert engine.upsample_argmax_for('cpu', log=said.append) == 'xla' and 'no AVX2' in said[-1]
  monkeypatch.delenv('SEG_UPSAMPLE_ARGMAX')
  said.clear()
  assert engine.upsample_argmax_for('cpu', log=said.append) == 'xla' and not said


@pytest.fixture(scope='module')
def tiny_model():
  config = tiny_engine_config()
  _, variables = random_variables(config.model, seed=5)
  return config, variables


@pytest.mark.parametrize('dtype', ['float32', 'int8'])
def test_engine_class_maps_with_the_kernel_are_xlas(tiny_model, dtype):
  """Whole predictions (images of three sizes, padded to one canvas, cropped back) with the
  kernel's upsampling and argmax and with XLA's, from the same network."""
  from seg.inference.quantize import scale_names
  config, variables = tiny_model
  scales = dict.fromkeys(scale_names(config.model), 6 / 127) if dtype == 'int8' else None
  make = lambda choice: engine.Engine(config, variables, dtype=dtype, batch_size=3,
                                      int8_scales=scales, upsample_argmax=choice)
  kernel, xla = make('kernel'), make('xla')
  assert (kernel.upsample_argmax, xla.upsample_argmax) == ('kernel', 'xla')
  rng = np.random.default_rng(8)
  images = [rng.integers(0, 256, shape, np.uint8) for shape in
            [(EVAL_SIZE, EVAL_SIZE, 3), (EVAL_SIZE - 7, EVAL_SIZE - 30, 3), (40, 65, 3)]]
  got, expected = kernel.predict(images), xla.predict(images)
  assert [g.shape for g in got] == [image.shape[:2] for image in images]
  same = np.mean(np.concatenate([(g == e).ravel() for g, e in zip(got, expected)]))
  assert same >= 0.9999, same  # a random model's near ties may round either way


def test_an_export_carries_xlas_upsampling(tiny_model):
  config, variables = tiny_model
  eng = engine.Engine(config, variables, upsample_argmax='kernel', f32_formulation='xla')
  text = export.export_engine(eng, platforms=('cpu',), batch_size=1).mlir_module()
  assert 'seg_upsampled_argmax' not in text


def test_the_benchmark_names_the_class_maps_upsampling(monkeypatch):
  """`benchmark --measure predict` says whose upsampling and argmax it timed."""
  from experiments import tiny
  run = lambda measure: benchmark.benchmark(tiny.get_config(), height=65, width=65,
                                            measure=measure, warmup=1, iters=2,
                                            log=lambda *a: None)
  monkeypatch.delenv('SEG_UPSAMPLE_ARGMAX', raising=False)
  record = run('predict')
  assert record['upsample_argmax'] == 'kernel' and '/kernel-argmax' in record['variant']
  assert 'upsampling and argmax: kernel' in benchmark.format_record(record)
  assert record['output_shape'] == [1, 65, 65]
  monkeypatch.setenv('SEG_UPSAMPLE_ARGMAX', 'xla')
  assert run('predict')['upsample_argmax'] == 'xla'
  assert run('network')['upsample_argmax'] is None


@pytest.mark.parametrize('shape,size,span', [
    ((25, 33, 21), (600, 800), (24, 32)),   # a photo from a 385x513 canvas, corners aligned
    ((33, 25, 21), (500, 375), (32, 23.25)),  # part of the grid: an image smaller than its canvas
    ((3, 5, 7), (40, 1), (2, 0)),
])
def test_class_maps_by_blocks_are_the_per_pixel_class_maps(shape, size, span):
  """`class_map_blocks` at block=1 is `upsampled_argmax`'s arithmetic at every pixel (NumPy's,
  bit for bit); with blocks, only blocks whose corners agree take their class. Smooth logits
  (few class boundaries) as a network gives them, and rough ones (many)."""
  from seg.model.layers import align_corners_taps
  rng = np.random.default_rng(shape[0])
  taps = [align_corners_taps(n, cells, span=s) for n, cells, s in zip(size, shape, span)]
  for logits in (rng.standard_normal(shape).astype(np.float32),
                 np.cumsum(rng.standard_normal(shape), axis=0).astype(np.float32)):
    every = float_kernel.class_map_blocks(logits, *taps, block=1)
    lo, t = taps[0]
    t = t[:, None, None]
    rows = logits[lo] * (1 - t) + logits[np.minimum(lo + 1, shape[0] - 1)] * t
    lo, t = taps[1]
    t = t[None, :, None]
    full = rows[:, lo] * (1 - t) + rows[:, np.minimum(lo + 1, shape[1] - 1)] * t
    np.testing.assert_array_equal(every, full.argmax(-1))
    blocks = float_kernel.class_map_blocks(logits, *taps, block=8)
    assert blocks.shape == size and (blocks == every).mean() >= 0.999


def _samples(lo, block):
  """Every `block`-th position, the last, and both sides of every change of cell."""
  change = np.flatnonzero(np.diff(lo))
  return np.unique(np.concatenate([np.arange(0, len(lo), block), [len(lo) - 1], change,
                                   change + 1]))


@pytest.mark.parametrize('block', [3, 8, 16])
def test_class_maps_by_blocks_follow_the_block_rule_exactly(block):
  """Every pixel of `class_map_blocks` is the rule computed here from the per-pixel classes:
  a block between samples whose four corners agree takes their class, any other pixel its
  own. Rough logits (blocks at every size mixed, cells of many widths), smooth ones (long
  runs of one class); blocks wider than 8 columns (16) take the kernel's one-pixel path."""
  from seg.model.layers import align_corners_taps
  rng = np.random.default_rng(block)
  shape, size = (9, 13, 21), (301, 517)
  taps = [align_corners_taps(n, cells, span=cells - 1.5) for n, cells in zip(size, shape)]
  for logits in (rng.standard_normal(shape).astype(np.float32),
                 (np.cumsum(rng.standard_normal(shape), axis=1) +
                  np.eye(21)[rng.integers(0, 21, shape[:2])] * 8).astype(np.float32)):
    every = float_kernel.class_map_blocks(logits, *taps, block=1)
    ys, xs = _samples(taps[0][0], block), _samples(taps[1][0], block)
    grid = every[np.ix_(ys, xs)]
    below = np.minimum(np.arange(1, len(ys) + 1), len(ys) - 1)
    right = np.minimum(np.arange(1, len(xs) + 1), len(xs) - 1)
    same = (grid == grid[below]) & (grid == grid[:, right]) & (grid == grid[below][:, right])
    expected = every.copy()
    bounds = lambda samples, size: zip(samples, np.append(samples[1:], size))
    for i, (y0, y1) in enumerate(bounds(ys, size[0])):
      for j, (x0, x1) in enumerate(bounds(xs, size[1])):
        if same[i, j]:
          expected[y0:y1, x0:x1] = grid[i, j]
    got = float_kernel.class_map_blocks(logits, *taps, block=block)
    np.testing.assert_array_equal(got, expected)
    assert (~same).any() and same.any()


def test_class_maps_by_blocks_refuse_bad_taps():
  logits = np.zeros((4, 4, 3), np.float32)
  good = (np.zeros(5, np.int32), np.zeros(5, np.float32))
  for bad in [(np.array([0, 2, 1]), np.zeros(3)), (np.array([0, 4]), np.zeros(2)),
              (np.array([-1, 0]), np.zeros(2)), (np.zeros(2), np.zeros(3))]:
    with pytest.raises(ValueError, match='taps'):
      float_kernel.class_map_blocks(logits, good, bad, block=8)
  with pytest.raises(ValueError, match='1 to 256 classes'):
    float_kernel.class_map_blocks(np.zeros((4, 4, 300), np.float32), good, good, block=8)
