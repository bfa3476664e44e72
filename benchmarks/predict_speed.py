"""`main.py predict` throughput and peak memory on the embedded JPEGs and one 8000x6000 photo.

    python benchmarks/predict_speed.py --workdir /tmp/p5-tiny [--images DIR]
    python benchmarks/predict_speed.py --random-weights experiments/base.py \
        --images 'DIR/train_000*.jpg' --only-batches
    python benchmarks/predict_speed.py --workdir runs/qs --photos /tmp/p12 --photos /tmp/p48 \
        [--extra=--max-side=2049]

`--photos DIR` (repeatable) runs `predict --profile` on each folder (e.g. the synthetic
phone photos of `benchmarks/large_photos.py`) and on the embedded JPEGs, and prints the
breakdown per stage (ms per image, summed over threads) with the run's images/s and peak RSS;
`--extra` adds flags to those runs (e.g. `--extra=--scales=0.75,1,1.25 --extra=--flip`).

`--random-weights CONFIG` times a model of that config with random weights of
the right shapes (speed does not depend on the values) instead of a workdir.

Runs each variant of the command in a fresh process (compilation included, as
a user sees it) and prints one JSON line per variant: the summary's seconds
and images/s, and the process's peak resident set (`wait4`'s ru_maxrss).
"""

import json
import os
import re
import subprocess
import sys
import tempfile

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBEDDED = os.path.expanduser(
    '~/tensorflow_datasets/downloads/embedded-1.2.0/VOCdevkit/VOC2012/JPEGImages')

flags.DEFINE_string('workdir', None, 'A trained workdir.')
flags.DEFINE_string('images', EMBEDDED, 'Folder of images for the throughput runs.')
flags.DEFINE_string('random-weights', None, 'Experiment file: time its model with random weights.')
flags.DEFINE_bool('only-batches', False, 'Only the batch 8 / batch 1 runs on --images.')
flags.DEFINE_string('write-big-jpeg', None, 'Internal: write the 8000x6000 JPEG here and exit '
                    '(in a process of its own, so that its memory does not count in the runs).')
flags.DEFINE_multi_string('photos', [], 'Folders of photos: profiled runs (see the docstring).')
flags.DEFINE_multi_string('extra', [], 'Extra predict flags for the --photos runs.')
FLAGS = flags.FLAGS


def _big_jpeg(path: str) -> None:
  """An 8000x6000 JPEG with smooth structure (so it compresses like a photo)."""
  import numpy as np
  from PIL import Image
  yy, xx = np.mgrid[:6000, :8000].astype(np.float32)
  image = np.stack([(np.sin(xx / 300) + 1) * 127, (np.cos(yy / 200) + 1) * 127,
                    (xx + yy) % 256], -1).astype(np.uint8)
  Image.fromarray(image).save(path, quality=90)


def _random_workdir(config_file: str, workdir: str) -> None:
  """A workdir holding `config_file`'s model with random weights (for timing only)."""
  import jax
  import numpy as np
  from seg import checkpoint
  from seg.config import load_experiment
  from seg.model import create_model
  config = load_experiment(os.path.join(ROOT, config_file))
  model = create_model(config.model)
  rng = np.random.default_rng(0)
  # Positive variances: a negative one would make the folded weights NaN (and NaN masks
  # compress and run unlike real ones).
  fill = lambda path, leaf: (rng.uniform(0.5, 1.5, leaf.shape) if path[-1].key == 'var' else
                             rng.normal(0, 0.05, leaf.shape)).astype(np.float32)
  variables = jax.tree_util.tree_map_with_path(fill, checkpoint.abstract_variables(model))
  checkpoint.save_config(workdir, config)
  manager = checkpoint.create_manager(workdir)
  checkpoint.save(manager, 0, variables, {'step': np.int32(0)})
  manager.wait_until_finished()


def _run(name: str, args, output: str) -> dict:
  command = [sys.executable, 'main.py', 'predict', '--workdir', FLAGS.workdir,
             '--output', output, *args]
  process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
  stdout = process.stdout.read()
  _, status, usage = os.wait4(process.pid, 0)
  seconds, rate = re.search(r'time\s+([\d.]+) s\s+\(([\d.]+) images/s\)', stdout).groups()
  record = {'variant': name, 'exit_status': os.waitstatus_to_exitcode(status),
            'seconds': float(seconds), 'images_per_s': float(rate),
            'peak_rss_mib': round(usage.ru_maxrss / 1024)}
  stages = dict(re.findall(r'^  (\w+)\s+[\d.]+ s\s+([\d.]+) ms$', stdout, re.M))
  if stages:
    record['ms_per_image'] = {k: float(v) for k, v in stages.items()}
  return record


def main(_):
  if FLAGS['write-big-jpeg'].value:
    _big_jpeg(FLAGS['write-big-jpeg'].value)
    return
  if not FLAGS.workdir and not FLAGS['random-weights'].value:
    raise app.UsageError('--workdir or --random-weights required')
  with tempfile.TemporaryDirectory() as tmp:
    if FLAGS['random-weights'].value:
      FLAGS.workdir = os.path.join(tmp, 'random')
      _random_workdir(FLAGS['random-weights'].value, FLAGS.workdir)
    if FLAGS.photos:
      runs = [(f'{folder} {" ".join(FLAGS.extra)}'.strip(),
               ['--input', folder, '--profile', *FLAGS.extra]) for folder in FLAGS.photos]
      runs.append((f'embedded JPEGs {" ".join(FLAGS.extra)}'.strip(),
                   ['--input', FLAGS.images, '--profile', *FLAGS.extra]))
      for i, (name, args) in enumerate(runs):
        print(json.dumps(_run(name, args, os.path.join(tmp, f'photos{i}'))), flush=True)
      return
    if FLAGS['only-batches'].value:
      for i, batch in enumerate((8, 1)):
        print(json.dumps(_run(f'batch {batch}', ['--input', FLAGS.images, f'--batch-size={batch}'],
                              os.path.join(tmp, f'out{i}'))), flush=True)
      return
    big = os.path.join(tmp, 'big', 'big.jpg')
    os.makedirs(os.path.dirname(big))
    subprocess.run([sys.executable, os.path.abspath(__file__), '--write-big-jpeg', big],
                   check=True)
    variants = [
        ('folder, batch 8', ['--input', FLAGS.images]),
        ('folder, batch 1', ['--input', FLAGS.images, '--batch-size=1']),
        ('folder, batch 8, --overlay', ['--input', FLAGS.images, '--overlay']),
        ('8000x6000, resize to 2049', ['--input', big]),
        ('8000x6000, tiles of 1025, --overlay',
         ['--input', big, '--large-images=tile', '--max-side=1025', '--overlay']),
    ]
    for i, (name, args) in enumerate(variants):
      print(json.dumps(_run(name, args, os.path.join(tmp, f'out{i}'))), flush=True)


if __name__ == '__main__':
  app.run(main)
