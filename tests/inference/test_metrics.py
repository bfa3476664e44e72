"""Confusion matrix and mIoU against an independent NumPy computation."""

import csv

import jax.numpy as jnp
import numpy as np

from seg.inference import metrics
from seg.inference.metrics import confusion_matrix, iou_report


def _numpy_confusion(labels, predictions, num_classes, weights):
  cm = np.zeros((num_classes, num_classes), np.int64)
  for image, (lab, pred) in enumerate(zip(labels, predictions)):
    if not weights[image]:
      continue
    for t, p in zip(lab.ravel(), pred.ravel()):
      if t != 255:
        cm[t, p] += 1
  return cm


def test_confusion_matrix_ignores_void_and_padding_examples():
  rng = np.random.default_rng(0)
  num_classes = 6
  labels = rng.integers(0, num_classes, (5, 13, 11))
  labels[labels == 4] = 3                       # class 4 never occurs in the labels
  labels[rng.random(labels.shape) < 0.2] = 255  # void pixels
  predictions = rng.integers(0, num_classes - 1, (5, 13, 11))  # class 5 never predicted
  weights = np.array([1, 1, 0, 1, 0], np.float32)
  got = confusion_matrix(jnp.asarray(labels), jnp.asarray(predictions), num_classes,
                         jnp.asarray(weights))
  np.testing.assert_array_equal(np.asarray(got),
                                _numpy_confusion(labels, predictions, num_classes, weights))


def test_miou_from_one_confusion_matrix_over_all_pixels():
  # Two images whose per-image mIoUs average to something else than the dataset mIoU.
  labels = np.array([[0, 0, 1, 1], [0, 2, 2, 255]])
  predictions = np.array([[0, 1, 1, 1], [0, 2, 0, 1]])
  cm = _numpy_confusion(labels[:, None], predictions[:, None], 4, [1, 1])
  report = iou_report(cm, ['a', 'b', 'c', 'd'], 2)
  # By hand: class a: TP 2, FP 1, FN 1 -> 2/4; b: TP 2, FP 1 -> 2/3; c: TP 1, FN 1 -> 1/2.
  assert report['per_class_iou'] == {'a': 0.5, 'b': 2 / 3, 'c': 0.5, 'd': None}
  assert np.isclose(report['miou'], (0.5 + 2 / 3 + 0.5) / 3)
  assert np.isclose(report['pixel_accuracy'], 5 / 7)
  assert report['num_images'] == 2


def test_class_only_predicted_counts_with_zero_iou():
  cm = np.array([[5, 1], [0, 0]])   # class 1 predicted once, never labelled
  report = iou_report(cm, ['bg', 'x'], 1)
  assert report['per_class_iou']['x'] == 0.0
  assert np.isclose(report['miou'], (5 / 6 + 0) / 2)


def _one_image_iou(label, prediction, ignore=255):
  """An image's IoU per class written out with sets of pixel positions (no confusion matrix):
  {class: IoU} over the classes in its labels or predictions, ignored pixels left out."""
  keep = label != ignore
  out = {}
  for c in set(label[keep].tolist()) | set(prediction[keep].tolist()):
    a = set(zip(*np.nonzero(keep & (label == c))))
    b = set(zip(*np.nonzero(keep & (prediction == c))))
    out[c] = len(a & b) / len(a | b)
  return out


def test_per_image_counts_and_scores_against_pixel_sets():
  rng = np.random.default_rng(1)
  num_classes = 5
  labels = rng.integers(0, num_classes, (4, 9, 7))
  labels[0, :, :4] = 255
  labels[2] = 255                                  # an image with nothing labelled
  predictions = np.where(rng.random(labels.shape) < 0.6, labels % 255,
                         rng.integers(0, num_classes, labels.shape))
  predictions[1] = 4                               # class 4 predicted everywhere, never right
  labels[1][labels[1] == 4] = 0
  weights = np.array([1, 1, 1, 0], np.float32)     # the last is padding
  matrices = metrics.confusion_matrices(jnp.asarray(labels), jnp.asarray(predictions),
                                        num_classes, jnp.asarray(weights))
  for i in range(4):
    np.testing.assert_array_equal(
        np.asarray(matrices[i]),
        _numpy_confusion(labels[i:i + 1], predictions[i:i + 1], num_classes, [weights[i]]))
  np.testing.assert_array_equal(  # the batch's matrix is the sum of its examples'
      np.asarray(confusion_matrix(jnp.asarray(labels), jnp.asarray(predictions), num_classes,
                                  jnp.asarray(weights))), np.asarray(matrices).sum(0))

  rows = metrics.image_rows(['a', 'b', 'c', 'd'], np.asarray(metrics.class_counts(matrices)),
                            [f'k{c}' for c in range(num_classes)])
  by_id = {r['id']: r for r in rows}
  for i, name in enumerate('ab'):
    expected = _one_image_iou(labels[i], predictions[i])
    assert by_id[name]['iou'].keys() == {f'k{c}' for c in expected}
    for c, value in expected.items():
      assert np.isclose(by_id[name]['iou'][f'k{c}'], value)
    assert np.isclose(by_id[name]['miou'], np.mean(list(expected.values())))
    keep = labels[i] != 255
    assert by_id[name]['pixels'] == keep.sum()
    assert np.isclose(by_id[name]['pixel_accuracy'],
                      (labels[i][keep] == predictions[i][keep]).mean())
  assert by_id['b']['iou']['k4'] == 0.0            # predicted, never labelled: IoU 0
  for name in 'cd':                                # nothing labelled / padding: no scores
    assert by_id[name] == {'id': name, 'miou': None, 'pixel_accuracy': None, 'pixels': 0,
                           'iou': {}}
  # Worst first, the unscored last.
  assert [r['id'] for r in rows][:2] == sorted('ab', key=lambda n: by_id[n]['miou'])
  assert [r['id'] for r in rows][2:] == ['c', 'd']


def test_report_table_names_each_class_s_commonest_mistake_and_the_worst_images(tmp_path):
  # Rows are labels: 'cat' pixels went 6 to cat, 3 to dog, 1 to bg; 'dog' never mistaken.
  cm = np.array([[10, 0, 2], [1, 6, 3], [0, 0, 5]])
  report = iou_report(cm, ['bg', 'cat', 'dog'], 2)
  assert report['confusion_matrix'] == cm.tolist()
  assert metrics.most_mistaken_for(cm, ['bg', 'cat', 'dog']) == ['dog 16.7%', 'dog 30.0%', '']
  # Small shares keep a digit that says they are not zero.
  assert metrics.most_mistaken_for([[9996, 4], [0, 1]], ['a', 'b'])[0] == 'b 0.04%'
  assert metrics.most_mistaken_for([[99999, 1], [0, 1]], ['a', 'b'])[0] == 'b <0.01%'
  report['images'] = [{'id': 'x1', 'miou': 0.25, 'pixel_accuracy': 0.5, 'pixels': 8,
                       'iou': {'bg': 0.25}},
                      {'id': 'x2', 'miou': 0.75, 'pixel_accuracy': 0.9, 'pixels': 19,
                       'iou': {'cat': 0.5, 'dog': 1.0}}]
  lines = metrics.format_report(report).splitlines()
  assert lines[0].split() == ['class', 'IoU', 'most', 'often', 'taken', 'for']
  assert lines[3].split() == ['cat', '60.00%', 'dog', '30.0%']     # 6 / (10 + 6 - 6)
  assert lines[4].split() == ['dog', '50.00%']                     # 5 / (5 + 10 - 5)
  assert lines[-1] == 'lowest image mIoU: x1 25.0%, x2 75.0%'

  path = tmp_path / 'images.csv'
  metrics.write_image_csv(report['images'], ['bg', 'cat', 'dog'], str(path))
  with open(path, newline='') as f:
    table = list(csv.reader(f))
  assert table == [['id', 'miou', 'pixel_accuracy', 'pixels', 'bg', 'cat', 'dog'],
                   ['x1', '0.2500', '0.5000', '8', '0.2500', '', ''],
                   ['x2', '0.7500', '0.9000', '19', '', '0.5000', '1.0000']]
