"""Label values: class indices 0..num_classes-1 or the ignore label, checked where data enters.

A label outside them (a palette PNG with a stray index, a grey-scale or colour PNG instead of
VOC's palette indices, a dataset with more classes than the model) makes the training loss
NaN and is silently dropped by evaluation, so `prepare-data` refuses it per file
(`seg.data.voc`) and the input pipeline per example (`seg.data.pipeline`, for datasets
prepared elsewhere). No TensorFlow here.
"""

import numpy as np

DATASET_CLASSES = 21  # every config of the voc_segmentation builder: background + 20 classes
IGNORE_LABEL = 255


class LabelError(ValueError):
  """A label holds values that are neither class indices nor the ignore label."""


def describe(where: str, values, num_classes: int, ignore_label: int) -> str:
  """The one-line message for label `values` found in `where` (a file or an example id)."""
  shown = ', '.join(str(int(v)) for v in list(values)[:20]) + (', ...' if len(values) > 20 else '')
  return (f'{where}: label values {shown} are neither classes 0..{num_classes - 1} nor the '
          f'ignore label {ignore_label}; labels must be class indices (VOC: palette PNGs of '
          f'SegmentationClass), and model.num_classes the dataset\'s number of classes')


def invalid_values(label: np.ndarray, num_classes: int, ignore_label: int) -> np.ndarray:
  """The sorted distinct values of `label` (uint8 [h, w]) outside 0..num_classes-1, ignore."""
  present = np.flatnonzero(np.bincount(np.asarray(label, np.uint8).ravel(), minlength=256))
  return present[(present >= num_classes) & (present != ignore_label)]


def check(label: np.ndarray, where: str, num_classes: int = DATASET_CLASSES,
          ignore_label: int = IGNORE_LABEL) -> np.ndarray:
  """Returns `label`; raises LabelError naming `where` and the values outside the classes."""
  values = invalid_values(label, num_classes, ignore_label)
  if len(values):
    raise LabelError(describe(where, values, num_classes, ignore_label))
  return label
