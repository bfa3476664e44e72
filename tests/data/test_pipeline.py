"""DeepLab augmentation and padded evaluation batches."""

import glob
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from helpers import ROOT
from seg.data import pipeline, voc

CROP = 65


def _quadrants(h=48, w=40):
  """Labels 1..4 in quadrants, a void band, and an image whose red channel encodes the label."""
  label = np.zeros((h, w), np.uint8)
  label[:h // 2, :w // 2], label[:h // 2, w // 2:] = 1, 2
  label[h // 2:, :w // 2], label[h // 2:, w // 2:] = 3, 4
  label[:, w // 2 - 1:w // 2 + 1] = 255
  image = np.zeros((h, w, 3), np.uint8)
  image[..., 0] = np.where(label == 255, 0, label * 50)
  image[..., 1] = 200
  return image, label


@pytest.mark.parametrize('seed', range(12))
def test_augmentation_keeps_image_and_label_aligned(seed):
  image, label = _quadrants()
  out_image, out_label = pipeline.augment(
      tf.constant(image), tf.constant(label[..., None]), tf.constant([seed, 7], tf.int64),
      crop_size=CROP, min_scale=0.5, max_scale=2.0, scale_step=0.25)
  out_image, out_label = out_image.numpy(), out_label.numpy()
  assert out_image.shape == (CROP, CROP, 3) and out_label.shape == (CROP, CROP)
  # Every pixel of the original has green 200 (also after bilinear scaling); every other one
  # is padding: mean pixel in all three channels, label 255. The padding lies at the bottom
  # and right, so the crop keeps min(h, CROP) x min(w, CROP) pixels of the scaled original
  # (h, w for one of the scales): a wrong padding value breaks one of the two.
  original = np.abs(out_image[..., 1] - 200) < 0.5
  padded = ~original
  np.testing.assert_array_equal(out_image[padded], pipeline.MEAN_PIXEL)
  assert np.all(out_label[padded] == 255)
  h, w = label.shape
  kept = {min(int(h * s), CROP) * min(int(w * s), CROP) for s in np.arange(0.5, 2.01, 0.25)}
  assert original.sum() in kept, (original.sum(), kept)
  # Interior pixels (a 3x3 neighbourhood of one class) carry their class in the red channel.
  from scipy import ndimage
  same = (ndimage.maximum_filter(out_label, 3) == ndimage.minimum_filter(out_label, 3))
  interior = same & (out_label != 255)
  assert interior.sum() > 50
  np.testing.assert_allclose(out_image[..., 0][interior], 50.0 * out_label[interior], atol=1.0)
  # Layout survives (up to a flip): class 1 above 3, and 1 beside 2.
  rows, cols = np.nonzero(interior)
  cls = out_label[rows, cols]
  if {1, 3} <= set(cls):
    assert rows[cls == 1].mean() < rows[cls == 3].mean()


def test_augmentation_flips_and_scales():
  image, label = _quadrants()
  left_is_1, sizes = set(), set()
  for seed in range(30):
    out_image, out_label = pipeline.augment(
        tf.constant(image), tf.constant(label[..., None]), tf.constant([seed, 0], tf.int64),
        crop_size=CROP, min_scale=0.5, max_scale=2.0, scale_step=0.25)
    out_label = out_label.numpy()
    ones, twos = np.nonzero(out_label == 1), np.nonzero(out_label == 2)
    if len(ones[1]) and len(twos[1]):
      left_is_1.add(bool(ones[1].mean() < twos[1].mean()))
    sizes.add(int(np.sum(out_label != 255)))
  assert left_is_1 == {True, False}   # both orientations occur
  assert len(sizes) > 3               # several scales occur


def test_eval_batches_count_every_image_once(tiny_config):
  config = tiny_config
  total = pipeline.num_examples(config.data, 'val')
  batch = 16    # does not divide 150: the last batch is padded
  [voc_root] = glob.glob(os.path.join(config.data.data_dir, 'downloads', 'embedded-*',
                                      'VOCdevkit', 'VOC2012'))
  ids = pipeline.split_ids(config.data, 'val')   # in the split's (TFDS's) order
  assert sorted(ids) == sorted(voc.read_split_list(voc_root, 'val'))
  seen, batches, indices = 0, 0, []
  for b in pipeline.eval_batches(config.data, batch, 'val'):
    batches += 1
    indices += b['index'].tolist()
    assert np.all((b['index'] >= 0) == (b['mask'] > 0))   # padding examples are -1
    # Each example's index names its id: the label file of that id is the batch's label.
    for label, (h, w), index in zip(b['label'], b['size'], b['index']):
      if index >= 0:
        png = os.path.join(voc_root, 'SegmentationClass', ids[index] + '.png')
        np.testing.assert_array_equal(label[:h, :w], voc.read_label_png(png))
    assert b['image'].shape == (batch, config.data.eval_size, config.data.eval_size, 3)
    assert b['image'].dtype == np.uint8    # 4x fewer bytes to the device than float32
    assert b['label'].shape == (batch, config.data.eval_size, config.data.eval_size)
    seen += int(b['mask'].sum())
    assert np.all(b['label'][b['mask'] == 0] == 255)
    # Beyond each image's size, the label is padding (ignore label), and inside it is not
    # all padding: `size` is where the pixels are.
    for label, (h, w), valid in zip(b['label'], b['size'], b['mask']):
      assert (np.all(label[h:] == 255) and np.all(label[:, w:] == 255)
              and (not valid or np.any(label[:h, :w] != 255)))
  assert seen == total == 150
  assert batches == -(-total // batch)
  assert sorted(i for i in indices if i >= 0) == list(range(total))


def test_a_split_read_in_part_ends_without_a_warning(data_dir):
  """TensorBoard's panels read one val batch: TFDS's own cache of the split then ended every
  `train` with TF's warning that its partially cached contents were discarded. (A process of
  its own: the tests' TF_CPP_MIN_LOG_LEVEL hides warnings, main.py's shows them.)"""
  script = ('import gc, sys; from seg.data import pipeline; from experiments import tiny; '
            'c = tiny.get_config(); c.data.data_dir = sys.argv[1]; '
            'b = pipeline.eval_batches(c.data, 2, "val"); print(next(b)["image"].shape[0]); '
            'b.close(); del b; gc.collect()')
  result = subprocess.run([sys.executable, '-c', script, data_dir], cwd=ROOT,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='1'),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip() == '2'
  assert 'cache' not in result.stderr, result.stderr


def test_eval_shards_give_every_process_the_same_steps(tiny_config):
  counts, steps = [], []
  for index in range(4):
    batches = list(pipeline.eval_batches(tiny_config.data, 16, 'val', index, 4))
    steps.append(len(batches))
    counts.append(sum(int(b['mask'].sum()) for b in batches))
  assert len(set(steps)) == 1
  assert sum(counts) == 150


def test_labels_are_read_as_palette_indices(data_dir):
  builder = voc.get_builder('embedded', data_dir)
  for example in builder.as_dataset(split='train').take(5):
    values = set(np.unique(example['label'].numpy()))
    assert values <= set(range(21)) | {255}
    assert 255 in values and 0 in values


def test_eval_images_larger_than_eval_size_are_kept_whole(tiny_config):
  """With eval_size below some images' size, those come in batches of one larger square."""
  config = tiny_config
  config.data.eval_size = 129
  builder = voc.get_builder('embedded', config.data.data_dir)
  heights, widths, labelled = [], [], 0
  for example in builder.as_dataset(split='val'):
    h, w = example['image'].shape[:2]
    heights.append(h), widths.append(w)
    labelled += int(np.sum(example['label'].numpy() != 255))
  heights, widths = np.array(heights), np.array(widths)
  large = np.maximum(heights, widths) > 129
  assert 0 < large.sum() < len(large)   # both kinds occur in the generated split
  big = lambda n: (n - 1 + 63) // 64 * 64 + 1
  side = big(max(heights[large].max(), widths[large].max()))
  large_shape = (side, side)   # one square: `predict` pads such images to it too

  shapes = []
  for index in range(2):
    seen = {}
    for b in pipeline.eval_batches(config.data, 8, 'val', index, 2):
      assert b['image'].shape[:3] == b['label'].shape
      seen.setdefault(b['image'].shape[1:3], []).append(b)
    shapes.append({shape: len(batches) for shape, batches in seen.items()})
    for shape, batches in seen.items():
      masks = np.concatenate([b['mask'] for b in batches])
      labels = np.concatenate([b['label'] for b in batches])
      labelled -= int(np.sum(labels[masks == 1] != 255))
      assert np.all(labels[masks == 0] == 255)
  assert shapes[0] == shapes[1]             # the same steps of each shape on both processes
  assert set(shapes[0]) == {(129, 129), large_shape}
  assert labelled == 0                      # every labelled pixel of the split, exactly once


@pytest.mark.parametrize('cache', ['encoded', 'none'])
def test_training_stream_is_the_same_whatever_is_cached(tiny_config, cache):
  """data.cache only moves decoding after the shuffle: the batches are identical."""
  decoded = pipeline.train_batches(tiny_config.data, 4, seed=5)
  expected = [next(decoded) for _ in range(3)]
  tiny_config.data.cache = cache
  got = pipeline.train_batches(tiny_config.data, 4, seed=5)
  resumed = next(pipeline.train_batches(tiny_config.data, 4, seed=5, start_step=2))
  for batch, want in zip([next(got) for _ in range(3)] + [resumed], expected + expected[2:]):
    np.testing.assert_array_equal(batch['image'], want['image'])
    np.testing.assert_array_equal(batch['label'], want['label'])
  tiny_config.data.cache = 'pixels'
  with pytest.raises(ValueError, match='data.cache must be one of'):
    next(pipeline.train_batches(tiny_config.data, 4, seed=5))


def _jpeg_files(data_dir, split):
  """The embedded dataset's JPEG files of `split`, in the split list's order."""
  import glob
  [root] = glob.glob(os.path.join(data_dir, 'downloads', 'embedded-*', 'VOCdevkit', 'VOC2012'))
  return [os.path.join(root, 'JPEGImages', name + '.jpg')
          for name in voc.read_split_list(root, split)]


def _holds(crop, image):
  """Whether a training crop (padded at the bottom and right, maybe flipped) holds `image`."""
  h, w = image.shape[:2]
  return (np.array_equal(crop[:h, :w], image)
          or np.array_equal(crop[:h, crop.shape[1] - w:], image[:, ::-1]))


def test_jpegs_decode_as_pillow_decodes_them(tiny_config):
  """Training, eval and predict see the same pixels: the data layer decodes JPEGs exactly
  as Pillow (which `predict` reads with) does, not with TF's default fast IDCT."""
  from PIL import Image
  files = _jpeg_files(tiny_config.data.data_dir, 'val')
  pillow = {os.path.basename(path)[:-4]: np.asarray(Image.open(path).convert('RGB'))
            for path in files}
  # The fast IDCT differs on these files (else this test could not tell the decoders apart).
  fast = tf.io.decode_jpeg(open(files[0], 'rb').read(), channels=3).numpy()
  assert np.mean(fast != pillow[os.path.basename(files[0])[:-4]]) > 0.1
  examples = list(pipeline.split_examples(tiny_config.data, 'val').as_numpy_iterator())
  assert len(examples) == len(pillow) == 150
  for example in examples:
    np.testing.assert_array_equal(example['image'], pillow[example['file_name'].decode()])
  # Eval batches (in the split's order): the same pixels in the corner of each padded image.
  tiny_config.data.eval_size = 513
  seen = 0
  for batch in pipeline.eval_batches(tiny_config.data, 16, 'val'):
    for image, valid in zip(batch['image'], batch['mask']):
      if valid:
        expected = pillow[examples[seen]['file_name'].decode()]
        h, w = expected.shape[:2]
        np.testing.assert_array_equal(image[:h, :w], expected.astype(np.float32))
        seen += 1
  assert seen == 150
  # Training: with one scale (1.0), crop as large as the image and no flip applied, the
  # augmented image holds the Pillow pixels (checked for the 'decoded' and 'encoded' caches).
  train = [np.asarray(Image.open(p).convert('RGB'), np.float32)
           for p in _jpeg_files(tiny_config.data.data_dir, 'train')]
  tiny_config.data.min_scale = tiny_config.data.max_scale = 1.0
  tiny_config.data.crop_size = 161   # the embedded images are at most 160 x 160
  for cache in ('decoded', 'encoded'):
    tiny_config.data.cache = cache
    batch = next(pipeline.train_batches(tiny_config.data, 4, seed=0))
    for crop in batch['image']:
      assert any(_holds(crop, image) for image in train)
