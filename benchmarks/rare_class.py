"""A rare class on your own data: DeepLab's label weights and hard pixel mining against the
plain loss, over seeds.

    python benchmarks/rare_class.py [--root runs/rare] [--seeds 0 1 2] [--steps 600]
        [--settings plain weights mining ramp] [--weight 5] [--top-k 0.25] [--report-only]

Writes a dataset folder in the VOC layout (ROOT/folder: 160x120 JPEGs, palette PNG labels,
`labelmap.txt` with three names): a textured background, one or two large ellipses
("blob", about a tenth of the pixels) and a few small discs of a nearby colour ("speck",
about 1% of the pixels). Then for each setting and seed it runs

    python main.py train --config experiments/quickstart.py --workdir ROOT/SETTING_STEPS_seedS
        --config.data.dataset=folder --config.data.folder=ROOT/folder
        --config.model.num_classes=3 --config.train.steps=STEPS --config.train.seed=S [...]

with `--config.train.label_weights='(1, 1, WEIGHT)'` (weights),
`--config.train.top_k_percent_pixels=TOP_K` (mining: from the first step) or that with
`--config.train.hard_example_mining_step=STEPS/2` (ramp: from all pixels to TOP_K over the
first half), and prints each run's val mIoU and
per-class IoU (WORKDIR/eval.json), then min / mean / max per setting. A workdir that holds an
eval.json is read back, not trained again. Stand-alone: imports nothing from the project.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ('background', 'blob', 'speck')
SIZE = (160, 120)  # width, height


def _image(rng: np.random.Generator):
  """One image and its label: background texture, ellipses (1), small discs (2)."""
  w, h = SIZE
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  base = rng.uniform(60, 140, 3)
  slope = rng.uniform(-0.4, 0.4, (2, 3))
  image = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
  image += rng.normal(0, 12, (h, w, 3))
  label = np.zeros((h, w), np.uint8)
  for _ in range(rng.integers(1, 3)):
    cx, cy = rng.uniform(20, w - 20), rng.uniform(20, h - 20)
    ax, ay = rng.uniform(14, 32), rng.uniform(12, 26)
    inside = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1
    image[inside] = rng.uniform([170, 60, 40], [210, 100, 80]) + rng.normal(0, 10, (
        inside.sum(), 3))
    label[inside] = 1
  for _ in range(rng.integers(2, 6)):
    cx, cy, r = rng.uniform(6, w - 6), rng.uniform(6, h - 6), rng.uniform(2.5, 4.5)
    inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    image[inside] = rng.uniform([150, 110, 40], [190, 150, 80]) + rng.normal(0, 10, (
        inside.sum(), 3))
    label[inside] = 2
  return np.clip(image, 0, 255).astype(np.uint8), label


def write_folder(folder: str, train: int = 120, val: int = 60, seed: int = 0) -> dict:
  """The dataset in the VOC layout; returns each class's share of the pixels."""
  rng = np.random.default_rng(seed)
  for sub in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'):
    os.makedirs(os.path.join(folder, sub), exist_ok=True)
  palette = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 9)
  counts = np.zeros(3, np.int64)
  for split, n in (('train', train), ('val', val)):
    ids = [f'{split}_{i:03d}' for i in range(n)]
    for name in ids:
      image, label = _image(rng)
      counts += np.bincount(label.ravel(), minlength=3)
      Image.fromarray(image).save(os.path.join(folder, 'JPEGImages', name + '.jpg'), quality=92)
      png = Image.fromarray(label, 'P')
      png.putpalette(palette)
      png.save(os.path.join(folder, 'SegmentationClass', name + '.png'))
    with open(os.path.join(folder, 'ImageSets', 'Segmentation', split + '.txt'), 'w') as f:
      f.write('\n'.join(ids) + '\n')
  with open(os.path.join(folder, 'labelmap.txt'), 'w') as f:
    f.write('\n'.join(NAMES) + '\n')
  return {name: float(c / counts.sum()) for name, c in zip(NAMES, counts)}


def train(root, setting, seed, steps, weight, top_k):
  workdir = os.path.join(root, f'{setting}_{steps}_seed{seed}')
  report = os.path.join(workdir, 'eval.json')
  if not os.path.exists(report):
    extra = {'plain': [],
             'weights': [f'--config.train.label_weights=(1, 1, {weight})'],
             'mining': [f'--config.train.top_k_percent_pixels={top_k}'],
             'ramp': [f'--config.train.top_k_percent_pixels={top_k}',
                      f'--config.train.hard_example_mining_step={steps // 2}']}[setting]
    command = [sys.executable, os.path.join(ROOT, 'main.py'), 'train',
               '--config', os.path.join(ROOT, 'experiments', 'quickstart.py'),
               '--workdir', workdir, '--config.data.dataset=folder',
               f'--config.data.folder={os.path.join(root, "folder")}',
               f'--config.data.data_dir={os.path.join(root, "tfds")}',
               '--config.model.num_classes=3', f'--config.train.steps={steps}',
               f'--config.train.seed={seed}', *extra]
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode:
      sys.exit(f'{" ".join(command)} failed:\n{done.stdout[-3000:]}')
    print(f'  {setting} seed {seed}: {time.perf_counter() - start:.0f} s', file=sys.stderr)
  with open(report) as f:
    return json.load(f)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--root', default=os.path.join(ROOT, 'runs', 'rare'))
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  parser.add_argument('--steps', type=int, default=600)
  parser.add_argument('--settings', nargs='+', default=['plain', 'weights', 'mining'],
                      choices=['plain', 'weights', 'mining', 'ramp'])
  parser.add_argument('--weight', type=float, default=5.0)
  parser.add_argument('--top-k', type=float, default=0.25)
  parser.add_argument('--report-only', action='store_true')
  args = parser.parse_args()
  folder = os.path.join(args.root, 'folder')
  if not os.path.isdir(folder):
    shares = write_folder(folder)
    print('pixel shares: ' + ', '.join(f'{k} {v:.2%}' for k, v in shares.items()))
  rows = []
  for setting in args.settings:
    for seed in args.seeds:
      workdir = os.path.join(args.root, f'{setting}_{args.steps}_seed{seed}')
      if args.report_only and not os.path.exists(os.path.join(workdir, 'eval.json')):
        continue
      report = train(args.root, setting, seed, args.steps, args.weight, args.top_k)
      iou = report['per_class_iou']
      rows.append((setting, seed, report['miou'], *[iou[n] for n in NAMES]))
  print(f'{"setting":<8} {"seed":>4} {"mIoU":>7} ' + ' '.join(f'{n:>10}' for n in NAMES))
  for row in rows:
    print(f'{row[0]:<8} {row[1]:>4} ' + ' '.join(f'{100 * x:>7.2f}' if i == 0 else
                                                 f'{100 * x:>10.2f}'
                                                 for i, x in enumerate(row[2:])))
  for setting in args.settings:
    mine = [r for r in rows if r[0] == setting]
    if len(mine) < 2:
      continue
    for label, column in (('mIoU', 2), ('speck', 5)):
      values = [100 * r[column] for r in mine]
      print(f'{setting:<8} {label:<5} min {min(values):.2f} mean {statistics.mean(values):.2f} '
            f'max {max(values):.2f}')


if __name__ == '__main__':
  main()
