"""main.py end to end on the tiny config: train, eval, predict, summary."""

import csv
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import ROOT
from seg import checkpoint
from seg.classes import EMBEDDED_CLASS_NAMES, colorize
from seg.data import voc
from seg.inference.engine import Engine
from seg.model import create_model
from seg.predict import predict_paths
from seg.predict.options import Options


def _main(*args, check=True, env=None):
  result = subprocess.run([sys.executable, 'main.py', *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)
  if check and result.returncode != 0:
    raise AssertionError(f'main.py {" ".join(args)} failed:\n{result.stdout}\n{result.stderr}')
  return result


@pytest.fixture(scope='module')
def trained(tmp_path_factory, data_dir):
  """A workdir trained by `main.py train` on the tiny config, and its compilation cache."""
  root = tmp_path_factory.mktemp('cli')
  workdir, cache = str(root / 'run'), str(root / 'jax_cache')
  result = _main('train', '--config', 'experiments/tiny.py', '--workdir', workdir,
                 f'--config.data.data_dir={data_dir}', '--config.train.steps=6',
                 env=dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache))
  return workdir, result.stdout, cache


def test_train_prints_progress_and_writes_a_report(trained):
  workdir, stdout, cache = trained
  assert 'step      6/6' in stdout and 'img/s' in stdout and 'mIoU' in stdout
  # The start-up line and the input-bound share (tiny: batch 4 over 4 fake CPU devices).
  assert ('1 process(es) x 4 local device(s) = 4 global device(s) (cpu), global batch 4 = 1 '
          'per device') in stdout and 'input wait' in stdout
  records = [json.loads(line) for line in open(os.path.join(workdir, 'train_log.jsonl'))]
  assert all(0 <= r['input_wait_fraction'] <= 1 for r in records)
  report = json.load(open(os.path.join(workdir, 'eval.json')))
  assert report['num_images'] == 150
  assert set(report) >= {'miou', 'per_class_iou', 'pixel_accuracy', 'num_images'}
  # The only evaluation is the best so far: best/ holds its weights (train.keep_best).
  assert json.load(open(os.path.join(workdir, 'best', 'best.json'))) == {
      'step': 6, 'miou': report['miou']}
  assert 'best val mIoU so far' in stdout
  # JAX's own variable chooses the persistent compilation cache (default ~/.cache/seg/jax).
  assert any(name.startswith('jit_') for name in os.listdir(cache))


def _numpy_confusion(pairs):
  """The [256, 256] confusion matrix of (label, prediction) index arrays over every pixel whose
  label is not 255 (DeepLab's metric, written out here)."""
  cm = np.zeros((256, 256), np.int64)
  for label, prediction in pairs:
    valid = label != 255
    np.add.at(cm, (label[valid], prediction[valid]), 1)
  return cm


def _numpy_ious(pairs):
  """Per-class IoU (NaN where a class is in neither labels nor predictions) and pixel accuracy."""
  cm = _numpy_confusion(pairs)
  tp = np.diag(cm).astype(np.float64)
  union = cm.sum(0) + cm.sum(1) - tp
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(union > 0, tp / union, np.nan), tp.sum() / cm.sum()


def _numpy_miou(pairs):
  return float(np.nanmean(_numpy_ious(pairs)[0]))


@pytest.fixture(scope='module')
def discerning(trained, tmp_path_factory):
  """The trained tiny workdir with random logits weights (std 1): after 6 steps the tiny model
  predicts background on every pixel, whatever the pixels; this one predicts most classes,
  and its masks change when the pixels do."""
  import jax
  workdir = str(tmp_path_factory.mktemp('discerning') / 'run')
  config = checkpoint.load_config(trained[0])
  variables, step = checkpoint.load_model_variables(trained[0], create_model(config.model))
  variables = jax.device_get(variables)
  kernel = variables['params']['head']['logits']['kernel']
  variables['params']['head']['logits']['kernel'] = np.random.default_rng(0).normal(
      0, 1, kernel.shape).astype(np.float32)
  checkpoint.save_config(workdir, config)
  manager = checkpoint.create_manager(workdir)
  checkpoint.save_model_only(manager, step, variables)
  manager.wait_until_finished()
  return workdir


@pytest.fixture(scope='module')
def val_masks(discerning, data_dir, tmp_path_factory):
  """`predict` of the discerning model on the val JPEG files (Pillow): {name: (label, mask)}
  with labels read from the VOC palette PNGs, and the JPEG paths."""
  [voc_root] = glob.glob(os.path.join(data_dir, 'downloads', 'embedded-*', 'VOCdevkit', 'VOC2012'))
  names = voc.read_split_list(voc_root, 'val')
  jpegs = [os.path.join(voc_root, 'JPEGImages', name + '.jpg') for name in names]
  tmp = tmp_path_factory.mktemp('val_masks')
  listing = tmp / 'val.txt'
  listing.write_text('\n'.join(jpegs) + '\n')
  # --memory-budget bounds the whole process; this one is a test worker holding many models.
  assert predict_paths(discerning, str(listing), str(tmp / 'masks'),
                       options=Options(memory_budget=64 << 30), log=lambda *_: None) == 0
  pairs = {name: (voc.read_label_png(os.path.join(voc_root, 'SegmentationClass', name + '.png')),
                  np.asarray(Image.open(tmp / 'masks' / (name + '.png')))) for name in names}
  return pairs, jpegs


def test_eval_report_scores_what_numpy_computes_from_the_predicted_masks(discerning, val_masks,
                                                                        tmp_path):
  # An independent path to eval's figures: `predict` on the JPEG files (Pillow), its index
  # PNGs, labels from the VOC palette PNGs, the confusion matrix in NumPy. Eval decodes the
  # same JPEGs through the TFDS pipeline, batches, pads and counts on the device.
  pairs, jpegs = val_masks
  output = str(tmp_path / 'report.json')
  stdout = _main('eval', '--workdir', discerning, '--output', output, '--worst', '3').stdout
  report = json.load(open(output))
  masks = [mask for _, mask in pairs.values()]
  assert len(np.unique(np.concatenate([m.ravel() for m in masks]))) > 10
  ious, accuracy = _numpy_ious(pairs.values())
  assert report['num_images'] == len(pairs) == 150
  # To a few pixels: eval and predict run differently compiled programs (batch 16 on the 161
  # canvas, and predict's split batches), and this random-logits model has near-ties where
  # float32 rounding flips a pixel between two classes (seen: between two wrong ones, IoU
  # 0.0058403 against 0.0058406, Intel Xeon 2026-12-02; one pixel to or from the right class
  # of 2.4M, AMD EPYC Zen 5 2026-12-06). Allowed: 4 pixels.
  counted = sum(int((label != 255).sum()) for label, _ in pairs.values())
  assert abs(accuracy - report['pixel_accuracy']) * counted <= 4.5
  assert abs(float(np.nanmean(ious)) - report['miou']) <= 1e-6
  assert list(report['per_class_iou']) == list(EMBEDDED_CLASS_NAMES)
  for name, want in zip(EMBEDDED_CLASS_NAMES, ious):
    got = report['per_class_iou'][name]
    assert (got is None) if np.isnan(want) else abs(got - want) <= 1e-4, (name, got, want)
  assert 'red-solid' in stdout and 'pixel accuracy' in stdout
  for chart_name in ('report_per_class_iou.png', 'report_confusion_matrix.png'):
    with Image.open(tmp_path / chart_name) as chart:
      assert chart.format == 'PNG' and chart.width > 600
  # The confusion matrix itself (rows: labels), to the same few pixels.
  num_classes = len(EMBEDDED_CLASS_NAMES)
  expected_cm = _numpy_confusion(pairs.values())
  assert np.abs(np.array(report['confusion_matrix'])
                - expected_cm[:num_classes, :num_classes]).sum() <= 8
  assert expected_cm.sum() == np.sum(report['confusion_matrix'])

  # Every image's own scores (the CSV, worst first), against NumPy on that image's mask alone.
  with open(tmp_path / 'report_images.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  assert sorted(r['id'] for r in rows) == sorted(pairs)
  mious = [float(r['miou']) for r in rows]
  assert mious == sorted(mious)
  exact = 0
  for r in rows:
    label, mask = pairs[r['id']]
    ious, accuracy = _numpy_ious([(label, mask)])
    assert abs(float(r['miou']) - float(np.nanmean(ious))) <= 0.02, r['id']
    assert int(r['pixels']) == int((label != 255).sum())
    per_class = np.array([float(r[n]) if r[n] else np.nan for n in EMBEDDED_CLASS_NAMES])
    exact += (np.allclose(per_class, ious[:num_classes], atol=1e-4, equal_nan=True)
              and abs(float(r['miou']) - float(np.nanmean(ious))) < 1e-4
              and abs(float(r['pixel_accuracy']) - accuracy) < 1e-4)
  assert exact >= len(rows) - 4   # the near-tie pixels above touch at most 4 images
  assert [w['id'] for w in report['worst_images']] == [r['id'] for r in rows[:20]]
  assert 'lowest image mIoU: ' + rows[0]['id'] in stdout

  # --worst 3: the three lowest images as image | label | prediction, in the classes' colours.
  panels = sorted(os.listdir(tmp_path / 'report_worst'))
  assert panels == [f'{rank:02d}_{r["id"]}.png' for rank, r in enumerate(rows[:3], 1)]
  for name, r in zip(panels, rows):
    label, mask = pairs[r['id']]
    panel = np.asarray(Image.open(tmp_path / 'report_worst' / name))
    height, width = label.shape
    assert panel.shape == (height, 3 * width, 3)
    [jpeg] = [path for path in jpegs if os.path.basename(path) == r['id'] + '.jpg']
    np.testing.assert_array_equal(panel[:, :width], np.asarray(Image.open(jpeg).convert('RGB')))
    np.testing.assert_array_equal(panel[:, width:2 * width], colorize(label))
    assert np.sum(np.any(panel[:, 2 * width:] != colorize(mask), -1)) <= 4   # near ties


def test_the_mask_check_can_tell_the_jpeg_decoders_apart(discerning, val_masks):
  # The check above can fail: the same model on the pixels of TF's default JPEG decoder (fast
  # IDCT, what the data layer decoded with before) predicts other classes and scores otherwise.
  import tensorflow as tf
  pairs, jpegs = val_masks
  config = checkpoint.load_config(discerning)
  variables, _ = checkpoint.load_model_variables(discerning, create_model(config.model))
  fast = Engine(config, variables).predict(
      [tf.io.decode_jpeg(open(path, 'rb').read(), channels=3).numpy() for path in jpegs])
  accurate = _numpy_miou(pairs.values())
  assert sum(int(np.sum(f != mask)) for f, (_, mask) in zip(fast, pairs.values())) > 1000
  # The mIoU of these random-logits masks is small and its size depends on the CPU the tiny
  # model trained on (0.16% on an AMD EPYC Zen 3, 2026-12-02): the change is relative to it.
  # Both scores come from integer pixel counts, so equal decoders would give a zero change.
  assert abs(_numpy_miou(zip([label for label, _ in pairs.values()], fast)) - accurate) > \
      1e-3 * accurate


def test_predict_writes_palette_masks_and_reports_bad_files(trained, tmp_path):
  workdir = trained[0]
  inputs = tmp_path / 'in'
  (inputs / 'sub').mkdir(parents=True)
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (70, 90, 3), np.uint8)).save(inputs / 'a.jpg')
  Image.fromarray(rng.integers(0, 255, (200, 50, 4), np.uint8)).save(inputs / 'sub' / 'b.png')
  Image.fromarray(rng.integers(0, 255, (40, 41), np.uint8)).save(inputs / 'sub' / 'gray.png')
  (inputs / 'broken.jpg').write_bytes(b'not an image')
  out = tmp_path / 'out'
  result = _main('predict', '--workdir', workdir, '--input', str(inputs), '--output', str(out),
                 '--overlay', check=False)
  assert result.returncode == 1
  assert 'broken.jpg' in result.stdout and '3 image(s)' in result.stdout
  for stem, size in (('a', (90, 70)), ('sub/b', (50, 200)), ('sub/gray', (41, 40))):
    mask = Image.open(out / (stem + '.png'))
    assert mask.mode == 'P' and mask.size == size
    assert np.asarray(mask).max() < 21
    assert Image.open(out / (stem + '_overlay.jpg')).size == size
  assert sorted(os.listdir(inputs)) == ['a.jpg', 'broken.jpg', 'sub']   # inputs untouched


def test_predict_refuses_an_output_inside_the_input(trained, tmp_path):
  workdir = trained[0]
  (tmp_path / 'in').mkdir()
  with pytest.raises(ValueError, match='inside the input'):
    predict_paths(workdir, str(tmp_path / 'in'), str(tmp_path / 'in' / 'masks'))


def test_summary_prints_the_paper_model():
  stdout = _main('summary', '--config', 'experiments/base.py').stdout
  assert 'trainable parameters    2,113,557' in stdout
  assert '2.74B at 513x513' in stdout


def test_bad_command_is_a_usage_error():
  result = _main('fly', check=False)
  assert result.returncode != 0 and 'usage' in (result.stdout + result.stderr).lower()


def test_compilation_cache_is_per_user_unless_jax_variable_chooses(monkeypatch, tmp_path):
  from seg.cli import process
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
  monkeypatch.delenv('XDG_CACHE_HOME', raising=False)
  monkeypatch.setenv('HOME', str(tmp_path))
  assert process.compilation_cache_dir() == str(tmp_path / '.cache' / 'seg' / 'jax')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert process.compilation_cache_dir() == str(tmp_path / 'xdg' / 'seg' / 'jax')
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'mine'))
  assert process.compilation_cache_dir() == str(tmp_path / 'mine')


def test_export_says_a_multi_scale_model_is_exported_as_one_pass(tmp_path, capsys):
  from experiments import tiny
  from seg.cli import commands, parser
  config = tiny.get_config()
  checkpoint.save_config(str(tmp_path), config)
  commands._say_exports_run_one_pass(str(tmp_path), 'onnx')
  assert capsys.readouterr().out == ''
  config.eval.scales, config.eval.flip = (0.75, 1.0, 1.25), True
  checkpoint.save_config(str(tmp_path), config)
  commands._say_exports_run_one_pass(str(tmp_path), 'onnx')
  assert capsys.readouterr().out == (
      'note: the config evaluates (and predict runs) scales 0.75, 1, 1.25 with flips; the '
      'onnx export holds one pass at scale 1 (average the passes yourself for those masks; '
      '--format jax holds them)\n')
  commands._say_exports_run_one_pass(str(tmp_path / 'none'), 'onnx')   # the export names it
  assert capsys.readouterr().out == ''
  # --scales/--flip are refused where the format cannot hold them, before anything is read.
  for flags in (['--scales', '0.5,1'], ['--no-flip']):
    with pytest.raises(commands.CommandError, match='--scales and --flip are for --format '
                                                    'jax: the tflite export holds one pass'):
      commands.run(parser.parse(parser.build_parser(), [
          'export', '--workdir', str(tmp_path), '--format', 'tflite', '--output',
          str(tmp_path / 'm.tflite'), *flags]))


def test_the_jax_export_holds_the_passes_the_config_evaluates(discerning, val_masks, tmp_path):
  # A model evaluated with scales 0.5, 1.25 and flips: `export` (jax) writes the argmax of
  # their averaged softmax by default, as NumPy computes it (`numpy_multi_scale`) from the
  # Flax model's logits, on val images padded to the 161 canvas.
  import jax
  from jax import export as jax_export
  from helpers import numpy_multi_scale
  from seg.cli import commands
  from seg.inference.forward import scaled_size
  config = checkpoint.load_config(discerning)
  config.eval.scales, config.eval.flip = (0.5, 1.25), True
  output = str(tmp_path / 'model.jax')
  commands.export(workdir=discerning, output=output, config=config, platforms='cpu')
  with open(output, 'rb') as f:
    predict = jax_export.deserialize(bytearray(f.read()))
  model = create_model(config.model)
  variables, _ = checkpoint.load_model_variables(discerning, model)
  features = jax.jit(lambda x: model.apply(variables, x, train=False, upsample=False))
  size = config.data.eval_size
  images = [np.asarray(Image.open(path).convert('RGB')) for path in val_masks[1][:3]]
  canvas = np.zeros((len(images), size, size, 3), np.uint8)
  for i, image in enumerate(images):
    canvas[i, :image.shape[0], :image.shape[1]] = image
  masks = np.asarray(predict.call(canvas, np.array([i.shape[:2] for i in images], np.int32)))
  sides = [scaled_size(size, s, config.model.output_stride) for s in config.eval.scales]
  plain = [val_masks[0][os.path.basename(path)[:-4]][1] for path in val_masks[1][:3]]
  changed = 0
  for image, mask, one_pass in zip(images, masks, plain):
    want = numpy_multi_scale(features, image, size, sides)[:image.shape[0], :image.shape[1]]
    top = np.sort(want, -1)
    clear = top[..., -1] - top[..., -2] > 1e-4
    assert clear.mean() > 0.99
    mask = mask[:image.shape[0], :image.shape[1]]
    np.testing.assert_array_equal(mask[clear], want.argmax(-1)[clear])
    changed += (mask != one_pass).sum()
  assert changed > 0.01 * sum(image.size // 3 for image in images)  # predict's one pass differs
