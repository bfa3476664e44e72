"""Can the input pipeline feed a training step? Augmented 513x513 examples/s vs a step's appetite.

    python benchmarks/input_pipeline.py [--config experiments/voc_mnv2_os16.py] [--images 320]
        [--batches 40] [--step-batch 16] [--step-iters 3] [--data-dir DIR]

Without --data-dir, writes `--images` generated scenes of VOC's image sizes (375 to 500
pixels a side, JPEG) in the VOCdevkit layout to a temporary folder and prepares the
`voc2012` config from it, so that decoding and augmentation cost what they cost on VOC.
With --data-dir, uses the config's dataset already prepared there (e.g. real train_aug).

Then, with the config's augmentation (513 crops, scales 0.5-2.0):
  1. the real `train_batches` pipeline: examples/s over the first pass (JPEG decoding included)
     and once the split is cached (augmentation only), on all of this machine's cores;
  2. one training step of the config's model on an in-memory batch of --step-batch examples:
     seconds per step, hence the examples/s it consumes.
Prints a JSON line with both and their ratio (> 1: the pipeline keeps up). Runs under mimalloc
like main.py (SEG_ALLOCATOR=system for glibc's malloc).
"""

import json
import os
import sys
import tempfile
import time

from absl import app, flags, logging
from ml_collections import config_flags

from seg.cli import process

config_flags.DEFINE_config_file('config', 'experiments/voc_mnv2_os16.py', 'Experiment file.')
flags.DEFINE_integer('images', 320, 'Generated training images (without --data-dir).')
flags.DEFINE_integer('batches', 40, 'Timed batches of the cached phase.')
flags.DEFINE_integer('step_batch', 16, 'Examples per timed training step.')
flags.DEFINE_integer('step_iters', 3, 'Timed training steps (after one warm-up step).')
flags.DEFINE_string('data_dir', '', 'A TFDS data_dir holding the config\'s prepared dataset.')
FLAGS = flags.FLAGS

VOC_SIZES = (375, 500)   # VOC 2012's images are at most 500 pixels a side, most 500x375


def _generated_voc(root: str, num_images: int) -> str:
  """Prepares `voc2012` from generated VOC-sized scenes under `root`; returns the data_dir."""
  from seg.data import embedded, voc
  voc_root = embedded.write_voc_layout(os.path.join(root, 'manual'), num_train=num_images,
                                       num_val=8, sizes=VOC_SIZES)
  with open(os.path.join(voc_root, 'ImageSets', 'Segmentation', 'trainval.txt'), 'w') as f:
    for split in ('train', 'val'):
      with open(os.path.join(voc_root, 'ImageSets', 'Segmentation', split + '.txt')) as g:
        f.write(g.read())
  data_dir = os.path.join(root, 'tfds')
  voc.prepare('voc2012', data_dir, os.path.join(root, 'manual'))
  return data_dir


def _pipeline_rates(data_config, batch_size: int, first_pass: int, batches: int):
  from seg.data import pipeline
  it = pipeline.train_batches(data_config, batch_size, seed=0)
  t0 = time.perf_counter()
  for _ in range(first_pass):
    next(it)
  first = first_pass * batch_size / (time.perf_counter() - t0)
  t0 = time.perf_counter()
  for _ in range(batches):
    batch = next(it)
  cached = batches * batch_size / (time.perf_counter() - t0)
  assert batch['image'].shape[1:3] == (data_config.crop_size,) * 2
  return first, cached


def _step_seconds(config, batch_size: int, iters: int) -> float:
  import jax
  import numpy as np
  from seg import parallel
  from seg.train import step as step_lib
  from seg.model import create_model
  lr = step_lib.create_learning_rate_fn(config.train)
  state = parallel.replicate(step_lib.create_train_state(
      jax.random.key(0), config, create_model(config.model), lr))
  p_step = step_lib.make_p_train_step(config, lr)
  crop, rng = config.data.crop_size, np.random.default_rng(0)
  batch = parallel.shard({
      'image': rng.uniform(0, 255, (batch_size, crop, crop, 3)).astype(np.float32),
      'label': rng.integers(0, config.model.num_classes, (batch_size, crop, crop), np.uint8)})
  key = parallel.replicate(jax.random.key(0))
  state, metrics = p_step(state, batch, key)      # compile and warm up
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(iters):
    state, metrics = p_step(state, batch, key)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - t0) / iters


def main(_):
  logging.set_verbosity(logging.WARNING)
  import jax
  config = FLAGS.config
  with tempfile.TemporaryDirectory() as root:
    data_config = config.data
    if FLAGS.data_dir:
      data_config.data_dir = FLAGS.data_dir
      num_images = None
    else:
      t0 = time.perf_counter()
      data_config.data_dir = _generated_voc(root, FLAGS.images)
      data_config.dataset, data_config.train_split = 'voc2012', 'train'
      num_images = FLAGS.images
      print(f'generated and prepared {FLAGS.images} VOC-sized images in '
            f'{time.perf_counter() - t0:.0f}s', file=sys.stderr)
    batch_size = FLAGS.step_batch
    first_pass = max(1, (num_images or 10 * batch_size) // batch_size)
    first, cached = _pipeline_rates(data_config, batch_size, first_pass, FLAGS.batches)
  step = _step_seconds(config, FLAGS.step_batch, FLAGS.step_iters)
  consumed = FLAGS.step_batch / step
  print(json.dumps({
      'crop': config.data.crop_size, 'scales': [config.data.min_scale, config.data.max_scale],
      'cpu_cores': os.cpu_count(), 'device': jax.devices()[0].device_kind,
      'allocator': 'mimalloc' if 'mimalloc' in os.environ.get('LD_PRELOAD', '') else 'system',
      'pipeline_first_pass_examples_per_s': round(first, 1),
      'pipeline_cached_examples_per_s': round(cached, 1),
      'step_batch': FLAGS.step_batch, 'step_s': round(step, 3),
      'step_consumes_examples_per_s': round(consumed, 2),
      'pipeline_over_step': round(cached / consumed, 1)}))


if __name__ == '__main__':
  process.reexec_with_mimalloc()  # as the CLI does (seg.cli.process)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  app.run(main)
