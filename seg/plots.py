"""PNG plots beside a run's JSON: training curves, per-class IoU, the confusion matrix
(matplotlib, Agg)."""

import json
import os
from typing import Dict, List

import matplotlib
import numpy as np

matplotlib.use('Agg')  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


def read_train_log(path: str) -> List[Dict]:
  """The records of WORKDIR/train_log.jsonl (or eval_log.jsonl), one per step, in step order."""
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  # A run killed after logging past its last checkpoint logs those steps again: keep the last.
  return sorted({r['step']: r for r in records}.values(), key=lambda r: r['step'])


def plot_training_curves(train_log_path: str, path: str, eval_log_path: str = '') -> None:
  """Loss, pixel accuracy (and the val split's), val mIoU, learning rate, images/s and the
  share of time waiting for input against the step, as one PNG. The val figures come from
  `eval_log_path` (WORKDIR/eval_log.jsonl: one record per evaluation, `train.eval_every`)."""
  records = read_train_log(train_log_path)
  evals = read_train_log(eval_log_path) if eval_log_path and os.path.exists(eval_log_path) else []
  steps = [r['step'] for r in records]
  panels = (('loss', 'training loss'), ('pixel_accuracy', 'pixel accuracy'),
            ('miou', 'val mIoU'), ('learning_rate', 'learning rate'),
            ('images_per_second', 'images/s'), ('input_wait_fraction', 'share waiting for input'))
  fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), sharex=True)
  for ax, (key, title) in zip(axes.flat, panels):
    if key != 'miou':
      ax.plot(steps, [r.get(key, float('nan')) for r in records], lw=1.2, label='training')
    if key in ('miou', 'pixel_accuracy') and evals:
      ax.plot([r['step'] for r in evals], [r[key] for r in evals], 'o-', color='tab:red',
              lw=1, ms=4, label='val')
      if key == 'pixel_accuracy':
        ax.legend(loc='lower right')
    ax.set_title(title)
    ax.grid(alpha=0.3)
  for ax in axes[1]:
    ax.set_xlabel('step')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_per_class_iou(report: Dict, path: str) -> None:
  """Bar chart of `report['per_class_iou']` (a `seg.inference.metrics.iou_report`), mIoU as a line.

  Classes absent from both labels and predictions (IoU None) are left empty.
  """
  names = list(report['per_class_iou'])
  values = [100 * (v if v is not None else float('nan')) for v in report['per_class_iou'].values()]
  fig, ax = plt.subplots(figsize=(max(6.0, 0.38 * len(names) + 1.5), 4.5))
  ax.bar(range(len(names)), values, color='tab:blue')
  ax.axhline(100 * report['miou'], color='tab:red', lw=1,
             label=f'mIoU {100 * report["miou"]:.2f}%')
  ax.set_xticks(range(len(names)), names, rotation=70, ha='right', fontsize=8)
  ax.set_ylabel('IoU (%)')
  ax.set_ylim(0, 100)
  ax.legend(loc='lower right')
  ax.grid(axis='y', alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_confusion_matrix(report: Dict, path: str) -> None:
  """`report['confusion_matrix']` as a heat map, each row (a label) as shares of its pixels:
  the diagonal is each class's recall, the rest where its pixels went. Shares printed in the
  cells up to 30 classes."""
  names = list(report['per_class_iou'])
  confusion = np.asarray(report['confusion_matrix'], np.float64)
  shares = 100 * confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
  side = max(5.0, 0.42 * len(names) + 2.5)
  fig, ax = plt.subplots(figsize=(side + 1.2, side))
  image = ax.imshow(shares, cmap='Blues', vmin=0, vmax=100)
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label='% of the label\'s pixels')
  ticks = range(len(names))
  ax.set_xticks(ticks, names, rotation=70, ha='right', fontsize=8)
  ax.set_yticks(ticks, names, fontsize=8)
  ax.set_xlabel('predicted')
  ax.set_ylabel('label')
  if len(names) <= 30:
    for (row, column), value in np.ndenumerate(shares):
      if value >= 0.05:
        ax.text(column, row, f'{value:.0f}' if value >= 9.5 else f'{value:.1f}',
                ha='center', va='center', fontsize=6,
                color='white' if value > 60 else 'black')
  ax.set_title(f'confusion matrix (rows sum to 100%), mIoU {100 * report["miou"]:.2f}%')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
