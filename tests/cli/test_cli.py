"""main.py end to end on the tiny config: train, eval, predict, summary."""

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
from seg.data import voc
from seg.inference.engine import Engine
from seg.inference.metrics import iou_report
from seg.model import create_model
from seg.predict import images, predict_paths



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
  # JAX's own variable chooses the persistent compilation cache (default ~/.cache/seg/jax).
  assert any(name.startswith('jit_') for name in os.listdir(cache))


def test_eval_writes_the_json_report(trained, tmp_path):
  workdir = trained[0]
  output = str(tmp_path / 'report.json')
  stdout = _main('eval', '--workdir', workdir, '--output', output).stdout
  report = json.load(open(output))
  assert report['num_images'] == 150 and len(report['per_class_iou']) == 21
  assert 'red-solid' in stdout and 'pixel accuracy' in stdout
  # The same checkpoint gives the same figures as the evaluation at the end of training.
  assert report['miou'] == json.load(open(os.path.join(workdir, 'eval.json')))['miou']
  with Image.open(tmp_path / 'report_per_class_iou.png') as chart:
    assert chart.format == 'PNG' and chart.width > 600


def test_predicted_masks_score_what_eval_scores(trained, data_dir):
  # An independent path to the same number: masks from the predictor, labels read from the
  # VOC PNGs, one NumPy confusion matrix over all pixels.
  workdir = trained[0]
  config = checkpoint.load_config(workdir)
  [voc_root] = glob.glob(os.path.join(data_dir, 'downloads', 'embedded-*', 'VOCdevkit', 'VOC2012'))
  model = create_model(config.model)
  variables, _ = checkpoint.load_model_variables(workdir, model)
  engine = Engine(config, variables)
  cm = np.zeros((21, 21), np.int64)
  names = voc.read_split_list(voc_root, 'val')
  for name in names:
    image = images.load_rgb(os.path.join(voc_root, 'JPEGImages', name + '.jpg'))
    label = voc.read_label_png(os.path.join(voc_root, 'SegmentationClass', name + '.png'))
    [mask] = engine.predict([image])
    assert mask.shape == label.shape
    valid = label != 255
    np.add.at(cm, (label[valid], mask[valid]), 1)
  ours = iou_report(cm, [str(i) for i in range(21)], len(names))
  report = json.load(open(os.path.join(workdir, 'eval.json')))
  assert np.isclose(ours['miou'], report['miou'], rtol=1e-6, atol=1e-6)
  assert np.isclose(ours['pixel_accuracy'], report['pixel_accuracy'], rtol=1e-6)


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
