"""Calibration images: files, patterns and dataset splits, the same choice every time."""

import numpy as np
import pytest
from PIL import Image

from seg.inference.calibration import calibration_images


def _folder(tmp_path, n):
  rng = np.random.default_rng(0)
  images = {}
  for i in range(n):
    image = rng.integers(0, 256, (20 + i, 30, 3), np.uint8)
    Image.fromarray(image).save(tmp_path / f'{i}.png')
    images[image.shape] = image
  (tmp_path / 'broken.jpg').write_bytes(b'not an image')
  return images


def test_a_folder_gives_its_readable_images_in_a_seeded_order(tmp_path, tiny_config):
  images = _folder(tmp_path, 5)
  got = calibration_images(str(tmp_path), tiny_config, count=3, seed=1)
  assert len(got) == 3
  for image in got:  # each is one of the files, pixel for pixel
    np.testing.assert_array_equal(image, images[image.shape])
  again = calibration_images(str(tmp_path), tiny_config, count=3, seed=1)
  assert [g.shape for g in got] == [a.shape for a in again]
  assert len(calibration_images(str(tmp_path / '*.png'), tiny_config, count=50)) == 5


def test_no_readable_image_and_an_unknown_split_are_clear_errors(tmp_path, tiny_config):
  (tmp_path / 'broken.jpg').write_bytes(b'not an image')
  with pytest.raises(ValueError, match='no readable image'):
    calibration_images(str(tmp_path), tiny_config)
  with pytest.raises(ValueError, match='neither a file, folder or pattern nor a split'):
    calibration_images('tain', tiny_config)


def test_a_dataset_split_gives_decoded_examples(tiny_config):
  got = calibration_images('train', tiny_config, count=4)
  assert len(got) == 4 and all(g.dtype == np.uint8 and g.shape[2] == 3 for g in got)
  assert all(96 <= max(g.shape[:2]) <= 160 for g in got)  # the embedded images' sizes
