"""Synthetic phone-sized photos: embedded images upscaled to 12 MP or 48 MP, with texture.

    python benchmarks/large_photos.py --output /tmp/photos12 --size 4032x3024 --count 8
    python benchmarks/large_photos.py --output /tmp/photos48 --size 8000x6000 --count 2
    python benchmarks/large_photos.py --output /tmp/p12 --count 8 --copies 3   (24 files)

Each photo is an embedded train image (`--split`) upscaled (bicubic) to `--size`, plus
fine Gaussian grain (sigma `--grain`), so that the JPEG (quality 92) has roughly the file
size of a phone photo (a smooth upscale alone compresses far better than any photo; the
grain makes the decoder's work realistic). Stand-ins for speed, not for accuracy.
`--copies N` writes each photo N times (photo_000.jpg, photo_000_copy1.jpg, ...): more files
for a steadier rate without the time of making more photos.
"""

import os
import shutil

import numpy as np
from absl import app, flags
from PIL import Image

EMBEDDED = os.path.expanduser('~/tensorflow_datasets/downloads/embedded-1.2.0/VOCdevkit/VOC2012')

flags.DEFINE_string('output', None, 'Folder to write the JPEGs to.', required=True)
flags.DEFINE_string('size', '4032x3024', 'WIDTHxHEIGHT of each photo.')
flags.DEFINE_integer('count', 8, 'Number of photos.')
flags.DEFINE_float('grain', 6.0, 'Standard deviation of the added grain (0-255 scale).')
flags.DEFINE_string('split', 'train', 'Embedded split the photos are made from.')
flags.DEFINE_integer('copies', 1, 'Files written of each photo (the same bytes).')
FLAGS = flags.FLAGS


def main(_):
  width, height = (int(v) for v in FLAGS.size.split('x'))
  os.makedirs(FLAGS.output, exist_ok=True)
  with open(os.path.join(EMBEDDED, 'ImageSets', 'Segmentation', f'{FLAGS.split}.txt')) as f:
    names = f.read().split()
  rng = np.random.default_rng(0)
  for i in range(FLAGS.count):
    source = Image.open(os.path.join(EMBEDDED, 'JPEGImages', names[i] + '.jpg')).convert('RGB')
    big = np.asarray(source.resize((width, height), Image.Resampling.BICUBIC), np.float32)
    for r in range(0, height, 512):  # grain in strips: bounded float temporaries
      strip = big[r:r + 512]
      strip += rng.normal(0, FLAGS.grain, strip.shape).astype(np.float32)
    path = os.path.join(FLAGS.output, f'photo_{i:03d}.jpg')
    Image.fromarray(np.clip(big, 0, 255).astype(np.uint8)).save(path, quality=92)
    print(path, os.path.getsize(path) // 1024, 'KiB', flush=True)
    for copy in range(1, FLAGS.copies):
      shutil.copyfile(path, os.path.join(FLAGS.output, f'photo_{i:03d}_copy{copy}.jpg'))


if __name__ == '__main__':
  app.run(main)
