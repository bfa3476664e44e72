"""Input pipelines: DeepLab's training augmentation and padded full-resolution evaluation.

Batches come out as NumPy dicts for the process's local devices:
  train: image [batch, crop, crop, 3] float32 in [0, 255], label [batch, crop, crop] uint8
         (as_uint8: image uint8, and valid [batch, 4] int32, the image's box in the crop)
  eval:  image [batch, size, size, 3] float32 in [0, 255], label [batch, size, size] uint8
         (255 outside the image), mask [batch] float32 (0 for padding examples).
"""

import contextlib
import os
import re
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import tensorflow_datasets as tfds

from seg.data import folder, labels, voc
from seg.data.tf_quiet import tf
from seg.preprocessing import MEAN_PIXEL, padded_size

# The GPU belongs to JAX; TF only decodes and augments on the CPU.
tf.config.set_visible_devices([], 'GPU')

# Images are read from the TFRecords as their JPEG bytes and decoded by `decode_image`, never
# by TFDS's Image feature: that one calls tf.image.decode_image, whose JPEG decoder uses
# libjpeg's fast integer IDCT, a few grey levels off Pillow's accurate one on most values.
# `predict` reads images with Pillow, so eval (and training) decode as Pillow does.
_SKIP_IMAGE = {'image': tfds.decode.SkipDecoding()}


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
  """JPEG (or PNG) bytes -> [height, width, 3] uint8, pixel for pixel what Pillow decodes.

  JPEGs with libjpeg's accurate integer IDCT (Pillow's, hence `predict`'s); anything else
  (a PNG saved as .jpg) through tf.io.decode_image.
  """
  image = tf.cond(
      tf.io.is_jpeg(encoded),
      lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method='INTEGER_ACCURATE'),
      lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))
  image.set_shape([None, None, 3])
  return image


def image_shape(encoded: tf.Tensor) -> tf.Tensor:
  """[height, width] int32 of a JPEG's or PNG's bytes, from its header alone."""
  def png_shape():  # IHDR: width, then height, 4 bytes each (big-endian) from byte 16
    digits = tf.cast(tf.io.decode_raw(tf.strings.substr(encoded, 16, 8), tf.uint8), tf.int32)
    sizes = tf.reduce_sum(tf.reshape(digits, [2, 4]) * [1 << 24, 1 << 16, 1 << 8, 1], axis=1)
    return tf.reverse(sizes, [0])
  return tf.cond(tf.io.is_jpeg(encoded), lambda: tf.io.extract_jpeg_shape(encoded)[:2],
                 png_shape)


def _read(builder, split: str, decoders) -> tf.data.Dataset:
  """The split's records in order, never cached by TFDS itself.

  TFDS keeps a small dataset (up to 250 MiB, e.g. the embedded one) in memory on its own
  unless told not to: a split then read in part (the first val batch of TensorBoard's
  panels) ended every `train` with TF's warning that "partially cached contents" were
  discarded, and the training stream was cached twice (its records, then `data.cache`).
  """
  return builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                            read_config=tfds.ReadConfig(try_autocache=False))


def _decoded(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Examples read with `_SKIP_IMAGE`, their image decoded by `decode_image`."""
  return ds.map(lambda ex: {**ex, 'image': decode_image(ex['image'])},
                num_parallel_calls=tf.data.AUTOTUNE)


def prepared(data_config):
  """The builder of the config's dataset, prepared (`seg.data.voc.prepare`) if it was not."""
  return voc.prepare(data_config.dataset, data_config.data_dir,
                     root=data_config.get('folder', ''))


def split_examples(data_config, split: str) -> tf.data.Dataset:
  """The split's examples in order: image [h, w, 3] uint8 (`decode_image`), label [h, w, 1]."""
  builder = prepared(data_config)
  return _decoded(_read(builder, split, _SKIP_IMAGE))


_LABEL_ERROR = re.compile(r'LABELS<<(.*?)>>LABELS', re.DOTALL)


def _check_labels(ds: tf.data.Dataset, num_classes: int, ignore_label: int) -> tf.data.Dataset:
  """`ds` (examples with 'label' and 'file_name'), failing on a label outside the classes.

  For datasets prepared elsewhere (`prepare-data` checks every file): a reduction over the
  label's pixels, placed where it costs least (before the training stream's cache: its first
  pass only). `_numpy` turns the failure into labels.LabelError naming the example.
  """
  def check(ex):
    label = ex['label']
    if label.dtype == tf.string:   # read with SkipDecoding: decoded for the check only
      label = tf.io.decode_png(label)
    label = tf.cast(label, tf.int32)
    bad = tf.logical_and(label >= num_classes, label != ignore_label)

    def fail():
      values = tf.sort(tf.unique(tf.boolean_mask(label, bad))[0])
      message = tf.strings.join(['LABELS<<', ex['file_name'], ':', tf.strings.reduce_join(
          tf.strings.as_string(values), separator=','), '>>LABELS'])
      with tf.control_dependencies([tf.debugging.Assert(False, [message])]):
        return tf.constant(False)

    ok = tf.cond(tf.reduce_any(bad), fail, lambda: tf.constant(True))
    with tf.control_dependencies([ok]):
      return {k: tf.identity(v) for k, v in ex.items()}

  return ds.map(check, num_parallel_calls=tf.data.AUTOTUNE)


@contextlib.contextmanager
def _label_errors(num_classes: int, ignore_label: int, where: str):
  """Raises a failed `_check_labels` of the datasets read inside as labels.LabelError."""
  try:
    yield
  except tf.errors.InvalidArgumentError as e:
    found = _LABEL_ERROR.search(e.message)
    if not found:
      raise
    name, values = found.group(1).split(':', 1)
    raise labels.LabelError(labels.describe(
        f'example {name} of {where}', [int(v) for v in values.split(',')],
        num_classes, ignore_label)) from None


def _numpy(ds: tf.data.Dataset, num_classes: int, ignore_label: int, where: str) -> Iterator:
  """tfds.as_numpy(ds), a failed `_check_labels` raised as labels.LabelError."""
  with _label_errors(num_classes, ignore_label, where):
    yield from tfds.as_numpy(ds)


def _pad_to(image: tf.Tensor, label: tf.Tensor, height, width, ignore_label: int):
  """Pads image (mean pixel) and label (ignore_label) at the bottom and right."""
  pad_h = tf.maximum(height - tf.shape(image)[0], 0)
  pad_w = tf.maximum(width - tf.shape(image)[1], 0)
  paddings = [[0, pad_h], [0, pad_w], [0, 0]]
  image = tf.pad(image - MEAN_PIXEL, paddings) + MEAN_PIXEL
  label = tf.pad(tf.cast(label, tf.int32) - ignore_label, paddings) + ignore_label
  return image, tf.cast(label, tf.uint8)


def augment(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor, *, crop_size: int,
            min_scale: float, max_scale: float, scale_step: float,
            ignore_label: int = 255, as_uint8: bool = False):
  """DeepLab's training augmentation, deterministic in `seed` (a [2] int tensor).

  Random scale from {min_scale, min_scale + step, ..., max_scale} (bilinear
  for the image, nearest for the label, aligned corners as TF1 DeepLab), pad
  up to the crop (mean pixel / ignore_label), random crop, random horizontal
  flip.

  Args:
    image: [height, width, 3] uint8 or float.
    label: [height, width, 1] uint8.

  Returns:
    image [crop, crop, 3] float32 in [0, 255], label [crop, crop] uint8; with
    `as_uint8`, image [crop, crop, 3] uint8 (rounded), label, and valid [4] int32: the
    image's region in the crop, rows [valid[0], valid[1]) and columns [valid[2], valid[3])
    (outside it is padding, which `seg.preprocessing.preprocess_in_box` sets to 0, as the
    mean pixel's 127.5 would have been).
  """
  scale_seed, crop_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  scales = tf.range(min_scale, max_scale + scale_step / 2, scale_step)
  scale = tf.gather(scales, tf.random.stateless_uniform(
      [], scale_seed, 0, tf.size(scales), dtype=tf.int32))
  size = tf.cast(tf.cast(tf.shape(image)[:2], tf.float32) * scale, tf.int32)
  image = tf.compat.v1.image.resize(tf.cast(image, tf.float32), size,
                                    tf.image.ResizeMethod.BILINEAR, align_corners=True)
  label = tf.compat.v1.image.resize(label, size, tf.image.ResizeMethod.NEAREST_NEIGHBOR,
                                    align_corners=True)
  channels = [image, tf.cast(label, tf.float32)]
  if as_uint8:   # a channel of ones that the padding leaves 0: where the image is
    channels.append(tf.ones_like(channels[1]))
  image, label = _pad_to(image, label, crop_size, crop_size, ignore_label)
  channels[:2] = [image, tf.cast(label, tf.float32)]
  if as_uint8:
    channels[2] = tf.pad(channels[2], [[0, tf.shape(image)[0] - tf.shape(channels[2])[0]],
                                       [0, tf.shape(image)[1] - tf.shape(channels[2])[1]],
                                       [0, 0]])
  both = tf.concat(channels, axis=-1)
  both = tf.image.stateless_random_crop(both, [crop_size, crop_size, 3 + len(channels) - 1],
                                        crop_seed)
  both = tf.image.stateless_random_flip_left_right(both, flip_seed)
  image, label = both[..., :3], tf.cast(tf.round(both[..., 3]), tf.uint8)
  if not as_uint8:
    return image, label
  inside = both[..., 4] > 0.5
  rows = tf.where(tf.reduce_any(inside, axis=1))[:, 0]
  cols = tf.where(tf.reduce_any(inside, axis=0))[:, 0]
  valid = tf.cast(tf.stack([rows[0], rows[-1] + 1, cols[0], cols[-1] + 1]), tf.int32)
  image = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)
  return image, label, valid


def augmentation_seed(seed, index, process_index: int = 0, process_count: int = 1):
  """The [2] seed of the `index`-th example of a process's stream.

  (seed, index) with one process, as always; with several, the index becomes the
  example's position in the interleaved global stream (index * processes +
  process), so that no two processes draw the same scale, crop and flip.
  """
  if process_count > 1:
    index = index * process_count + process_index
  return tf.stack([tf.cast(seed, tf.int64), tf.cast(index, tf.int64)])


def process_split(split: str, process_index: int, process_count: int) -> str:
  """This process's share of a split as a TFDS split string (the whole split for one).

  TFDS then reads and decodes only those records: the share is taken before
  decoding and caching (`ds.shard` after decoding reads and decodes every example
  in every process and throws away all but 1/processes of them).
  """
  if process_count == 1:
    return split
  return tfds.even_splits(split, n=process_count)[process_index]


# data.cache: what the training stream keeps in memory after its first pass over the shard.
#   'decoded'  decoded uint8 images and labels: fastest; 4 bytes a pixel, 0.75 MB for a
#              500x375 VOC image (train_aug's 10,582 examples: ~7.9 GB in one process);
#   'encoded'  the JPEG/PNG bytes, decoded again at every use (after the shuffle);
#   'none'     nothing: every pass reads the TFRecords from disk again.
# The stream (which example, which augmentation) is the same with each.
CACHES = ('decoded', 'encoded', 'none')


def train_batches(data_config, batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1, start_step: int = 0,
                  as_uint8: bool = False,
                  num_classes: int = labels.DATASET_CLASSES) -> Iterator[Dict[str, np.ndarray]]:
  """Endless augmented training batches of this process's shard of the split.

  The stream is a function of `seed` alone: the k-th example (its source
  image and its augmentation) is the same in every run, so a run resumed at
  `start_step` sees exactly the batches a straight run sees from that step.
  The skipped examples go through the shuffle but not through decoding-heavy
  augmentation.

  Args:
    batch_size: examples per batch for this process (global batch / processes).
    seed: shuffling and augmentation seed.
    start_step: number of batches to skip (the step a resumed run starts after).
    as_uint8: images as uint8 plus `valid` [batch, 4] int32 boxes (`augment`), 4x fewer
      bytes to an accelerator; else float32 in [0, 255] (the CPU's default: no transfer).
    num_classes: the model's; a label value outside 0..num_classes-1 and the ignore
      label raises labels.LabelError naming the example (checked on the first pass).

  Each process reads only its own share of the split (`process_split`, before
  decoding and caching) and draws its own augmentations (`augmentation_seed`).
  """
  cache = data_config.cache
  if cache not in CACHES:
    raise ValueError(f'data.cache must be one of {CACHES}, got {cache!r}')
  builder = prepared(data_config)
  features = builder.info.features
  # 'encoded' and 'none' read the JPEG/PNG bytes and decode after the shuffle.
  decode_late = cache != 'decoded'
  decoders = {**_SKIP_IMAGE, 'label': tfds.decode.SkipDecoding()} if decode_late else _SKIP_IMAGE
  if builder.info.splits[data_config.train_split].num_examples < process_count:
    raise ValueError(f'split {data_config.train_split!r} has fewer examples than processes')
  # This process's share only, before decoding and caching (`process_split`).
  ds = _read(builder, process_split(data_config.train_split, process_index, process_count),
             decoders)
  ds = _check_labels(ds, num_classes, data_config.ignore_label)
  if decode_late:
    ds = ds.map(lambda ex: (ex['image'], ex['label']))
  else:
    ds = ds.map(lambda ex: (decode_image(ex['image']), ex['label']),
                num_parallel_calls=tf.data.AUTOTUNE)
  if cache != 'none':
    ds = ds.cache()
  # shuffle() after repeat() with an op-level seed is one deterministic stream (no
  # reshuffling between iterations of it), unlike a shuffle reseeded on resumption.
  ds = ds.repeat().shuffle(data_config.shuffle_buffer, seed=seed)
  # Each example gets its own augmentation seed: (seed, position in the stream).
  ds = ds.enumerate().skip(start_step * batch_size)

  def _augment(index, example):
    image, label = example
    if decode_late:
      image = decode_image(image)
      label = features['label'].decode_example(label)
    out = augment(
        image, label, augmentation_seed(seed, index, process_index, process_count),
        crop_size=data_config.crop_size, min_scale=data_config.min_scale,
        max_scale=data_config.max_scale, scale_step=data_config.scale_step,
        ignore_label=data_config.ignore_label, as_uint8=as_uint8)
    return dict(zip(('image', 'label', 'valid'), out))

  ds = ds.map(_augment, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(2)
  return _numpy(ds, num_classes, data_config.ignore_label,
                f'split {data_config.train_split!r} of {builder.data_dir}')


def prepare(data_config, num_classes: Optional[int] = None, log=print,
            process_count: int = 1) -> Optional[Dict]:
  """Prepares the config's dataset (a no-op when prepared) and checks its two splits exist;
  returns what `train` keeps of a 'folder' dataset: {'names': labelmap.txt's class names or
  None, 'colours': their [[r, g, b], ...] or None, 'eval_side': the eval split's largest
  image side}; None for the other datasets.

  Raises `voc.SourceError` (archives missing or wrong), `folder.FolderError` or ValueError
  (unknown dataset or split; a folder's classes that `num_classes` does not fit, or its
  training images that `data.cache` cannot hold in this machine's memory), before anything
  is compiled.
  """
  builder = prepared(data_config)
  for field in ('train_split', 'eval_split'):
    names = _split_names(data_config[field])
    if not all(name in builder.info.splits for name in names):
      splits = sorted(builder.info.splits)
      raise ValueError(f'config.data.{field}={data_config[field]!r}: the '
                       f'{data_config.dataset!r} dataset has the splits {", ".join(splits)}'
                       + (f'; for one list: add{folder.split_flags(splits)}'
                          if len(splits) == 1 else ''))
  facts = voc.folder_facts(builder)
  if facts is None:
    return None
  largest = _largest_eval_image(facts, data_config)
  if num_classes is not None:
    _check_folder_classes(facts, num_classes, log)
    _check_cache_fits(facts, data_config, process_count, log)
    _note_large_eval_images(facts['root'], largest, data_config, log)
  return {'names': facts['names'] or None, 'colours': facts.get('colours'),
          'eval_side': max(largest) if largest else 0}


def _split_names(split: str) -> list:
  """The split names of a TFDS split expression ('val[:8]', 'train+val')."""
  return [part.split('[')[0].strip() for part in split.split('+')]


def _check_folder_classes(facts: dict, num_classes: int, log) -> None:
  names, root = facts['names'], facts['root']
  fix = '--config.model.num_classes={}'
  top = folder.class_count(facts)
  if names and top != num_classes:
    source = facts.get('classes_from') or folder.LABELMAP
    where = os.path.join(root, source) if source == folder.LABELMAP else source
    raise ValueError(f'{where} names {top} classes; config.model.num_classes is {num_classes}: '
                     f'add {fix.format(top)}')
  if top > num_classes:
    raise ValueError(f'the labels of {root} hold class {top - 1}; config.model.num_classes is '
                     f'{num_classes}: add {fix.format(top)} (or more)')
  if top < num_classes:
    log(f'note: the labels of {root} hold classes 0..{top - 1} only; config.model.num_classes '
        f'is {num_classes} ({fix.format(top)} if the dataset has no more)')


def _check_cache_fits(facts: dict, data_config, process_count: int, log) -> None:
  """data.cache='decoded' keeps 4 bytes a pixel of the training images: a folder of phone
  photos can need more memory than the machine has, found only after minutes of caching."""
  if data_config.cache != 'decoded':
    return
  pixels = sum(int(np.sum(facts['class_pixels'].get(name, 0)))
               for name in _split_names(data_config.train_split))
  needed = 4 * pixels // max(process_count, 1)
  memory = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  what = (f"data.cache='decoded' keeps the training images decoded: "
          f'{needed / 2**30:.1f} GiB in each process (4 bytes a pixel), this machine has '
          f'{memory / 2**30:.1f} GiB')
  if needed > memory:
    raise ValueError(f'{what}: add --config.data.cache=encoded (decoded again at every use) '
                     'or make the images smaller')
  if needed > memory // 2:
    log(f'note: {what} (--config.data.cache=encoded holds the JPEG/PNG bytes instead)')


def _largest_eval_image(facts: dict, data_config) -> Optional[Tuple[int, int]]:
  """(largest height, largest width) of the images of the folder's eval split(s), or None."""
  sizes = [facts.get('largest', {}).get(name) for name in _split_names(data_config.eval_split)]
  sizes = [size for size in sizes if size]
  return (max(s[0] for s in sizes), max(s[1] for s in sizes)) if sizes else None


def _note_large_eval_images(root: str, largest: Optional[Tuple[int, int]], data_config,
                            log) -> None:
  """Eval split images above data.eval_size are evaluated whole, in one more compiled shape:
  say so, with the eval_size that avoids it, and the side `predict` will run whole
  (`train` sets data.predict_max_side to it unless the config gives one); `largest`: the
  folder's (height, width) (`_largest_eval_image`)."""
  if not largest or max(largest) <= data_config.eval_size:
    return
  side = max(largest)
  predict = data_config.get('predict_max_side', 0)
  after = (f'`predict` runs inputs up to {side} px whole too (data.predict_max_side={side}; '
           f'larger ones downscaled to it)' if not predict else
           f'`predict` downscales inputs above data.predict_max_side={predict} px')
  log(f'note: the {data_config.eval_split!r} images of {root} reach '
      f'{largest[0]}x{largest[1]}, above data.eval_size={data_config.eval_size}: eval runs '
      f'them whole, in one more compiled shape (--config.data.eval_size='
      f'{padded_size(side)} avoids it); {after}')


def num_examples(data_config, split: str) -> int:
  """Number of examples of a prepared split."""
  return prepared(data_config).info.splits[split].num_examples


_OVERSIZE_CACHE = {}


def oversize_images(data_config, split: str):
  """(indices, padded (height, width)) of the split's images larger than `eval_size`: one
  square canvas, `padded_size` of their largest side (`predict` pads images of that size to
  the same canvas: `seg.inference.engine.Engine.bucket`).

  Reads only the JPEG (PNG) headers; cached per prepared split, since training
  evaluates the same split many times.
  """
  key = (data_config.dataset, data_config.get('folder', ''), data_config.data_dir, split,
         data_config.eval_size)
  if key not in _OVERSIZE_CACHE:
    builder = prepared(data_config)
    ds = _read(builder, split, {'image': tfds.decode.SkipDecoding()})
    shapes = np.concatenate(list(tfds.as_numpy(ds.map(
        lambda ex: image_shape(ex['image']),
        num_parallel_calls=tf.data.AUTOTUNE).batch(1024))) or [np.zeros((0, 2), np.int32)])
    indices = np.flatnonzero(shapes.max(axis=1) > data_config.eval_size)
    side = padded_size(int(shapes[indices].max())) if len(indices) else 0
    shape = (side, side) if len(indices) else None
    _OVERSIZE_CACHE[key] = (indices, shape)
  return _OVERSIZE_CACHE[key]


def eval_batches(data_config, batch_size: int, split: str, process_index: int = 0,
                 process_count: int = 1,
                 num_classes: int = labels.DATASET_CLASSES) -> Iterator[Dict[str, np.ndarray]]:
  """Every example of this process's shard exactly once, at full resolution.

  Images are padded (never resized or cropped) to `eval_size` x `eval_size`; a batch is
  {'image' [n, h, w, 3] uint8, 'size' [n, 2] int32 (each image's height and width, the
  rest is padding), 'label' [n, h, w] uint8 (padding = the ignore label), 'mask' [n],
  'index' [n] int32 (each example's place in the split, `split_ids`; padding -1)}.
  Images larger than that come after them, padded to one larger square: the
  split's largest side rounded up to k * 64 + 1 (one more compiled shape;
  VOC's images, at most 500 pixels, never need it). In both
  groups the last batch is completed with masked padding examples, and every
  process yields the same number of batches of each shape so that collective
  steps line up. A label value outside 0..num_classes-1 and the ignore label raises
  labels.LabelError naming the example.
  """
  builder = prepared(data_config)
  total = builder.info.splits[split].num_examples
  size = data_config.eval_size
  large, large_shape = oversize_images(data_config, split)
  # tf.data's shard gives example i to process i % process_count.
  shard_sizes = np.bincount(np.arange(total) % process_count, minlength=process_count)
  large_per_shard = np.bincount(large % process_count, minlength=process_count)
  steps = lambda counts: int(np.max(-(-counts // batch_size)))
  ds = _read(builder, split, _SKIP_IMAGE).enumerate().map(lambda i, ex: {**ex, 'index': i})
  ds = _decoded(ds.shard(process_count, process_index))
  ds = _check_labels(ds, num_classes, data_config.ignore_label)
  fits = lambda ex: tf.reduce_max(tf.shape(ex['image'])[:2]) <= size
  where = f'split {split!r} of {builder.data_dir}'
  with _label_errors(num_classes, data_config.ignore_label, where):
    yield from _padded_batches(ds.filter(fits), data_config.ignore_label, batch_size, size,
                               size, steps(shard_sizes - large_per_shard))
    if len(large):
      yield from _padded_batches(ds.filter(lambda ex: tf.logical_not(fits(ex))),
                                 data_config.ignore_label, batch_size, *large_shape,
                                 steps(large_per_shard))


def _padded_batches(ds: tf.data.Dataset, ignore_label: int, batch_size: int, height: int,
                    width: int, steps: int) -> Iterator[Dict[str, np.ndarray]]:
  """`steps` batches of `ds`'s examples padded to height x width, then masked padding.

  Images stay uint8 (4x fewer bytes to the device than float32); uint8 cannot hold the mean
  pixel that pads them, so each example's `size` (its height and width) travels with it and
  `seg.preprocessing.preprocess_padded` sets the padding on the device.
  """

  def _pad(ex):
    shape = tf.shape(ex['image'])[:2]
    paddings = [[0, height - shape[0]], [0, width - shape[1]], [0, 0]]
    label = tf.pad(tf.cast(ex['label'], tf.int32) - ignore_label, paddings) + ignore_label
    return {'image': tf.pad(tf.cast(ex['image'], tf.uint8), paddings),
            'size': tf.cast(shape, tf.int32), 'label': tf.cast(label, tf.uint8)[..., 0],
            'mask': tf.ones([], tf.float32), 'index': tf.cast(ex['index'], tf.int32)}

  ds = ds.map(_pad, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(2)
  padding = {'image': np.zeros((height, width, 3), np.uint8),
             'size': np.zeros(2, np.int32),
             'label': np.full((height, width), ignore_label, np.uint8),
             'mask': np.zeros((), np.float32), 'index': np.full((), -1, np.int32)}
  produced = 0
  for batch in tfds.as_numpy(ds):
    missing = batch_size - len(batch['mask'])
    if missing:
      batch = {k: np.concatenate([v, np.stack([padding[k]] * missing)]) for k, v in batch.items()}
    produced += 1
    yield batch
  for _ in range(steps - produced):
    yield {k: np.stack([v] * batch_size) for k, v in padding.items()}


def split_ids(data_config, split: str) -> List[str]:
  """The split's example ids (VOC's image ids, a folder's list lines) in split order."""
  ds = _read(prepared(data_config), split,
             {'image': tfds.decode.SkipDecoding(), 'label': tfds.decode.SkipDecoding()})
  return [name.decode() for name in tfds.as_numpy(ds.map(lambda ex: ex['file_name']))]


def named_examples(data_config, split: str, ids) -> Dict[str, tuple]:
  """{id: (image [h, w, 3] uint8, label [h, w] uint8)} of the split's examples with these ids
  (`split_ids`'), decoded as for evaluation."""
  wanted = tf.constant(sorted(set(ids)) or [''])
  ds = _read(prepared(data_config), split, _SKIP_IMAGE)
  ds = _decoded(ds.filter(lambda ex: tf.reduce_any(tf.equal(ex['file_name'], wanted))))
  return {ex['file_name'].decode(): (ex['image'], ex['label'][..., 0])
          for ex in tfds.as_numpy(ds)}


def split_images(data_config, split: str, count: int, seed: int = 0):
  """Up to `count` decoded images of a split, [h, w, 3] uint8 each, a seeded random choice.

  For calibrating quantised models on the training data (`seg.inference.calibration`).
  """
  builder = prepared(data_config)
  total = builder.info.splits[split].num_examples
  chosen = set(np.random.default_rng(seed).permutation(total)[:count].tolist())
  ds = _read(builder, split, _SKIP_IMAGE).enumerate()
  ds = ds.filter(lambda i, ex: tf.reduce_any(tf.equal(i, list(chosen) or [-1])))
  return [ex['image'] for ex in tfds.as_numpy(_decoded(ds.map(lambda i, ex: ex)))]
