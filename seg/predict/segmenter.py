"""A trained model in Python: the masks `predict` writes, for images on disk or in memory.

    from seg.predict import Segmenter
    model = Segmenter('runs/quickstart')            # its latest checkpoint
    mask = model('photo.jpg')                        # [H, W] uint8 class ids at full size
    masks = model([pixels, 'b.png', pil_image])      # a list in, a list out
    probs = model.probabilities(pixels)              # [H, W, classes] float32
    rgb = model.colours(mask)                        # model.class_names[mask[y, x]]
    report = model.evaluate(paths, label_paths)      # mIoU as `eval` computes it

Each image goes the way `predict` takes it (`seg.predict.runner`): a file is decoded as
`predict` decodes it (EXIF orientation, 16-bit, transparency, reduced-scale JPEG decoding);
an image with a side above `max_side` (default the model's `data.predict_max_side`, its eval
size unless a dataset folder's eval images are larger) is downscaled to fit, run, and its
logits are taken back to the full size (or with `large_images='tile'`, cut into tiles);
images are padded to the engine's buckets as `eval` pads them, and the passes are the
model's `eval.scales` / `eval.flip` unless `scales` / `flip` say otherwise. So a file's mask
here is the mask `predict` writes for it, and a val image's is the one `eval` scores. Arrays
and PIL images are taken as they are (no EXIF turn): uint8 [h, w] (grey), [h, w, 3] (RGB) or
[h, w, 4] (RGBA, blended over the mean grey as `predict` blends transparent files), or a
batch [n, h, w, 3], whose masks come back as one [n, h, w] array.

Unlike `predict`, nothing is planned against a memory budget: the images and results are
the caller's, and `probabilities` of a 12 MP photo with 21 classes is a 1 GB array.
"""

import os
from typing import Any, Dict, Hashable, List, Optional, Sequence

import numpy as np
from PIL import Image

from seg.classes import class_names, palette
from seg.predict.images import fitted, image_from_array, load_image, load_rgb
from seg.predict.large_images import predict_tiled
from seg.predict.options import Options
from seg.predict.outputs import colours, overlay
from seg.predict.runner import Item, complete, inference_passes, run_items

CHUNK = 32  # inputs decoded at once (their results are the caller's)


class _Probabilities:
  """An image's probabilities in memory, [height, width, classes] float32 (what `complete`
  and `predict_tiled` write into; `ProbabilityFile` is the file of `predict`)."""

  def __init__(self, num_classes: int, height: int, width: int):
    self.array = np.empty((height, width, num_classes), np.float32)

  def write(self, row: int, col: int, probs: np.ndarray) -> None:
    self.array[row:row + probs.shape[0], col:col + probs.shape[1]] = probs


def _pil_image(image) -> Image.Image:
  """An array or PIL image (not a path) as a loaded PIL image (`image_from_array`)."""
  if isinstance(image, np.ndarray):
    return image_from_array(image)
  if not isinstance(image, Image.Image):
    raise TypeError(f'expected a path, a PIL image or a uint8 array, got '
                    f'{type(image).__name__}')
  image.load()
  return image


def _is_single(images) -> bool:
  """One image (a path, a PIL image, an array but a batch), not a list or batch of them."""
  if isinstance(images, np.ndarray):
    return images.ndim != 4
  return isinstance(images, (str, os.PathLike, Image.Image)) or not hasattr(images, '__iter__')


class Segmenter:
  """The model of a workdir, callable on images (see the module docstring).

  Args:
    workdir: a `train` workdir (or `import-weights` output, or a workdir's `best/`).
    dtype: 'float32', 'bfloat16' or 'int8' (int8 calibrates on the training split once and
      keeps the scales in the workdir, or on `calibration`'s images, `calibration_count` of
      them: `predict --dtype int8`).
    scales, flip: the passes averaged (DeepLab's multi-scale and flipped inference); None:
      the model's `config.eval.scales` / `config.eval.flip`, the masks `eval` scores.
    max_side: images with a larger side are downscaled to it ('resize') or cut into tiles of
      it ('tile'); None: the model's `predict_max_side` (`predict --max-side`'s default).
    large_images: 'resize' or 'tile', as `predict --large-images`.
    batch_size: images run at once (of one padding bucket; a smaller group is padded to it).
    devices: the JAX devices a batch is split over (default the first local device).
    log: a function for the engine's messages (kernel builds, calibration), e.g. print.
  """

  def __init__(self, workdir: str, *, dtype: str = 'float32',
               scales: Optional[Sequence[float]] = None, flip: Optional[bool] = None,
               max_side: Optional[int] = None, large_images: str = 'resize',
               batch_size: int = 1, calibration: Optional[str] = None,
               calibration_count: Optional[int] = None, devices=None, log=None):
    from seg.inference.engine import Engine
    Options(max_side=max_side, large_images=large_images)  # the same checks as predict's
    scales, flip = inference_passes(workdir, scales, flip)
    self.engine, self.step = Engine.from_workdir(
        workdir, calibration, calibration_count, batch_size=batch_size, dtype=dtype,
        devices=devices, log=log, scales=scales, flip=flip)
    self.workdir = workdir
    self.config = self.engine.config
    self.max_side = max_side or self.engine.predict_max_side
    self.large_images = large_images
    Options(max_side=self.max_side, large_images=large_images)  # the model's side, to tile
    data = self.config.data
    self.class_names: List[str] = class_names(data.dataset, self.config.model.num_classes,
                                              data.get('class_names', ''))
    self.palette: np.ndarray = palette(data.get('class_colours', ''))  # [256, 3] uint8

  def __repr__(self) -> str:
    engine = self.engine
    passes = (f', scales {list(engine.scales)}{" + flips" if engine.flip else ""}'
              if engine.multi_scale else '')
    return (f'Segmenter({self.workdir!r}: step {self.step}, '
            f'{len(self.class_names)} classes, {np.dtype(engine.dtype).name}, '
            f'max side {self.max_side} ({self.large_images}){passes})')

  # the images --------------------------------------------------------------------------

  def _item(self, image) -> Item:
    """One input as `predict` would hold it after decoding (`Item`)."""
    resize_side = self.max_side if self.large_images == 'resize' else None
    if isinstance(image, (str, os.PathLike)):
      try:
        pixels, original = load_image(os.fspath(image), resize_side)
      except FileNotFoundError:
        raise
      except Exception as e:  # which input, and why (`predict` reports it the same way)
        from seg.predict.progress import failure_reason
        raise ValueError(f'{os.fspath(image)}: {failure_reason(e)}') from e
    else:
      if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and \
          image.dtype == np.uint8 and not (resize_side and max(image.shape[:2]) > resize_side):
        pixels = np.ascontiguousarray(image)  # taken as it is
        return Item(None, pixels, pixels.shape[:2], tiled=max(pixels.shape[:2]) > self.max_side)
      image = _pil_image(image)
      original = (image.height, image.width)
      pixels = fitted(image, original, resize_side)
    return Item(None, pixels, tuple(original), tiled=max(pixels.shape[:2]) > self.max_side)

  def _run(self, images, probabilities: bool) -> Any:
    single = _is_single(images)
    batch_array = isinstance(images, np.ndarray) and images.ndim == 4
    inputs = [images] if single else list(images)
    results = []
    for start in range(0, len(inputs), CHUNK):  # decoded pixels of one chunk held at a time
      results += self._run_chunk(inputs[start:start + CHUNK], probabilities)
    if single:
      return results[0]
    if batch_array and not results:  # an empty batch: an empty batch of results
      classes = (self.config.model.num_classes,) if probabilities else ()
      return np.zeros(images.shape[:3] + classes, np.float32 if probabilities else np.uint8)
    return np.stack(results) if batch_array else results

  def _run_chunk(self, inputs: Sequence[Any], probabilities: bool) -> List[np.ndarray]:
    """Masks (or probabilities) of some inputs, as `predict`'s pipeline computes them."""
    items = [self._item(image) for image in inputs]
    stores: Dict[int, _Probabilities] = {}

    def store_for(index):
      def open_store(num_classes, height, width):
        stores[index] = _Probabilities(num_classes, height, width)
        return stores[index]
      return open_store if probabilities else None

    groups: Dict[Hashable, List[int]] = {}  # images of one padding bucket run together
    for index, item in enumerate(items):
      if item.tiled:
        predict_tiled(self.engine, item, self.max_side, store_for(index))
      else:
        groups.setdefault(self.engine.bucket(*item.image.shape[:2]), []).append(index)
    for indices in groups.values():
      for start in range(0, len(indices), self.engine.batch_size):
        run_items(self.engine, [items[i] for i in indices[start:start + self.engine.batch_size]],
                  probabilities)
    results = []
    for index, item in enumerate(items):
      complete(item, store_for(index))  # a tiled item's are written already
      results.append(stores[index].array if probabilities else item.mask)
    return results

  def predict(self, images) -> Any:
    """Class ids at every pixel: [H, W] uint8 for one image (a path, a PIL image or an
    array), a list for a list, [n, H, W] for a batch array [n, H, W, 3]."""
    return self._run(images, probabilities=False)

  __call__ = predict

  def probabilities(self, images) -> Any:
    """Class probabilities at every pixel, [H, W, classes] float32 (one image; a list for a
    list, [n, H, W, classes] for a batch array): the softmax of the logits, or the average
    over the passes with several scales or flips; `predict`'s classes are their argmax
    (`predict --probabilities` writes them as [classes, H, W] float16 or uint8)."""
    return self._run(images, probabilities=True)

  # scoring -----------------------------------------------------------------------------

  def label(self, label, where: str = 'label') -> np.ndarray:
    """A label as class indices [H, W] uint8: an array as it is; a file read as a dataset
    folder's labels are (palette or grey indices, or colours: the model's class colours,
    else VOC's for 21 classes), `seg.data.folder.read_label`."""
    from seg.data import folder, labels
    if isinstance(label, (str, os.PathLike)):
      colours = self.config.data.get('class_colours', '')
      classes = (folder.Classes(tuple(self.class_names),
                                tuple(tuple(c) for c in self.palette[:len(self.class_names)]
                                      .tolist()), "the model's class colours") if colours
                 else folder.VOC_CLASSES if len(self.class_names) == 21 else None)
      label = folder.read_label(os.fspath(label), classes)
    label = np.asarray(label)
    if label.ndim != 2 or label.dtype.kind not in 'ui':
      raise ValueError(f'{where}: a label is [height, width] class indices, got shape '
                       f'{label.shape} {label.dtype}')
    ignore = self.config.data.ignore_label
    wide = np.unique(label[(label < 0) | (label > 255)])  # beyond uint8: none is a class
    if len(wide):
      raise labels.LabelError(labels.describe(where, wide, len(self.class_names), ignore))
    return labels.check(label.astype(np.uint8), where, len(self.class_names), ignore)

  def evaluate(self, images, labels, ids: Optional[Sequence[str]] = None,
               chunk: int = 16, progress=None) -> Dict[str, Any]:
    """The model's scores on `images` against their `labels`, computed as `eval` computes
    them: one confusion matrix over every labelled pixel of all the images (the ignore
    label, 255, counts nowhere), per-class IoU, their mean over the classes present, pixel
    accuracy, and every image's own scores (worst first).

    Args:
      images: what `predict` takes (a list of paths, arrays or PIL images).
      labels: one per image, at its size: uint8 arrays of class indices, or label files as
        a dataset folder holds them (palette or grey PNGs of indices, or colour PNGs in the
        model's class colours; VOC's colours for a 21-class model).
      ids: the images' names in the report (default: file names, else their positions).
      chunk: images predicted at a time (their masks are held until scored).
      progress: called with no arguments after each image (e.g. `Progress(n).update`).

    Returns:
      `seg.inference.metrics.iou_report`'s dict ('miou', 'per_class_iou',
      'pixel_accuracy', 'num_images', 'confusion_matrix') with 'images' (`image_rows`);
      `seg.inference.metrics.format_report` prints it as `eval` does.
    """
    from seg.inference import metrics
    batch = not _is_single(images)
    images = list(images) if batch else [images]
    labels = (list(labels) if isinstance(labels, np.ndarray) and labels.ndim == 3 and batch
              else [labels] if _is_single(labels) else list(labels))
    if not images:
      raise ValueError('no images to evaluate')
    if len(images) != len(labels):
      raise ValueError(f'{len(images)} image(s) and {len(labels)} label(s): give one label '
                       'per image')
    if ids is None:
      ids = [os.path.splitext(os.path.basename(os.fspath(image)))[0]
             if isinstance(image, (str, os.PathLike)) else str(i)
             for i, image in enumerate(images)]
    num_classes = len(self.class_names)
    counts = np.zeros((len(images), 3, num_classes), np.int64)  # labelled, predicted, right
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for start in range(0, len(images), chunk):
      masks = self.predict(images[start:start + chunk])
      for i, mask in enumerate(masks, start):
        label = self.label(labels[i], f'label of {ids[i]}')
        if label.shape != mask.shape:
          turned = (' (turned: a file\'s EXIF orientation is applied, as viewers show it; '
                    'was the label drawn on the stored pixels?)'
                    if label.shape == mask.shape[::-1] else '')
          raise ValueError(f'label of {ids[i]}: {label.shape[0]}x{label.shape[1]}, its image '
                           f'{mask.shape[0]}x{mask.shape[1]}{turned}')
        valid = label != self.config.data.ignore_label
        cells = label[valid].astype(np.int64) * num_classes + mask[valid]
        matrix = np.bincount(cells, minlength=num_classes ** 2).reshape(num_classes, -1)
        confusion += matrix
        counts[i] = [matrix.sum(1), matrix.sum(0), np.diagonal(matrix)]  # `class_counts`
        if progress is not None:
          progress()
    report = metrics.iou_report(confusion, self.class_names, len(images))
    report['images'] = metrics.image_rows(ids, counts, self.class_names)
    return report

  # showing the masks -------------------------------------------------------------------

  def colours(self, mask: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8: each pixel's class colour (NAME_color.png of `predict`)."""
    return colours(np.asarray(mask, np.uint8), self.palette)

  def overlay(self, image, mask: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8: the image with the class colours blended half and half over it where
    the class is not background (NAME_overlay.jpg of `predict`, before JPEG)."""
    if isinstance(image, (str, os.PathLike)):
      pixels = load_rgb(os.fspath(image))
    else:
      image = _pil_image(image)
      pixels = fitted(image, (image.height, image.width), None)
    mask = np.asarray(mask, np.uint8)
    if mask.shape != pixels.shape[:2]:
      raise ValueError(f'the mask is {mask.shape[0]}x{mask.shape[1]}, the image '
                       f'{pixels.shape[0]}x{pixels.shape[1]}')
    return overlay(pixels, mask, palette=self.palette)
