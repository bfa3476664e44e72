"""Do `predict`'s masks score what `eval` reports on a dataset folder of larger images?

    python benchmarks/folder_predict.py --output /tmp/fp [--train 300] [--val 60] [--factor 2] \
        [--steps 2000] [--seed 0]

Writes a dataset folder in the VOC layout (as CVAT exports it: JPEGs, colour label PNGs in
VOC's colours, split lists) from the first embedded train and val images upscaled by
`--factor` (bicubic, JPEG quality 92; labels by nearest neighbours), so that its images
(up to 160 x factor pixels) are larger than the quickstart's data.eval_size (161); trains the
quickstart config on it for `--steps` (`main.py train`, as a user would), then runs
`main.py predict` on the val images with its default --max-side and with --max-side at the
eval size, and prints one JSON line per run: the mIoU of the masks against the labels (one
confusion matrix over every labelled pixel, as `eval` counts, computed here in NumPy), the
--max-side used, and `eval`'s own figure from the workdir's eval.json.
"""

import json
import os
import subprocess
import sys

import numpy as np
from absl import app, flags
from PIL import Image

from seg import classes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBEDDED = os.path.expanduser('~/tensorflow_datasets/downloads/embedded-1.2.0/VOCdevkit/VOC2012')

flags.DEFINE_string('output', None, 'A new folder for the dataset, the run and the masks.',
                    required=True)
flags.DEFINE_integer('train', 300, 'Training images (the first of the embedded train split).')
flags.DEFINE_integer('val', 60, 'Val images (the first of the embedded val split).')
flags.DEFINE_integer('factor', 2, 'Upscaling factor of images and labels.')
flags.DEFINE_integer('steps', 2000, 'Training steps.')
flags.DEFINE_integer('seed', 0, 'train.seed')
FLAGS = flags.FLAGS


def _write_folder(root):
  """The folder; returns {val id: label indices}."""
  for sub in ('JPEGImages', 'SegmentationClass', os.path.join('ImageSets', 'Segmentation')):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  palette, val_labels = classes.voc_colormap(), {}   # 255: VOC's void colour
  for split, count in (('train', FLAGS.train), ('val', FLAGS.val)):
    with open(os.path.join(EMBEDDED, 'ImageSets', 'Segmentation', split + '.txt')) as f:
      names = f.read().split()[:count]
    for name in names:
      image = Image.open(os.path.join(EMBEDDED, 'JPEGImages', name + '.jpg')).convert('RGB')
      label = Image.open(os.path.join(EMBEDDED, 'SegmentationClass', name + '.png'))
      size = (image.width * FLAGS.factor, image.height * FLAGS.factor)
      image.resize(size, Image.Resampling.BICUBIC).save(
          os.path.join(root, 'JPEGImages', name + '.jpg'), quality=92)
      indices = np.asarray(label.resize(size, Image.Resampling.NEAREST))
      Image.fromarray(palette[indices]).save(os.path.join(root, 'SegmentationClass',
                                                          name + '.png'))
      if split == 'val':
        val_labels[name] = indices
    with open(os.path.join(root, 'ImageSets', 'Segmentation', split + '.txt'), 'w') as f:
      f.write('\n'.join(names) + '\n')
  return val_labels


def _miou(masks_dir, labels, classes=21):
  confusion = np.zeros((classes, classes), np.int64)
  for name, label in labels.items():
    mask = np.asarray(Image.open(os.path.join(masks_dir, name + '.png')))
    valid = label < classes
    confusion += np.bincount(label[valid].astype(np.int64) * classes + mask[valid],
                             minlength=classes * classes).reshape(classes, classes)
  union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
  return float((np.diag(confusion) / np.maximum(union, 1))[union > 0].mean())   # eval's classes


def _main(*args):
  subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *args], check=True)


def main(_):
  if os.path.exists(FLAGS.output):
    raise SystemExit(f'{FLAGS.output} exists: give a new folder')
  root, workdir = os.path.join(FLAGS.output, 'folder'), os.path.join(FLAGS.output, 'run')
  labels = _write_folder(root)
  _main('train', '--config', os.path.join(ROOT, 'experiments', 'quickstart.py'),
        '--workdir', workdir, '--config.data.dataset=folder', f'--config.data.folder={root}',
        f'--config.data.data_dir={os.path.join(FLAGS.output, "tfds")}',
        f'--config.train.steps={FLAGS.steps}', f'--config.train.seed={FLAGS.seed}')
  with open(os.path.join(workdir, 'config.json')) as f:
    data = json.load(f)['data']
  with open(os.path.join(workdir, 'eval.json')) as f:
    eval_miou = json.load(f)['miou']
  images = os.path.join(FLAGS.output, 'val_images.txt')
  with open(images, 'w') as f:
    f.write(''.join(os.path.join(root, 'JPEGImages', name + '.jpg\n') for name in labels))
  for max_side in (None, data['eval_size']):
    out = os.path.join(FLAGS.output, f'masks_{max_side or "default"}')
    _main('predict', '--workdir', workdir, '--output', out, '--input', images,
          *(['--max-side', str(max_side)] if max_side else []))
    print(json.dumps({
        'max_side': max_side or data.get('predict_max_side') or data['eval_size'],
        'default': max_side is None, 'eval_size': data['eval_size'],
        'predict_max_side': data.get('predict_max_side', 0),
        'largest_side': max(max(label.shape) for label in labels.values()),
        'predict_miou': round(100 * _miou(out, labels), 2),
        'eval_miou': round(100 * eval_miou, 2), 'train': FLAGS.train, 'val': FLAGS.val,
        'factor': FLAGS.factor, 'steps': FLAGS.steps, 'seed': FLAGS.seed}), flush=True)


if __name__ == '__main__':
  app.run(main)
