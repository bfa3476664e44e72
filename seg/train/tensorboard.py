"""TensorBoard summaries of a training run, written without TensorFlow (tensorboardX).

    WORKDIR/tensorboard/events.out.tfevents.*

Tags:
  train/loss, train/pixel_accuracy, train/learning_rate, train/images_per_second
  train/nonfinite_steps                    steps skipped for a non-finite loss or gradient
  eval/miou, eval/pixel_accuracy, eval/iou/<class name>
  eval/examples                            a few validation images: image | truth | prediction

Only process 0 writes; the other processes get a writer that does nothing.
"""

import os
from typing import Dict, Optional

import numpy as np

from seg.classes import example_panels

SUBDIR = 'tensorboard'


class SummaryWriter:
  """Scalars, evaluation reports and images for TensorBoard; a no-op if not `enabled`."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.logdir = os.path.join(workdir, SUBDIR)
    self._writer = None
    if enabled:
      import tensorboardX  # pure Python (protobuf): no TensorFlow behind it
      self._writer = tensorboardX.SummaryWriter(self.logdir, flush_secs=30)

  def scalars(self, step: int, values: Dict[str, float], prefix: str = 'train') -> None:
    if self._writer:
      for name, value in values.items():
        self._writer.add_scalar(f'{prefix}/{name}', float(value), step)

  def report(self, step: int, report: Dict, prefix: str = 'eval') -> None:
    """mIoU, pixel accuracy and per-class IoU of a `seg.inference.metrics.iou_report`."""
    if not self._writer:
      return
    self.scalars(step, {'miou': report['miou'], 'pixel_accuracy': report['pixel_accuracy']},
                 prefix)
    for name, iou in report['per_class_iou'].items():
      if iou is not None:
        self._writer.add_scalar(f'{prefix}/iou/{name}', float(iou), step)

  def images(self, step: int, tag: str, images: np.ndarray) -> None:
    """images: [n, height, width, 3] uint8, one TensorBoard image each (`tag/i`)."""
    if self._writer:
      for i, image in enumerate(images):
        self._writer.add_image(f'{tag}/{i}', image, step, dataformats='HWC')

  def flush(self) -> None:
    if self._writer:
      self._writer.flush()

  def close(self) -> None:
    if self._writer:
      self._writer.close()


def validation_examples(model, variables, config, num: int = 3) -> Optional[np.ndarray]:
  """Panels (`example_panels`) for the first `num` images of the eval split.

  Runs on the host's default device with host `variables` ({'params',
  'batch_stats'}); padding stays visible (black, void label).
  """
  import jax
  import jax.numpy as jnp
  from seg.data import pipeline  # TensorFlow stays out of the import of this module.
  from seg.preprocessing import preprocess_padded
  batch = next(pipeline.eval_batches(config.data, num, config.data.eval_split))
  keep = batch['mask'] > 0
  if not keep.any():
    return None
  images, sizes = jnp.asarray(batch['image'][keep]), jnp.asarray(batch['size'][keep])
  logits = jax.jit(lambda v, x, s: model.apply(v, preprocess_padded(x, s), train=False))(
      variables, images, sizes)
  predictions = np.asarray(jnp.argmax(logits, -1))
  return example_panels(batch['image'][keep], batch['label'][keep], predictions,
                        config.data.ignore_label, config.data.class_colours)
