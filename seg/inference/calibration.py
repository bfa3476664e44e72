"""Images for calibrating quantised models (int8 engine, int8 exports): one source, one rule.

    --calibration photos/            a folder (recursive), a glob, a .txt/.lst list, as
    --calibration 'more/**/*.jpg'    `predict --input` takes them
    --calibration train              the config's dataset split of that name

The same images, in the same order, for every consumer: a seeded choice of `count` among
the files (sorted) or the split's examples.
"""

import os
from typing import List

import numpy as np

DEFAULT_COUNT = 200


def calibration_images(source: str, config, count: int = DEFAULT_COUNT,
                       seed: int = 0) -> List[np.ndarray]:
  """Up to `count` RGB images [h, w, 3] uint8 named by `source` (see the module docstring).

  Raises ValueError when `source` holds no readable image.
  """
  if count < 1:
    raise ValueError(f'calibration needs at least one image, got count={count}')
  if not os.path.exists(source) and not any(c in source for c in '*?[,'):
    splits = (config.data.train_split, config.data.eval_split, 'train', 'val')
    if source not in splits:
      raise ValueError(f'--calibration {source}: neither a file, folder or pattern nor a split '
                       f'of the {config.data.dataset!r} dataset ({", ".join(sorted(set(splits)))})')
    from seg.data import pipeline  # TensorFlow only for a dataset split
    images = pipeline.split_images(config.data, source, count, seed)
  else:
    from seg.predict.files import collect_inputs
    from seg.predict.images import load_rgb
    try:
      files = collect_inputs([source]).files
    except FileNotFoundError as e:
      raise ValueError(str(e)) from None
    paths = sorted(f.path for f in files if not f.error)
    order = np.random.default_rng(seed).permutation(len(paths))
    images = []
    for i in order:
      if len(images) == count:
        break
      try:
        images.append(load_rgb(paths[i]))
      except Exception:  # an unreadable file is skipped; none readable is an error below
        continue
  if not images:
    raise ValueError(f'--calibration {source}: no readable image')
  return images
