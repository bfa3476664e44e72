"""What a `predict` run writes and how it treats large images (the command's options)."""

import dataclasses

LARGE_IMAGE_POLICIES = ('resize', 'tile')
PROBABILITY_FORMATS = ('none', 'float16', 'uint8')
TILE_OVERLAP = 64            # pixels shared by neighbouring tiles (policy 'tile')


@dataclasses.dataclass
class Options:
  """Options of a `predict` run.

  overwrite: redo inputs whose outputs exist (default: skip them, so a run resumes).
  overlay: also write NAME_overlay.jpg; probabilities: also NAME_prob.npy ('float16'/'uint8').
  large_images: images with a side above `max_side` are 'resize'd to fit or cut into 'tile's.
  workers: decoding threads, and as many writing threads.
  """
  overwrite: bool = False
  overlay: bool = False
  probabilities: str = 'none'   # PROBABILITY_FORMATS
  large_images: str = 'resize'  # LARGE_IMAGE_POLICIES
  max_side: int = 2049
  workers: int = 2
  profile: bool = False         # time every stage and print the breakdown (`seg.predict.profile`)

  def __post_init__(self):
    if self.probabilities not in PROBABILITY_FORMATS:
      raise ValueError(f'probabilities must be one of {PROBABILITY_FORMATS}, '
                       f'got {self.probabilities!r}')
    if self.large_images not in LARGE_IMAGE_POLICIES:
      raise ValueError(f'large images policy must be one of {LARGE_IMAGE_POLICIES}, '
                       f'got {self.large_images!r}')
    if self.max_side < 2 * TILE_OVERLAP + 1 and self.large_images == 'tile':
      raise ValueError(f'max_side must exceed {2 * TILE_OVERLAP} to tile')
    if self.max_side < 1 or self.workers < 1:
      raise ValueError('max_side and workers must be positive')

  @property
  def want_probabilities(self) -> bool:
    return self.probabilities != 'none'
