"""What a `predict` run writes and how it treats large images (the command's options)."""

import dataclasses
from typing import Optional, Tuple

import numpy as np

from seg.predict.memory import DEFAULT_BUDGET

LARGE_IMAGE_POLICIES = ('resize', 'tile')
PROBABILITY_FORMATS = ('none', 'float16', 'uint8')
TILE_OVERLAP = 64            # pixels shared by neighbouring tiles (policy 'tile')


@dataclasses.dataclass
class Options:
  """Options of a `predict` run.

  overwrite: redo inputs whose outputs exist (default: skip them, so a run resumes).
  overlay: also write NAME_overlay.jpg; probabilities: also NAME_prob.npy ('float16'/'uint8').
  large_images: images with a side above `max_side` are 'resize'd to fit or cut into 'tile's;
    max_side None: the model's `config.data.predict_max_side`, by default its eval size
    (`config.data.eval_size`), or a folder's largest eval image when larger.
  workers: decoding threads, and as many writing threads.
  memory_budget: bytes the whole process may hold (`seg.predict.memory`).
  shard: (index, count): only the inputs whose relative path hashes to `index` of `count`
    (`seg.predict.files.shard_of`).
  """
  overwrite: bool = False
  overlay: bool = False
  probabilities: str = 'none'   # PROBABILITY_FORMATS
  large_images: str = 'resize'  # LARGE_IMAGE_POLICIES
  max_side: Optional[int] = None
  workers: int = 2
  memory_budget: int = DEFAULT_BUDGET
  shard: Tuple[int, int] = (0, 1)
  profile: bool = False         # time every stage and print the breakdown (`seg.predict.profile`)
  # [256, 3] uint8 colours of the classes in the masks; None: the model's (`predict_paths`:
  # its config.data.class_colours), else VOC's.
  palette: Optional[np.ndarray] = None

  def __post_init__(self):
    if self.probabilities not in PROBABILITY_FORMATS:
      raise ValueError(f'probabilities must be one of {PROBABILITY_FORMATS}, '
                       f'got {self.probabilities!r}')
    if self.large_images not in LARGE_IMAGE_POLICIES:
      raise ValueError(f'large images policy must be one of {LARGE_IMAGE_POLICIES}, '
                       f'got {self.large_images!r}')
    if self.max_side is not None:
      if self.max_side < 2 * TILE_OVERLAP + 1 and self.large_images == 'tile':
        raise ValueError(f'max_side must exceed {2 * TILE_OVERLAP} to tile')
      if self.max_side < 1:
        raise ValueError('max_side must be positive')
    if self.workers < 1:
      raise ValueError('workers must be positive')
    if self.palette is not None and np.shape(self.palette) != (256, 3):
      raise ValueError(f'palette must be [256, 3] colours, got shape {np.shape(self.palette)}')
    index, count = self.shard
    if not 0 <= index < count:
      raise ValueError(f'--shard {index}/{count}: give K/N with 0 <= K < N')

  @property
  def want_probabilities(self) -> bool:
    return self.probabilities != 'none'
