"""TensorBoard events, plots and skipped non-finite steps of a real (tiny) training run."""

import io
import json
import os

import numpy as np
from PIL import Image

from helpers import poisoned
from seg import classes
from seg.data import pipeline
from seg.train import loop, tensorboard


def _read_events(logdir):
  """{tag: [(step, value or image bytes)]} through TensorFlow's own event reader.

  TensorFlow only as the independent reader of the files (tests may import it).
  """
  import tensorflow as tf
  events = {}
  for name in os.listdir(logdir):
    for event in tf.compat.v1.train.summary_iterator(os.path.join(logdir, name)):
      for value in event.summary.value:
        data = (value.image.encoded_image_string if value.HasField('image')
                else value.simple_value)
        events.setdefault(value.tag, []).append((event.step, data))
  return events


def test_run_writes_tensorboard_summaries_and_plots_and_skips_nonfinite(
    tiny_config, tmp_path, monkeypatch):
  config = tiny_config
  config.train.steps, config.train.log_every, config.train.summary_images = 4, 2, 2
  config.train.eval_every = 3   # an evaluation at step 3, and the final one at step 4
  config.train.keep_best = False
  config.train.skip_nonfinite = True
  config.data.eval_split = 'val[:8]'  # the summaries of an evaluation, not its figure
  monkeypatch.setattr(pipeline, 'train_batches', poisoned(pipeline.train_batches, 3))
  workdir = str(tmp_path / 'run')
  report = loop.train_and_evaluate(config, workdir, log=lambda _: None)
  assert np.isfinite(report['miou'])

  with open(os.path.join(workdir, 'train_log.jsonl')) as f:
    log = [json.loads(line) for line in f]
  assert [r['step'] for r in log] == [2, 4]
  assert [r['nonfinite_steps'] for r in log] == [0, 1]   # step 3 skipped, counted
  assert all(np.isfinite(r['loss']) for r in log)   # steps 2 and 4 themselves were clean

  events = _read_events(os.path.join(workdir, tensorboard.SUBDIR))
  for tag in ('train/loss', 'train/learning_rate', 'train/images_per_second'):
    assert [s for s, _ in events[tag]] == [2, 4], tag
  np.testing.assert_allclose(events['train/learning_rate'][0][1], log[0]['learning_rate'],
                             rtol=1e-6)
  np.testing.assert_allclose(events['train/loss'][0][1], log[0]['loss'], rtol=1e-6)
  assert events['train/nonfinite_steps'][-1] == (4, 1.0)
  assert [s for s, _ in events['eval/miou']] == [3, 4]
  np.testing.assert_allclose(events['eval/miou'][-1][1], report['miou'], rtol=1e-6)
  for name, iou in report['per_class_iou'].items():
    if iou is not None:
      np.testing.assert_allclose(events[f'eval/iou/{name}'][-1][1], iou, rtol=1e-6)
  for i in range(2):
    step, png = events[f'eval/examples/{i}'][-1]
    image = np.asarray(Image.open(io.BytesIO(png)))
    assert step == 4 and image.shape == (161, 3 * 161, 3)

  # Each evaluation's figures, in eval_log.jsonl as in TensorBoard (the val curves' source).
  with open(os.path.join(workdir, 'eval_log.jsonl')) as f:
    evals = [json.loads(line) for line in f]
  assert [r['step'] for r in evals] == [3, 4]
  for record, (_, miou) in zip(evals, events['eval/miou']):
    np.testing.assert_allclose(record['miou'], miou, rtol=1e-6)
  assert evals[-1]['pixel_accuracy'] == report['pixel_accuracy']
  assert not os.path.exists(os.path.join(workdir, 'best'))   # keep_best off
  for name in ('train_curves.png', 'per_class_iou.png', 'confusion_matrix.png'):
    with Image.open(os.path.join(workdir, name)) as image:
      assert image.format == 'PNG' and min(image.size) >= 300
  # eval.json holds the confusion matrix and the worst images; eval_images.csv every image.
  saved = json.load(open(os.path.join(workdir, 'eval.json')))
  # (the psum over devices, and each image's counts: the same labelled pixels)
  assert np.sum(saved['confusion_matrix']) == sum(r['pixels'] for r in report['images']) > 0
  with open(os.path.join(workdir, 'eval_images.csv')) as f:
    assert len(f.read().splitlines()) == 1 + report['num_images']
  assert saved['worst_images'] == [{k: r[k] for k in ('id', 'miou', 'pixel_accuracy')}
                                   for r in report['images'][:20]]


def test_example_panels_put_image_truth_and_prediction_side_by_side():
  images = np.full((1, 2, 2, 3), 300.0)
  labels = np.array([[[0, 255], [1, 1]]])
  predictions = np.array([[[1, 1], [0, 2]]])
  panels = classes.example_panels(images, labels, predictions)
  assert panels.shape == (1, 2, 6, 3) and panels.dtype == np.uint8
  assert (panels[0, :, :2] == 255).all()                      # clipped image
  np.testing.assert_array_equal(panels[0, 0, 3], [255, 255, 255])  # void is white
  np.testing.assert_array_equal(panels[0, 1, 2], [128, 0, 0])      # VOC class 1 (aeroplane red)
  np.testing.assert_array_equal(panels[0, 1, 5], [0, 128, 0])      # class 2
  own = classes.example_panels(images, labels, predictions, class_colours='1,2,3;4,5,6;7,8,9')
  np.testing.assert_array_equal(own[0, 1, 2], [4, 5, 6])      # a folder's labelmap.txt colours
  np.testing.assert_array_equal(own[0, 1, 5], [7, 8, 9])
  np.testing.assert_array_equal(own[0, 0, 3], [255, 255, 255])
