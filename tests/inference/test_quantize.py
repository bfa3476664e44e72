"""The int8 engine: against the float32 engine, a NumPy int8 reference, its stored calibration
and the CPU-feature choice of its formulation."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import EVAL_SIZE
from seg.inference import cpu_features, engine, export, quantize
from seg.model import block_specs


def test_int8_engine_predicts_the_float32_classes(tiny_int8):
  config, variables, _, scales = tiny_int8
  images = np.random.default_rng(5).integers(0, 256, (2, EVAL_SIZE, EVAL_SIZE, 3), np.uint8)
  expected = engine.Engine(config, variables, batch_size=2).logits(images)
  eng = engine.Engine(config, variables, dtype='int8', batch_size=2, int8_scales=scales,
                      int8_formulation='int8')
  got = eng.logits(images)
  rms = lambda x: np.sqrt(np.mean(np.square(x)))
  # 8-bit inputs and weights (relative step ~1/127 of each tensor's range) over ~35
  # products of a random (untrained) network: errors of ~15% of the logits' scale at most.
  assert rms(got - expected) <= 0.2 * rms(expected)
  assert rms(got - expected) > 1e-4 * rms(expected)  # it really computed in int8
  assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.8
  assert eng.folded['blocks'][1]['expand']['w'].dtype == jnp.int8


def test_both_formulations_compute_the_same_numbers(tiny_int8):
  """int8 x int8 -> int32 and the same integers in float32: bit for bit (on this CPU)."""
  config, variables, _, scales = tiny_int8
  images = np.random.default_rng(6).integers(0, 256, (1, EVAL_SIZE, EVAL_SIZE, 3), np.uint8)
  logits = {f: engine.Engine(config, variables, dtype='int8', int8_scales=scales,
                             int8_formulation=f).logits(images)
            for f in ('int8', 'float32')}
  np.testing.assert_array_equal(logits['int8'], logits['float32'])


def _numpy_block(x, params, w_float, scales, index, stride, dilation):
  """One inverted-residual block in NumPy: quantise, integer product, requantise."""
  def quantized_product(x, w, b, name):
    x_scale = scales[name]
    w_scale = np.abs(w).max(axis=0) / 127
    wq = np.clip(np.round(w / w_scale), -127, 127).astype(np.int32)
    xq = np.clip(np.round(x / np.float32(x_scale)), -127, 127).astype(np.int32)
    acc = xq @ wq  # exact integer accumulation
    return acc.astype(np.float64) * (x_scale * w_scale) + b

  y = x
  if 'expand' in w_float:
    y = np.clip(quantized_product(y, w_float['expand']['w'], w_float['expand']['b'],
                                  f'block{index}/expand'), 0, 6)
  w, b = w_float['depthwise']['w'], w_float['depthwise']['b']
  n, h, wd, c = y.shape
  pad = lambda size: max((-(-size // stride) - 1) * stride + 2 * dilation + 1 - size, 0)
  ph, pw = pad(h), pad(wd)
  yp = np.pad(y, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
  oh, ow = -(-h // stride), -(-wd // stride)
  out = np.zeros((n, oh, ow, c))
  for i in range(3):
    for j in range(3):
      out += yp[:, i * dilation:i * dilation + (oh - 1) * stride + 1:stride,
                j * dilation:j * dilation + (ow - 1) * stride + 1:stride] * w[i, j]
  y = np.clip(out + b, 0, 6)
  y = quantized_product(y, w_float['project']['w'], w_float['project']['b'],
                        f'block{index}/project')
  return y + x if stride == 1 and x.shape[-1] == y.shape[-1] else y


@pytest.mark.parametrize('index', [2, 3])  # a residual block and a strided one (tiny config)
def test_one_block_matches_a_numpy_int8_reference(tiny_int8, index):
  config, _, folded, scales = tiny_int8
  _, _, stride, dilation = block_specs(config.model.width, config.model.output_stride)[index]
  params = quantize.quantize_folded(config.model, folded, scales)['blocks'][index]
  w_float = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64),
                                   folded['blocks'][index])
  channels = params['expand']['w'].shape[0]
  x = np.random.default_rng(7).normal(0, 1, (1, 9, 11, channels)).astype(np.float32)
  got = np.asarray(jax.jit(lambda p, x: quantize.block(x, p, index, stride, dilation))(
      params, x))
  expected = _numpy_block(x.astype(np.float64), params, w_float, scales, index, stride,
                          dilation)
  assert got.shape == expected.shape
  # float32 vs float64 arithmetic between the products may move a value across a rounding
  # boundary of the next product's input: a one-step (1/127 of the range) difference in a
  # few elements, not more.
  step = scales[f'block{index}/project'] * np.abs(w_float['project']['w']).sum(0).max()
  close = np.abs(got - expected) <= 1e-4 * np.abs(expected).max()
  assert close.mean() >= 0.95
  assert np.abs(got - expected).max() <= step


def test_calibration_is_stored_and_reused(tmp_path, tiny_int8):
  config, variables, folded, _ = tiny_int8
  calls = []

  def images_fn(source, config, count, seed):
    calls.append((source, count))
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (EVAL_SIZE - 5, EVAL_SIZE, 3), np.uint8) for _ in range(2)]

  run = lambda f, **kw: quantize.load_or_calibrate(str(tmp_path), config, f, 'train', count=2,
                                                    log=lambda *_: None, images_fn=images_fn,
                                                    **kw)
  first = run(folded)
  stored = json.loads((tmp_path / quantize.SCALES_FILE).read_text())
  assert stored['calibration'] == {'source': 'train', 'count': 2, 'seed': 0, 'images': 2}
  assert set(stored['scales']) == set(quantize.scale_names(config.model))
  assert run(folded) == first and len(calls) == 1  # read back, not recalibrated
  changed = jax.tree_util.tree_map(lambda a: a * 1.5, folded)  # other weights
  assert run(changed) != first and len(calls) == 2
  run(changed, seed=1)  # another calibration set
  assert len(calls) == 3


def test_a_calibration_set_once_chosen_stays_the_workdirs(tmp_path, tiny_int8, monkeypatch):
  """`predict --calibration photos/` once: later commands without the flag reuse those
  scales, and recalibrate on the same photos when the weights change."""
  config, _, folded, _ = tiny_int8
  calls = []

  def images_fn(source, config, count, seed):
    calls.append((source, count))
    rng = np.random.default_rng(len(calls))
    return [rng.integers(0, 256, (EVAL_SIZE, EVAL_SIZE, 3), np.uint8) for _ in range(2)]

  run = lambda f, **kw: quantize.load_or_calibrate(str(tmp_path), config, f, log=said.append,
                                                    images_fn=images_fn, **kw)
  said = []
  first = run(folded, source='photos/', count=2)
  assert run(folded) == first and calls == [('photos/', 2)]  # the flag not given: reused
  run(jax.tree_util.tree_map(lambda a: a * 1.5, folded))  # new weights: the same photos
  assert calls[-1] == ('photos/', 2)
  run(folded, source='train')  # another set asked for: recalibrated, 200 by default
  assert calls[-1] == ('train', 200)
  (tmp_path / 'mine').mkdir()  # a folder is stored by its absolute path: found from anywhere
  monkeypatch.chdir(tmp_path)
  run(folded, source='mine')
  assert calls[-1] == (str(tmp_path / 'mine'), 200)
  assert run(folded, source=str(tmp_path / 'mine')) and len(calls) == 4  # the same set
  run(folded, source='train')
  # A model folder that cannot be written: the scales serve the run, and it says so.
  (tmp_path / f'{quantize.SCALES_FILE}.{os.getpid()}.tmp').mkdir()
  said.clear()
  assert set(run(folded, source='elsewhere/')) == set(quantize.scale_names(config.model))
  assert any('could not store the int8 scales' in m for m in said)
  assert json.loads((tmp_path / quantize.SCALES_FILE).read_text())['calibration'][
      'source'] == 'train'  # the stored file untouched


def test_without_the_training_split_int8_names_calibration(tmp_path, tiny_int8, monkeypatch):
  """An imported model's config names VOC, which is not here: int8 says how to go on."""
  from seg.inference import calibration, engine
  config, variables, _, _ = tiny_int8

  def no_archives(source, *args):
    raise FileNotFoundError(f'VOCtrainval_11-May-2012.tar not found ({source})')
  monkeypatch.setattr(calibration, 'calibration_images', no_archives)
  with pytest.raises(FileNotFoundError, match='give --calibration a folder') as error:
    engine.int8_scales_for(str(tmp_path), config, variables, log=lambda *_: None)
  assert 'VOCtrainval_11-May-2012.tar not found' in str(error.value)
  with pytest.raises(FileNotFoundError) as error:  # a source the user gave: its own error
    engine.int8_scales_for(str(tmp_path), config, variables, log=lambda *_: None,
                           calibration='photos/')
  assert '--calibration' not in str(error.value)


@pytest.mark.parametrize('flags, xla_flags, formulation', [
    ('flags\t\t: fpu sse2 avx avx2 fma amx_bf16 amx_tile amx_int8 avx512_vnni',
     ('--xla_cpu_use_onednn=true',), 'kernel'),    # the kernel in AMX tiles
    ('fpu avx2 fma amx_bf16 amx_tile avx512_vnni', ('--xla_cpu_use_onednn=true',), 'int8'),
    ('processor : 0\nflags : fpu avx2 fma avx512f avx512bw avx512vl avx512_vnni\n', (),
     'kernel'),                                     # AMD EPYC Zen 4: the kernel's VNNI loop
    ('processor : 0\nflags : fpu avx2 avx512f avx512_vnni\n', (), 'int8'),  # no FMA
    ('fpu sse2 avx avx2 fma', (), 'kernel'),        # this project's AVX2-only AMD EPYC
    ('fpu avx2 fma avx_vnni', (), 'kernel'),        # Intel's client cores: the AVX-VNNI loop
    ('fpu sse2 avx avx2', (), 'int8'),
    ('fpu sse2 sse4_2 avx', (), 'float32'),
    ('', (), 'float32')])
def test_cpu_features_choose_flags_and_formulation(flags, xla_flags, formulation):
  choice = cpu_features.choose(flags, machine='x86_64')
  assert choice.xla_flags == xla_flags and choice.int8_formulation == formulation
  if 'avx_vnni' in flags:
    assert 'AVX-VNNI loop' in choice.reason
  assert cpu_features.choose('Features : fp asimd asimddp', machine='aarch64'
                             ).int8_formulation == 'int8'


def test_an_int8_export_predicts_as_the_engine(tiny_int8):
  config, variables, _, scales = tiny_int8
  eng = engine.Engine(config, variables, dtype='int8', int8_scales=scales,
                      int8_formulation='int8')
  exported = export.export_engine(eng, platforms=('cpu',), batch_size=1)
  image = np.random.default_rng(8).integers(0, 256, (1, EVAL_SIZE, EVAL_SIZE, 3), np.uint8)
  sizes = np.array([[EVAL_SIZE, EVAL_SIZE]], np.int32)
  np.testing.assert_array_equal(np.asarray(exported.call(image, sizes)), eng.predict(image))
  assert 'i8' in exported.mlir_module()


def test_the_cli_adds_the_chosen_xla_flags_once(monkeypatch):
  from seg.cli import process
  amx = cpu_features.Choice(('--xla_cpu_use_onednn=true',), 'int8', 'AMX')
  monkeypatch.setattr(cpu_features, 'choose', lambda *a, **k: amx)
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  process.use_cpu_feature_flags()
  process.use_cpu_feature_flags()
  assert process.os.environ['XLA_FLAGS'] == ('--xla_force_host_platform_device_count=2 '
                                             '--xla_cpu_use_onednn=true')
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_use_onednn=false')  # the user's word stands
  process.use_cpu_feature_flags()
  assert process.os.environ['XLA_FLAGS'] == '--xla_cpu_use_onednn=false'
