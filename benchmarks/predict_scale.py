"""What the processing scale of `predict` does to mIoU on large photos (stand-ins).

    python benchmarks/predict_scale.py --workdir runs/qs [--count 150] [--factors 4,8] \
        [--scales 0.75,1,1.25 --flip]

The embedded val images (<= 160 pixels) upscaled by each factor (bicubic, saved as JPEG
quality 92) stand in for large photos; their labels are upscaled with nearest neighbours.
Each setting of `predict` (--large-images=resize at several --max-side, and tile) writes
masks for them, and the script prints one JSON line per (factor, setting): the mIoU over the
21 classes (one confusion matrix over every labelled pixel, as `eval` counts) and seconds.
The row `factor 1` is the images at their own size (what `eval` scores). `--scales` and
`--flip` run every setting with that multi-scale / flipped inference (`predict --scales`);
`--factors=` (empty) runs only factor 1.
"""

import json
import os
import tempfile
import time

import numpy as np
from absl import app, flags
from PIL import Image

EMBEDDED = os.path.expanduser('~/tensorflow_datasets/downloads/embedded-1.2.0/VOCdevkit/VOC2012')

flags.DEFINE_string('workdir', None, 'A trained workdir.', required=True)
flags.DEFINE_integer('count', 150, 'Val images used (the first ones of val.txt).')
flags.DEFINE_string('factors', '4,8', 'Upscaling factors.')
flags.DEFINE_list('scales', ['1'], 'Inference scales (predict --scales).')
flags.DEFINE_bool('flip', False, 'Also the flipped images (predict --flip).')
FLAGS = flags.FLAGS


def _miou(masks_dir, names, labels):
  confusion = np.zeros((21, 21), np.int64)
  for name in names:
    mask = np.asarray(Image.open(os.path.join(masks_dir, name + '.png')))
    label = labels[name]
    valid = label < 21
    confusion += np.bincount(label[valid].astype(np.int64) * 21 + mask[valid],
                             minlength=21 * 21).reshape(21, 21)
  iou = np.diag(confusion) / np.maximum(confusion.sum(0) + confusion.sum(1) - np.diag(confusion), 1)
  present = confusion.sum(1) > 0
  return float(iou[present].mean())


def main(_):
  from seg.inference.engine import Engine, batch_devices
  from seg.predict import Options, predict_paths
  scales = tuple(float(s) for s in FLAGS.scales)
  engine, step = Engine.from_workdir(FLAGS.workdir, batch_size=8, devices=batch_devices(),
                                     scales=scales, flip=FLAGS.flip)
  eval_size = engine.eval_size
  with open(os.path.join(EMBEDDED, 'ImageSets', 'Segmentation', 'val.txt')) as f:
    names = f.read().split()[:FLAGS.count]
  with tempfile.TemporaryDirectory() as tmp:
    for factor in [1] + [int(v) for v in FLAGS.factors.split(',') if v]:
      folder = os.path.join(tmp, f'x{factor}')
      os.makedirs(folder)
      labels = {}
      for name in names:
        image = Image.open(os.path.join(EMBEDDED, 'JPEGImages', name + '.jpg')).convert('RGB')
        label = Image.open(os.path.join(EMBEDDED, 'SegmentationClass', name + '.png'))
        size = (image.width * factor, image.height * factor)
        if factor == 1:
          image.save(os.path.join(folder, name + '.png'))  # lossless: the eval pixels
        else:
          image.resize(size, Image.Resampling.BICUBIC).save(os.path.join(folder, name + '.jpg'),
                                                            quality=92)
        labels[name] = np.asarray(label.resize(size, Image.Resampling.NEAREST))
      longest = max(max(l.shape) for l in labels.values())
      sides = sorted({eval_size, 2 * eval_size - 1, 4 * eval_size - 3, 8 * eval_size - 7})
      settings = [('resize', s) for s in sides if s < longest] + [('resize', longest)]
      if factor > 1:
        settings.append(('tile', eval_size))
      for policy, side in settings:
        out = os.path.join(tmp, f'out{factor}_{policy}_{side}')
        start = time.perf_counter()
        failures = predict_paths(FLAGS.workdir, folder, out,
                                 Options(large_images=policy, max_side=side), engine=engine,
                                 log=lambda *_: None, progress_stream=open(os.devnull, 'w'))
        seconds = time.perf_counter() - start
        print(json.dumps({'factor': factor, 'largest_side': longest, 'policy': policy,
                          'max_side': side, 'images': len(names), 'failures': failures,
                          'miou': round(100 * _miou(out, names, labels), 2),
                          'seconds': round(seconds, 1), 'scales': scales,
                          'flip': FLAGS.flip, 'workdir': FLAGS.workdir,
                          'step': step}), flush=True)


if __name__ == '__main__':
  app.run(main)
