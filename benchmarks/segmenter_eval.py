"""Does `Segmenter.evaluate` (Python) score a model as `main.py eval` does?

    python benchmarks/segmenter_eval.py --workdir runs/quickstart [--dtype float32] \
        [--scales 0.75,1,1.25 --flip]

Runs `main.py eval` on the workdir's val split (embedded VOC, or its dataset folder), then
`Segmenter(workdir).evaluate` on that split's image and label files, then `main.py eval
--images LIST --labels DIR` on them (a list file of the images), and prints one JSON line:
the mIoUs and pixel accuracies, whether the confusion matrices equal eval's, the number of
pixels counted differently, and the seconds each took (the commands' with their start).
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from seg import checkpoint
from seg.predict import Segmenter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_string('workdir', None, 'A trained workdir.', required=True)
flags.DEFINE_string('dtype', 'float32', 'float32, bfloat16 or int8.')
flags.DEFINE_list('scales', None, 'Passes (default: the model\'s eval.scales).')
flags.DEFINE_bool('flip', None, 'Flipped passes (default: the model\'s eval.flip).')
FLAGS = flags.FLAGS


def split_files(config):
  """(image paths, label paths) of the config's val split."""
  data = config.data
  if data.dataset == 'folder':
    root = data.folder
  elif data.dataset == 'embedded':
    data_dir = data.data_dir or os.path.expanduser('~/tensorflow_datasets')
    root = os.path.join(data_dir, 'downloads', 'embedded-1.2.0', 'VOCdevkit', 'VOC2012')
  else:
    sys.exit(f'{data.dataset}: give a workdir of the embedded dataset or a dataset folder')
  split = data.get('eval_split', 'val') or 'val'
  ids = open(os.path.join(root, 'ImageSets', 'Segmentation', f'{split}.txt')).read().split()
  images = []
  for name in ids:
    found = [f for f in os.listdir(os.path.join(root, 'JPEGImages'))
             if os.path.splitext(f)[0] == name] if data.dataset == 'folder' else [name + '.jpg']
    images.append(os.path.join(root, 'JPEGImages', found[0]))
  return images, [os.path.join(root, 'SegmentationClass', f'{name}.png') for name in ids]


def main(_):
  passes = (['--scales', ','.join(FLAGS.scales)] if FLAGS.scales else []) + (
      [] if FLAGS.flip is None else ['--flip' if FLAGS.flip else '--noflip'])
  report_path = os.path.join(tempfile.mkdtemp(), 'eval.json')
  start = time.time()
  subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), 'eval', '--workdir',
                  FLAGS.workdir, '--dtype', FLAGS.dtype, '--output', report_path] + passes,
                 check=True, stdout=subprocess.DEVNULL)
  eval_seconds = time.time() - start
  with open(report_path) as f:
    evaluated = json.load(f)
  images, labels = split_files(checkpoint.load_config(FLAGS.workdir))
  start = time.time()
  model = Segmenter(FLAGS.workdir, dtype=FLAGS.dtype, flip=FLAGS.flip,
                    scales=[float(s) for s in FLAGS.scales] if FLAGS.scales else None)
  report = model.evaluate(images, labels)
  seconds = time.time() - start
  listing = os.path.join(os.path.dirname(report_path), 'images.txt')
  with open(listing, 'w') as f:
    f.write('\n'.join(images) + '\n')
  files_path = os.path.join(os.path.dirname(report_path), 'files.json')
  start = time.time()
  subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), 'eval', '--workdir',
                  FLAGS.workdir, '--dtype', FLAGS.dtype, '--images', listing, '--labels',
                  os.path.dirname(labels[0]), '--output', files_path] + passes,
                 check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  files_seconds = time.time() - start
  with open(files_path) as f:
    from_files = json.load(f)
  a = np.array(evaluated['confusion_matrix'])
  b, c = np.array(report['confusion_matrix']), np.array(from_files['confusion_matrix'])
  print(json.dumps({
      'workdir': FLAGS.workdir, 'dtype': FLAGS.dtype, 'images': len(images),
      'eval_miou': evaluated['miou'], 'segmenter_miou': report['miou'],
      'eval_images_miou': from_files['miou'],
      'eval_pixel_accuracy': evaluated['pixel_accuracy'],
      'segmenter_pixel_accuracy': report['pixel_accuracy'],
      'segmenter_same_confusion_matrix': bool(np.array_equal(a, b)),
      'segmenter_pixels_counted_differently': int(np.abs(a - b).sum() // 2),
      'eval_images_same_confusion_matrix': bool(np.array_equal(a, c)),
      'eval_seconds': round(eval_seconds, 1), 'segmenter_seconds': round(seconds, 1),
      'eval_images_seconds': round(files_seconds, 1)}))


if __name__ == '__main__':
  app.run(main)
