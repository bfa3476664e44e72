"""Feeding the devices: uint8 crops with their boxes, each process's own share of the split and
its own augmentation draws, batches prefetched onto the devices."""

import hashlib

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from seg import parallel
from seg.data import pipeline, voc
from seg.preprocessing import MEAN_PIXEL, preprocess, preprocess_in_box


def test_uint8_crops_normalise_as_float_crops(tiny_config):
  data = tiny_config.data
  data.min_scale, data.max_scale = 0.25, 1.0   # small scales: crops with padding
  floats = next(pipeline.train_batches(data, 8, seed=0))
  uint8 = next(pipeline.train_batches(data, 8, seed=0, as_uint8=True))
  assert uint8['image'].dtype == np.uint8 and floats['image'].dtype == np.float32
  np.testing.assert_array_equal(uint8['label'], floats['label'])   # the same draws
  # Outside a box the float crop is the mean-pixel padding, and inside it the uint8 crop is
  # the float crop rounded.
  rows = np.arange(data.crop_size)[None, :, None]
  cols = np.arange(data.crop_size)[None, None, :]
  b = uint8['valid'][:, :, None, None]
  inside = (rows >= b[:, 0]) & (rows < b[:, 1]) & (cols >= b[:, 2]) & (cols < b[:, 3])
  assert (~inside).sum() > 1000 and inside.sum() > 1000   # both kinds of pixels are there
  assert np.all(floats['image'][~inside] == MEAN_PIXEL)
  assert np.all(floats['label'][~inside] == data.ignore_label)
  np.testing.assert_array_equal(uint8['image'][inside],
                                np.round(np.clip(floats['image'][inside], 0, 255)))
  # On the device: the same network input, to the rounding (half a grey level).
  ours = np.asarray(preprocess_in_box(uint8['image'], uint8['valid']))
  theirs = np.asarray(preprocess(floats['image']))
  assert np.all(ours[~inside] == 0) and np.all(theirs[~inside] == 0)
  assert np.max(np.abs(ours - theirs)) <= 0.5 / MEAN_PIXEL + 1e-6


def _hashes(builder, split):
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()})
  return [hashlib.sha1(ex['image']).hexdigest() for ex in tfds.as_numpy(ds)]


def test_each_process_reads_its_own_share(tiny_config):
  builder = voc.prepare(tiny_config.data.dataset, tiny_config.data.data_dir)
  split = tiny_config.data.train_split
  assert pipeline.process_split(split, 0, 1) == split
  whole = _hashes(builder, split)
  shares = [_hashes(builder, pipeline.process_split(split, i, 3)) for i in range(3)]
  assert sorted(sum(shares, [])) == sorted(whole)        # every example, exactly once
  assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_augmentation_draws_depend_on_the_process():
  seeds = lambda i, n: [tuple(pipeline.augmentation_seed(7, k, i, n).numpy()) for k in range(50)]
  assert seeds(0, 1) == [(7, k) for k in range(50)]     # one process: as before
  two = seeds(0, 2) + seeds(1, 2)
  assert len(set(two)) == 100                            # no two examples share a draw
  # And the draws themselves differ: the scale of the k-th example of each process.
  draw = lambda s: float(tf.random.stateless_uniform([], tf.constant(s, tf.int64)))
  assert sum(draw(a) != draw(b) for a, b in zip(seeds(0, 2), seeds(1, 2))) == 50


def test_prefetch_puts_sharded_batches_on_the_devices():
  batches = [{'image': np.full((8, 3, 3, 3), i, np.uint8), 'valid': np.full((8, 4), i)}
             for i in range(5)]
  got = list(parallel.prefetch_to_device(iter(batches), 2))
  assert len(got) == 5
  for i, batch in enumerate(got):
    assert isinstance(batch['image'], jax.Array) and batch['image'].dtype == np.uint8
    assert batch['image'].shape == (4, 2, 3, 3, 3)
    assert len(batch['image'].sharding.device_set) == jax.local_device_count() == 4
    np.testing.assert_array_equal(np.asarray(batch['valid']), np.full((4, 2, 4), i))

