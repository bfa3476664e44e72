"""Confusion matrix and the IoU figures derived from it, as DeepLab computes them.

mIoU is computed from ONE confusion matrix accumulated over every pixel of the
split (not averaged per image): IoU_c = TP_c / (TP_c + FP_c + FN_c), and the
mean runs over the classes that occur in the labels or the predictions.
"""

from typing import Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(labels: jax.Array, predictions: jax.Array, num_classes: int,
                     weights: jax.Array, ignore_label: int = 255) -> jax.Array:
  """[num_classes, num_classes] int32 counts; rows are labels, columns predictions.

  Args:
    labels, predictions: [batch, height, width] integer class ids.
    weights: [batch] 1 for real examples, 0 for padding examples.
  """
  valid = (labels != ignore_label) & (weights[:, None, None] > 0)
  index = jnp.where(valid, labels.astype(jnp.int32) * num_classes + predictions, 0)
  counts = jnp.bincount(index.reshape(-1), weights=valid.reshape(-1).astype(jnp.int32),
                        length=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def iou_report(confusion: np.ndarray, class_names: Sequence[str],
               num_images: int) -> Dict:
  """mIoU, per-class IoU (None for classes absent from labels and predictions), accuracy."""
  confusion = np.asarray(confusion, np.int64)
  true_positive = np.diag(confusion)
  union = confusion.sum(0) + confusion.sum(1) - true_positive
  present = union > 0
  iou = np.where(present, true_positive / np.maximum(union, 1), np.nan)
  total = confusion.sum()
  return {
      'miou': float(np.nanmean(iou)) if present.any() else 0.0,
      'per_class_iou': {name: (None if np.isnan(v) else float(v))
                        for name, v in zip(class_names, iou)},
      'pixel_accuracy': float(true_positive.sum() / total) if total else 0.0,
      'num_images': int(num_images),
  }


def format_report(report: Dict) -> str:
  """The report as a one-screen table."""
  lines = [f'{"class":<20} {"IoU":>7}', '-' * 28]
  for name, value in report['per_class_iou'].items():
    lines.append(f'{name:<20} {"absent" if value is None else f"{100 * value:6.2f}%":>7}')
  lines += ['-' * 28,
            f'{"mIoU":<20} {100 * report["miou"]:6.2f}%',
            f'{"pixel accuracy":<20} {100 * report["pixel_accuracy"]:6.2f}%',
            f'{"images":<20} {report["num_images"]:>7}']
  return '\n'.join(lines)
