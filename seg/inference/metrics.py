"""Confusion matrix and the IoU figures derived from it, as DeepLab computes them.

mIoU is computed from ONE confusion matrix accumulated over every pixel of the
split (not averaged per image): IoU_c = TP_c / (TP_c + FP_c + FN_c), and the
mean runs over the classes that occur in the labels or the predictions.
"""

import csv
from typing import Dict, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrices(labels: jax.Array, predictions: jax.Array, num_classes: int,
                       weights: jax.Array, ignore_label: int = 255) -> jax.Array:
  """[batch, num_classes, num_classes] int32: each example's counts; rows are labels,
  columns predictions. Padding examples (weight 0) and ignored pixels count nowhere.

  Args:
    labels, predictions: [batch, height, width] integer class ids.
    weights: [batch] 1 for real examples, 0 for padding examples.
  """
  batch, cells = labels.shape[0], num_classes * num_classes
  valid = (labels != ignore_label) & (weights[:, None, None] > 0)
  index = jnp.where(valid, labels.astype(jnp.int32) * num_classes + predictions, 0)
  index = index + (jnp.arange(batch, dtype=jnp.int32) * cells)[:, None, None]
  counts = jnp.bincount(index.reshape(-1), weights=valid.reshape(-1).astype(jnp.int32),
                        length=batch * cells)
  return counts.reshape(batch, num_classes, num_classes).astype(jnp.int32)


def confusion_matrix(labels: jax.Array, predictions: jax.Array, num_classes: int,
                     weights: jax.Array, ignore_label: int = 255) -> jax.Array:
  """[num_classes, num_classes] int32 counts of the whole batch (`confusion_matrices`')."""
  return confusion_matrices(labels, predictions, num_classes, weights, ignore_label).sum(0)


def class_counts(matrices: jax.Array) -> jax.Array:
  """[batch, 3, num_classes] from `confusion_matrices`: per class, each example's labelled,
  predicted and correctly predicted pixels (all an image's IoUs need, without the matrix)."""
  return jnp.stack([matrices.sum(2), matrices.sum(1),
                    jnp.diagonal(matrices, axis1=1, axis2=2)], axis=1)


def image_scores(counts: np.ndarray) -> Dict[str, np.ndarray]:
  """Each image's figures from its `class_counts` [n, 3, num_classes].

  'iou' [n, num_classes]: NaN for a class in neither the image's labels nor its
  predictions; 'miou' [n]: the mean over the others (NaN for an image without labelled
  pixels); 'pixel_accuracy' [n] (NaN likewise); 'pixels' [n]: labelled pixels.
  """
  counts = np.asarray(counts, np.int64)
  labelled, predicted, correct = counts[:, 0], counts[:, 1], counts[:, 2]
  union = labelled + predicted - correct
  with np.errstate(invalid='ignore', divide='ignore'):
    iou = np.where(union > 0, correct / np.maximum(union, 1), np.nan)
    pixels = labelled.sum(1)
    accuracy = np.where(pixels > 0, correct.sum(1) / np.maximum(pixels, 1), np.nan)
  present = union > 0
  miou = np.where(present, iou, 0).sum(1) / np.maximum(present.sum(1), 1)
  return {'iou': iou, 'miou': np.where(pixels > 0, miou, np.nan),
          'pixel_accuracy': accuracy, 'pixels': pixels}


def image_rows(ids: Sequence[str], counts: np.ndarray, class_names: Sequence[str]) -> List[Dict]:
  """One dict per image ({'id', 'miou', 'pixel_accuracy', 'pixels', 'iou': {class: IoU}},
  None where undefined, classes in neither labels nor predictions left out), worst mIoU
  first; images without labelled pixels last; ties by id."""
  scores = image_scores(counts)
  number = lambda v: None if np.isnan(v) else float(v)
  rows = [{'id': str(name), 'miou': number(scores['miou'][i]),
           'pixel_accuracy': number(scores['pixel_accuracy'][i]),
           'pixels': int(scores['pixels'][i]),
           'iou': {c: float(v) for c, v in zip(class_names, scores['iou'][i])
                   if not np.isnan(v)}}
          for i, name in enumerate(ids)]
  return sorted(rows, key=lambda r: (r['miou'] is None, r['miou'] or 0.0, r['id']))


def iou_report(confusion: np.ndarray, class_names: Sequence[str],
               num_images: int) -> Dict:
  """mIoU, per-class IoU (None for classes absent from labels and predictions), accuracy, and
  the confusion matrix itself (rows: labels, columns: predictions; pixel counts)."""
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
      'confusion_matrix': confusion.tolist(),
  }


def write_image_csv(rows: Sequence[Dict], class_names: Sequence[str], path: str) -> None:
  """`image_rows` as CSV: id, miou, pixel_accuracy, pixels, then one IoU column per class
  (fractions, as the JSON report; empty where undefined)."""
  cell = lambda v: '' if v is None else f'{v:.4f}'
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(['id', 'miou', 'pixel_accuracy', 'pixels', *class_names])
    for r in rows:
      writer.writerow([r['id'], cell(r['miou']), cell(r['pixel_accuracy']), r['pixels'],
                       *(cell(r['iou'].get(c)) for c in class_names)])


def most_mistaken_for(confusion: np.ndarray, class_names: Sequence[str]) -> List[str]:
  """Per class, the other class its labelled pixels are most often predicted as, with that
  share of them ('person 12.3%'); '' for a class without labels or without mistakes."""
  confusion = np.asarray(confusion, np.int64)
  off = confusion - np.diag(np.diag(confusion))
  out = []
  for c, row in enumerate(off):
    j = int(np.argmax(row))
    share = 100 * row[j] / max(confusion[c].sum(), 1)
    out.append('' if not row[j] else f'{class_names[j]} ' + (
        f'{share:.1f}%' if share >= 0.1 else f'{share:.2f}%' if share >= 0.01 else '<0.01%'))
  return out


WORST_SHOWN = 5


def format_report(report: Dict) -> str:
  """The report as a one-screen table: per-class IoU with each class's commonest mistake
  (when the report has its confusion matrix), the totals, then the lowest-scoring images
  (when it has them: `seg.inference.evaluate.evaluate`'s)."""
  names = list(report['per_class_iou'])
  mistakes = (most_mistaken_for(report['confusion_matrix'], names)
              if 'confusion_matrix' in report else [''] * len(names))
  width = max([20] + [len(n) for n in names])
  header = f'{"class":<{width}} {"IoU":>7}' + ('  most often taken for' if any(mistakes) else '')
  lines = [header, '-' * max(width + 8, len(header))]
  for (name, value), mistake in zip(report['per_class_iou'].items(), mistakes):
    iou = "absent" if value is None else f"{100 * value:6.2f}%"
    lines.append(f'{name:<{width}} {iou:>7}' + (f'  {mistake}' if mistake else ''))
  lines += ['-' * max(width + 8, len(header)),
            f'{"mIoU":<{width}} {100 * report["miou"]:6.2f}%',
            f'{"pixel accuracy":<{width}} {100 * report["pixel_accuracy"]:6.2f}%',
            f'{"images":<{width}} {report["num_images"]:>7}']
  scored = [r for r in report.get('images', ()) if r['miou'] is not None]
  if scored:
    lines.append('lowest image mIoU: ' + ', '.join(
        f'{r["id"]} {100 * r["miou"]:.1f}%' for r in scored[:WORST_SHOWN]))
  return '\n'.join(lines)
