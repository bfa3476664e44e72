"""`predict --profile`: where the time of a run goes, stage by stage.

Each stage's seconds are summed over every image and thread (decoding and writing run in
threads beside the model, so the sum of the stages can exceed the wall-clock time); the
report divides them by the images processed. 'decode' counts both decodes of a downscaled
image with `--overlay` (the one the network sees, and the full-size pixels under the
overlay).
"""

import contextlib
import threading
import time
from typing import Dict

# The stages in the order an image meets them.
STAGES = ('decode', 'resize', 'network', 'upsample', 'argmax', 'colour', 'encode', 'write')


class Profile:
  """Thread-safe seconds per stage: `with profile.stage('decode'): ...`."""

  def __init__(self):
    self.seconds: Dict[str, float] = {}
    self.calls: Dict[str, int] = {}
    self._lock = threading.Lock()

  @contextlib.contextmanager
  def stage(self, name: str):
    start = time.perf_counter()
    try:
      yield
    finally:
      elapsed = time.perf_counter() - start
      with self._lock:
        self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
        self.calls[name] = self.calls.get(name, 0) + 1

  def format(self, images: int) -> str:
    """A table: stage, total seconds, milliseconds per image."""
    lines = ['profile (seconds summed over threads; ms per image)']
    names = [s for s in STAGES if s in self.seconds] + sorted(set(self.seconds) - set(STAGES))
    for name in names:
      total = self.seconds[name]
      lines.append(f'  {name:<10} {total:>8.2f} s  {1000 * total / max(images, 1):>9.1f} ms')
    return '\n'.join(lines)


class NoProfile:
  """The stand-in when no profile is asked for: stages cost nothing."""

  @contextlib.contextmanager
  def stage(self, name: str):
    yield


NO_PROFILE = NoProfile()
