"""What a `predict` run shows: a progress line while it runs and a one-screen report at the end."""

import dataclasses
import sys
import time
from typing import List, Optional, Tuple


@dataclasses.dataclass
class RunReport:
  """Counts, failures and time of a run; `format` is the summary printed at the end."""
  total: int = 0
  processed: int = 0
  skipped: int = 0
  failures: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
  seconds: float = 0.0
  ignored: int = 0
  duplicates: List[Tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, first)
  interrupted: bool = False
  peak_bytes_held: int = 0  # decoded images held at once, waiting for the model or writers
  max_side: int = 0         # the run's --max-side (default: the model's predict_max_side)
  resized: int = 0          # inputs above it, predicted smaller and brought back to full size
  tiled: int = 0            # inputs above it, cut into tiles (--large-images=tile)

  def format(self, output_dir: str) -> str:
    rate = self.processed / max(self.seconds, 1e-9)
    lines = [f'wrote masks of {self.processed} image(s) to {output_dir}',
             f'  inputs     {self.total:>8,}',
             f'  processed  {self.processed:>8,}',
             f'  skipped    {self.skipped:>8,}  (outputs already there; --overwrite redoes them)',
             f'  failed     {len(self.failures):>8,}',
             f'  time       {self.seconds:>8.1f} s  ({rate:.2f} images/s)']
    if self.resized:
      lines.append(f'  resized    {self.resized:>8,}  above {self.max_side} px: predicted at '
                   f'{self.max_side} px, masks brought back to full size (--max-side; '
                   '`eval` runs images whole)')
    if self.tiled:
      lines.append(f'  tiled      {self.tiled:>8,}  above {self.max_side} px: predicted in '
                   f'tiles of {self.max_side} px')
    if self.ignored:
      lines.append(f'  ignored    {self.ignored:>8,}  files without an image extension in '
                   'input folders')
    if self.duplicates:
      lines.append(f'  duplicates {len(self.duplicates):>8,}  the same file as an earlier input '
                   '(predicted once, under the earlier name)')
      lines += [f'SAME FILE {path} = {first}' for path, first in self.duplicates[:10]]
      if len(self.duplicates) > 10:
        lines.append(f'... and {len(self.duplicates) - 10} more')
    for path, reason in self.failures[:50]:
      lines.append(f'FAILED {path}: {reason}')
    if len(self.failures) > 50:
      lines.append(f'... and {len(self.failures) - 50} more failures')
    if self.interrupted:
      lines.append(f'INTERRUPTED after {self.processed + len(self.failures)} of '
                   f'{self.total - self.skipped} inputs: run the same command again to resume '
                   '(complete outputs are kept, partial ones were never renamed into place)')
    return '\n'.join(lines)


class Progress:
  """One line updated in place on a terminal (plain lines otherwise): done, images/s, ETA."""

  def __init__(self, total: int, stream=None, interval: Optional[float] = None):
    self.total, self.stream = total, stream or sys.stderr
    self.tty = hasattr(self.stream, 'isatty') and self.stream.isatty()
    self.interval = interval if interval is not None else (0.2 if self.tty else 10.0)
    self.start = self.last = time.time()
    self.done = self.failed = 0

  def update(self, failed: bool = False, force: bool = False) -> None:
    self.done += 1
    self.failed += failed
    now = time.time()
    if force or self.done == self.total or now - self.last >= self.interval:
      self.last = now
      self._print(now)

  def _print(self, now: float) -> None:
    rate = self.done / max(now - self.start, 1e-9)
    eta = (self.total - self.done) / max(rate, 1e-9)
    width = 24
    filled = int(width * self.done / max(self.total, 1))
    bar = '#' * filled + '.' * (width - filled)
    line = (f'[{bar}] {self.done:,}/{self.total:,}  {rate:.1f} images/s  '
            f'ETA {int(eta) // 60}m{int(eta) % 60:02d}s  failed {self.failed}')
    if self.tty:
      self.stream.write('\r' + line + ('\n' if self.done == self.total else ''))
    else:
      self.stream.write(line + '\n')
    self.stream.flush()


def failure_reason(error: BaseException) -> str:
  """A one-line reason for a failed input, for the report."""
  text = str(error) or type(error).__name__
  if type(error).__name__ == 'UnidentifiedImageError':
    return 'not an image, or an unsupported format (cannot identify image file)'
  if 'truncated' in text.lower():
    return f'truncated image ({text})'
  if isinstance(error, ValueError):
    return text
  return f'{type(error).__name__}: {text}'
