"""Confusion matrix and mIoU against an independent NumPy computation."""

import jax.numpy as jnp
import numpy as np

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
