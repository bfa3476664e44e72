"""VOC 2012 and SBD (train_aug) from small archives written in the real formats."""

import dataclasses
import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import jax
import numpy as np
import pytest
import scipy.io
import tensorflow_datasets as tfds
from PIL import Image

from helpers import ROOT
from seg import parallel
from seg.inference import evaluate
from seg.train import step as step_lib
from seg.classes import voc_colormap
from seg.data import pipeline, voc
from seg.model import create_model

VOC_TRAIN = [f'2007_{i:06d}' for i in range(1, 7)]
VOC_VAL = [f'2008_{i:06d}' for i in range(1, 5)]
SBD_ONLY = [f'2009_{i:06d}' for i in range(1, 6)]
SBD_TRAIN = VOC_TRAIN[:2] + VOC_VAL[:1] + SBD_ONLY[:3]
SBD_VAL = VOC_TRAIN[2:3] + VOC_VAL[1:2] + SBD_ONLY[3:]
NOT_IN_VOC_JPEGS = SBD_ONLY[-1]     # only SBD's img/ folder holds this image


def _label(rng, h, w, void_border):
  label = np.zeros((h, w), np.uint8)
  label[h // 4:3 * h // 4, w // 4:3 * w // 4] = rng.integers(1, 21)
  if void_border:
    label[h // 4 - 1, w // 4:3 * w // 4] = 255
  return label


def _write_sources(root):
  """VOCdevkit and SBD folders plus their archives; returns the labels written."""
  rng = np.random.default_rng(0)
  voc_root = os.path.join(root, 'VOCdevkit', 'VOC2012')
  sbd_root = os.path.join(root, 'benchmark_RELEASE', 'dataset')
  for d in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'):
    os.makedirs(os.path.join(voc_root, d))
  for d in ('img', 'cls'):
    os.makedirs(os.path.join(sbd_root, d))
  labels = {'voc': {}, 'sbd': {}}
  for name in VOC_TRAIN + VOC_VAL + SBD_ONLY:
    h, w = (int(v) for v in rng.integers(40, 100, 2))
    image = Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8))
    if name != NOT_IN_VOC_JPEGS:
      image.save(os.path.join(voc_root, 'JPEGImages', name + '.jpg'))
    if name in SBD_TRAIN + SBD_VAL:
      image.save(os.path.join(sbd_root, 'img', name + '.jpg'))
      seg = _label(rng, h, w, void_border=False)
      scipy.io.savemat(os.path.join(sbd_root, 'cls', name + '.mat'), {'GTcls': {
          'Segmentation': seg, 'Boundaries': np.zeros((21, 1)),
          'CategoriesPresent': np.unique(seg[seg > 0])}})
      labels['sbd'][name] = seg
    if name in VOC_TRAIN + VOC_VAL:
      seg = _label(rng, h, w, void_border=True)
      png = Image.fromarray(seg, mode='P')
      png.putpalette(voc_colormap().reshape(-1).tolist())
      png.save(os.path.join(voc_root, 'SegmentationClass', name + '.png'))
      labels['voc'][name] = seg
  lists = {'train': VOC_TRAIN, 'val': VOC_VAL, 'trainval': VOC_TRAIN + VOC_VAL}
  for split, names in lists.items():
    with open(os.path.join(voc_root, 'ImageSets', 'Segmentation', split + '.txt'), 'w') as f:
      f.write('\n'.join(names) + '\n')
  for split, names in (('train', SBD_TRAIN), ('val', SBD_VAL)):
    with open(os.path.join(sbd_root, split + '.txt'), 'w') as f:
      f.write('\n'.join(names) + '\n')
  archives = os.path.join(root, 'archives')
  os.makedirs(archives)
  with tarfile.open(os.path.join(archives, voc.SOURCES['voc'].file_name), 'w') as tar:
    tar.add(os.path.join(root, 'VOCdevkit'), 'VOCdevkit')
  with tarfile.open(os.path.join(archives, voc.SOURCES['sbd'].file_name), 'w:gz') as tar:
    tar.add(os.path.join(root, 'benchmark_RELEASE'), 'benchmark_RELEASE')
  return labels


def _checksums_of(archives):
  """The test archives stand in for the published ones: same names, their own checksums."""
  patched = {}
  for key, source in voc.SOURCES.items():
    path = os.path.join(archives, source.file_name)
    patched[key] = dataclasses.replace(source, size=os.path.getsize(path), md5=voc._md5(path),
                                       url='http://127.0.0.1:9/' + source.file_name)
  return patched


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('sources'))
  labels = _write_sources(root)
  archives = os.path.join(root, 'archives')
  with pytest.MonkeyPatch.context() as mp:
    for key, source in _checksums_of(archives).items():
      mp.setitem(voc.SOURCES, key, source)
    yield root, archives, labels


@pytest.fixture(scope='module')
def voc_data_dir(sources, tmp_path_factory):
  """voc2012 prepared from the archives."""
  _, archives, _ = sources
  data_dir = str(tmp_path_factory.mktemp('tfds_voc'))
  voc.prepare('voc2012', data_dir, archives)
  return data_dir


def _examples(builder, split):
  """{file name: example as NumPy} of a prepared split."""
  return {ex['file_name'].decode(): ex
          for ex in tfds.as_numpy(builder.as_dataset(split=split))}


def test_voc2012_from_archives(sources, voc_data_dir):
  _, _, labels = sources
  builder = voc.get_builder('voc2012', voc_data_dir)
  sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
  assert sizes == {'train': 6, 'val': 4, 'trainval': 10}
  for name, ex in _examples(builder, 'train').items():
    np.testing.assert_array_equal(ex['label'][..., 0], labels['voc'][name])
    assert 255 in ex['label']


def test_train_aug_from_extracted_folders(sources, tmp_path, monkeypatch, caplog, capsys):
  root, _, labels = sources
  manual = tmp_path / 'manual'
  shutil.copytree(os.path.join(root, 'VOCdevkit'), manual / 'VOCdevkit')
  shutil.copytree(os.path.join(root, 'benchmark_RELEASE'), manual / 'benchmark_RELEASE')
  temp = tmp_path / 'temp'
  temp.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(temp))
  builder = voc.prepare('train_aug', str(tmp_path / 'tfds'), str(manual))
  # Nothing left behind in the temporary folder (TFDS's metadata lookup left an empty one),
  # and no warning (TFDS's is_prepared() warned that the new dataset was not prepared yet).
  assert os.listdir(temp) == []
  assert [r.getMessage() for r in caplog.records if r.levelname == 'WARNING'] == []
  # What is prepared and where, then how long it took (TFDS's own line said "Unknown size"
  # four times and "downloaded").
  out, err = capsys.readouterr()
  assert f"preparing 'train_aug' in {builder.data_dir} (once" in out
  assert "wrote the TFRecords of 'train_aug' in" in out and 'Unknown size' not in out
  assert 'Generating splits' not in err  # TFDS's progress bars only on a terminal
  expected = sorted((set(VOC_TRAIN) | set(SBD_TRAIN) | set(SBD_VAL)) - set(VOC_VAL))
  assert builder.info.splits['train_aug'].num_examples == len(expected) == 11
  assert builder.info.splits['val'].num_examples == len(VOC_VAL)
  examples = _examples(builder, 'train_aug')
  assert sorted(examples) == expected
  for name, ex in examples.items():
    # VOC's label (with void borders) wins where both annotate; SBD's .mat elsewhere.
    source = 'voc' if name in labels['voc'] else 'sbd'
    np.testing.assert_array_equal(ex['label'][..., 0], labels[source][name])
  assert examples[NOT_IN_VOC_JPEGS]['image'].shape[:2] == labels['sbd'][NOT_IN_VOC_JPEGS].shape


def test_processes_preparing_at_once_wait_for_one_build(sources, tmp_path):
  """Two processes of a multi-host run on one machine share a data_dir: one builds, one reuses.

  (Without the lock, the second crashed renaming its half of the same files.)
  """
  root, _, _ = sources
  data_dir = str(tmp_path / 'tfds')
  lock_dir = os.path.dirname(voc.get_builder('voc2012', data_dir).data_dir)
  os.makedirs(lock_dir)
  code = ('import sys; from seg.data import voc; '
          'b = voc.prepare("voc2012", sys.argv[1], sys.argv[2]); '
          'splits = b.info.splits; '
          'print("examples", splits["train"].num_examples, splits["val"].num_examples)')
  repo = ROOT
  logs = [tmp_path / f'process{i}.log' for i in range(2)]
  with open(os.path.join(lock_dir, '.prepare.lock'), 'a') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # held here until both processes wait for it
    processes = [subprocess.Popen([sys.executable, '-c', code, data_dir, root], cwd=repo,
                                  stdout=open(log, 'w'), stderr=subprocess.STDOUT)
                 for log in logs]
    deadline = time.monotonic() + 120
    while not all('waiting for another process' in log.read_text() for log in logs):
      assert time.monotonic() < deadline and all(p.poll() is None for p in processes), \
          [log.read_text()[-2000:] for log in logs]
      time.sleep(0.2)
    fcntl.flock(lock, fcntl.LOCK_UN)
  for process, log in zip(processes, logs):
    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert 'examples 6 4' in log.read_text()
  assert [d for d in os.listdir(lock_dir) if d.startswith('incomplete')] == []


def test_truncated_archive_is_named_with_where_to_put_it(sources, tmp_path):
  _, archives, _ = sources
  manual = tmp_path / 'manual'
  manual.mkdir()
  name = voc.SOURCES['voc'].file_name
  data = open(os.path.join(archives, name), 'rb').read()
  (manual / name).write_bytes(data[:len(data) // 2])
  with pytest.raises(voc.SourceError, match=f'{name}.*truncated.*manual directory'):
    voc.prepare('voc2012', str(tmp_path / 'tfds'), str(manual))
  (manual / name).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))   # same size, other bytes
  with pytest.raises(voc.SourceError, match=f'{name} has MD5'):
    voc.prepare('voc2012', str(tmp_path / 'tfds2'), str(manual))


@pytest.mark.parametrize('where', ['connect', 'download'])
def test_missing_source_says_what_to_download(sources, tmp_path, monkeypatch, where):
  def offline(*args, **kwargs):
    raise ConnectionError('no route to host')   # what a firewalled cluster answers, at once
  for name in ('http_proxy', 'https_proxy', 'HTTP_PROXY', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY'):
    monkeypatch.delenv(name, raising=False)
  if where == 'connect':   # TFDS's retries (minutes offline) are never reached
    monkeypatch.setattr(voc.socket, 'create_connection', offline)
    monkeypatch.setattr(tfds.download.DownloadManager, 'download', pytest.fail)
  else:
    monkeypatch.setattr(voc, '_check_reachable', lambda url: None)
    monkeypatch.setattr(tfds.download.DownloadManager, 'download', offline)
  manual = tmp_path / 'manual'
  shutil.copytree(os.path.join(sources[0], 'VOCdevkit'), manual / 'VOCdevkit')
  with pytest.raises(voc.SourceError,
                     match=f'benchmark.tgz not found in the manual directory \\({manual}\\)'
                           '.*no route to.*benchmark_RELEASE/dataset'):
    voc.prepare('train_aug', str(tmp_path / 'tfds'), str(manual))


def test_training_step_and_evaluation_on_prepared_voc(voc_data_dir, tiny_config):
  config = tiny_config
  config.data.dataset, config.data.data_dir = 'voc2012', voc_data_dir
  model = create_model(config.model)
  lr = step_lib.create_learning_rate_fn(config.train)
  state = parallel.replicate(step_lib.create_train_state(jax.random.key(0), config, model, lr))
  batch = parallel.shard(next(pipeline.train_batches(config.data, 4, seed=0)))
  state, metrics = step_lib.make_p_train_step(config, lr)(
      state, batch, parallel.replicate(jax.random.key(0)))
  assert np.isfinite(float(metrics['loss'][0]))
  report = evaluate.evaluate(evaluate.make_p_eval_step(model, config),
                             {'params': state.params, 'batch_stats': state.batch_stats}, config)
  assert report['num_images'] == len(VOC_VAL)


def _voc_with_a_bad_label(sources, manual, name, kind):
  """The test VOC tree in `manual`, `name`'s label replaced by a bad one of `kind`; its values."""
  root, _, labels = sources
  shutil.copytree(os.path.join(root, 'VOCdevkit'), manual / 'VOCdevkit')
  path = manual / 'VOCdevkit' / 'VOC2012' / 'SegmentationClass' / (name + '.png')
  label = labels['voc'][name].copy()
  palette = voc_colormap().reshape(-1).tolist()
  if kind == 'palette index':    # a stray index in a real palette PNG
    label[:3, :3] = 30
    png, bad = Image.fromarray(label, mode='P'), [30]
    png.putpalette(palette)
  else:                          # the colours of the VOC palette saved as RGB or as grey
    png = Image.fromarray(voc_colormap()[label], mode='RGB')
    if kind == 'grey':
      png = png.convert('L')
    bad = sorted(set(np.unique(np.asarray(png)).tolist()) - set(range(21)) - {255})
  png.save(path)
  return str(path), bad


def _voc_with_a_bad_label_in_place(manual, name):
  """Index 40 in `name`'s palette PNG of the VOC tree in `manual`."""
  path = manual / 'VOCdevkit' / 'VOC2012' / 'SegmentationClass' / (name + '.png')
  with Image.open(path) as png:
    label, palette = np.array(png), png.getpalette()
  label[-2:, -2:] = 40
  png = Image.fromarray(label, mode='P')
  png.putpalette(palette)
  png.save(path)


@pytest.mark.parametrize('kind', ['palette index', 'grey', 'rgb'])
def test_prepare_refuses_bad_labels_naming_the_file_and_writes_nothing(sources, tmp_path, kind):
  from seg.cli import commands
  from seg.data import labels
  manual = tmp_path / 'manual'
  path, bad = _voc_with_a_bad_label(sources, manual, VOC_VAL[1], kind)
  data_dir = str(tmp_path / 'tfds')
  expected = (f'mode RGB' if kind == 'rgb' else
              'label values ' + ', '.join(map(str, bad)) + ' are neither classes 0..20')
  with pytest.raises(labels.LabelError) as error:
    voc.prepare('voc2012', data_dir, str(manual))
  assert path in str(error.value) and expected in str(error.value), str(error.value)
  with pytest.raises(commands.CommandError, match=expected):   # prepare-data: one line, exit 1
    commands.prepare_data(dataset='voc2012', data_dir=data_dir, manual_dir=str(manual))
  builder = voc.get_builder('voc2012', data_dir)
  assert not builder.is_prepared()
  dataset_dir = os.path.dirname(builder.data_dir)
  assert [d for d in os.listdir(dataset_dir) if not d.startswith('.')] == []


def _bad_values(label, num_classes):
  values = np.unique(label)
  return [int(v) for v in values if v >= num_classes and v != 255]


def test_pipeline_refuses_labels_outside_the_model_classes_naming_the_example(tiny_config):
  # The embedded dataset has 21 classes; a model of 5 is "a dataset with a wrong class count".
  from seg.data import labels
  config = tiny_config
  with pytest.raises(labels.LabelError) as error:
    next(pipeline.train_batches(config.data, 4, seed=0, num_classes=5))
  message = str(error.value)
  name = message.split('example ')[1].split(' of ')[0]
  examples = _examples(voc.get_builder('embedded', config.data.data_dir), 'train')
  expected = _bad_values(examples[name]['label'], 5)   # that file, read again with NumPy
  assert expected and ('label values ' + ', '.join(map(str, expected))) in message, message
  assert 'neither classes 0..4 nor the ignore label 255' in message


@pytest.mark.parametrize('cache', ['decoded', 'encoded'])
def test_pipeline_refuses_a_dataset_prepared_with_a_bad_label(sources, tmp_path, monkeypatch,
                                                            tiny_config, cache):
  # A dataset prepared elsewhere (here: with prepare's own check switched off).
  from seg.data import labels
  manual = tmp_path / 'manual'
  _voc_with_a_bad_label(sources, manual, VOC_TRAIN[2], 'palette index')
  _voc_with_a_bad_label_in_place(manual, VOC_VAL[0])
  data_dir = str(tmp_path / 'tfds')
  with monkeypatch.context() as patch:
    patch.setattr(labels, 'check', lambda label, *args, **kwargs: label)
    voc.prepare('voc2012', data_dir, str(manual))
  config = tiny_config
  config.data.dataset, config.data.data_dir, config.data.cache = 'voc2012', data_dir, cache
  with pytest.raises(labels.LabelError,
                     match=f'example {VOC_TRAIN[2]} of split .train. of .*label values 30 are'):
    batches = pipeline.train_batches(config.data, 2, seed=0)
    for _ in range(4):   # 6 examples: the bad one is met within the first pass
      next(batches)
  with pytest.raises(labels.LabelError, match=f'example {VOC_VAL[0]} of split .val.*values 40 '):
    list(pipeline.eval_batches(config.data, 2, 'val'))
