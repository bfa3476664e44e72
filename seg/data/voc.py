"""TFDS builder for PASCAL VOC 2012 semantic segmentation (VOCdevkit layout).

tensorflow-datasets' own `voc` dataset carries no segmentation masks, hence
this builder. Every config reads a `VOCdevkit/VOC2012` folder: JPEG images,
palette PNG labels read as class indices (never through RGB; 255 = void) and
the split lists in `ImageSets/Segmentation`. The `embedded` config first
writes a generated dataset in that layout (`seg.data.embedded`), so the
out-of-the-box data goes through exactly the reader that real VOC uses.
"""

import dataclasses
import os
from typing import Dict, Iterator, Tuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from seg.data import embedded


@dataclasses.dataclass
class VocSegmentationConfig(tfds.core.BuilderConfig):
  splits: Tuple[str, ...] = ('train', 'val')


class VocSegmentation(tfds.core.GeneratorBasedBuilder):
  """Semantic segmentation examples: image, label (uint8 indices, 255 = void), file name."""

  VERSION = tfds.core.Version('1.2.0')
  RELEASE_NOTES = {
      '1.0.0': 'Embedded generated dataset in the VOC 2012 layout.',
      '1.1.0': 'Embedded: five colour families x four textures.',
      '1.2.0': 'Embedded: coarser textures (period 12 to 20 pixels).',
  }
  BUILDER_CONFIGS = [
      VocSegmentationConfig(
          name='embedded',
          description=f'Generated scenes ({embedded.NUM_TRAIN} train, {embedded.NUM_VAL} val) '
                      'in the VOC 2012 layout; 20 object classes + background.'),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'label': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
        homepage='http://host.robots.ox.ac.uk/pascal/VOC/voc2012/',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> Dict[str, Iterator]:
    root = embedded.write_voc_layout(
        os.path.join(dl_manager.download_dir, f'embedded-{self.VERSION}'))
    return {split: self._generate_examples(root, split) for split in self.builder_config.splits}

  def _generate_examples(self, voc_root: str, split: str):
    for name in read_split_list(voc_root, split):
      image_path = os.path.join(voc_root, 'JPEGImages', name + '.jpg')
      label = read_label_png(os.path.join(voc_root, 'SegmentationClass', name + '.png'))
      yield name, {'image': image_path, 'label': label[..., None], 'file_name': name}


def read_split_list(voc_root: str, split: str) -> list:
  """Image ids listed in `ImageSets/Segmentation/<split>.txt`."""
  path = os.path.join(voc_root, 'ImageSets', 'Segmentation', split + '.txt')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} is missing: is {voc_root} a VOCdevkit/VOC2012 folder?')
  with open(path) as f:
    return [line.strip() for line in f if line.strip()]


def read_label_png(path: str) -> np.ndarray:
  """A VOC palette PNG as class indices: [height, width] uint8, 255 = void."""
  with Image.open(path) as png:
    if png.mode != 'P' and png.mode != 'L':
      raise ValueError(f'{path}: labels must be palette (P) or index (L) PNGs, got {png.mode}')
    return np.array(png, np.uint8)


def get_builder(dataset: str, data_dir: str = '') -> VocSegmentation:
  """The builder of config `dataset` under `data_dir` ('' = TFDS's default)."""
  names = [c.name for c in VocSegmentation.BUILDER_CONFIGS]
  if dataset not in names:
    raise ValueError(f'unknown dataset {dataset!r}; known: {", ".join(names)}')
  return VocSegmentation(config=dataset, data_dir=data_dir or None)


def prepare(dataset: str, data_dir: str = '') -> VocSegmentation:
  """Builds the dataset's TFRecords once (a no-op when already prepared)."""
  builder = get_builder(dataset, data_dir)
  builder.download_and_prepare()
  return builder
