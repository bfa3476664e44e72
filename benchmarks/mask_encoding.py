"""Size and time of `predict`'s two PNGs per zlib level and strategy, against Pillow's encoder,
on real masks.

    python main.py predict --workdir runs/qs --input /tmp/p12 --output /tmp/m12
    python benchmarks/mask_encoding.py --masks /tmp/m12 [--levels 1,2,3,6,9]
        [--strategies default,rle] [--repeat 3]

Reads the class maps `predict` wrote (NAME.png, the palette PNGs; NAME_color.png is ignored),
and for each one encodes, in this process and one thread, the palette PNG and the RGB colour
PNG as `predict` does (`seg.predict.png.PngWriter`, strips of `outputs.STRIP_ROWS` rows, the
Up filter) at every zlib level of --levels with each strategy of --strategies (zlib's
default, Z_RLE: `predict`'s without the kernel library), with the kernel library's writer
(`png.MaskPngWriter`, `predict`'s where it runs: both PNGs from the class indices, so its
colour PNG time includes the colours), and with Pillow's own encoder (`Image.save`,
its default level 6 and adaptive filters, from the whole image). The colour lookup
(`outputs.colours`) is timed on its own. Prints one JSON line per method: ms per image
(best of --repeat, summed over the images) and KiB per image for each PNG, then a table.
"""

import argparse
import glob
import io
import json
import os
import platform
import subprocess
import sys
import time
import zlib

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
STRATEGIES = {'default': zlib.Z_DEFAULT_STRATEGY, 'rle': zlib.Z_RLE}
from seg.predict import outputs  # noqa: E402
from seg.predict import png  # noqa: E402
from seg.predict.png import PngWriter  # noqa: E402


def cpu_name() -> str:
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
    return next(l.split(':', 1)[1].strip() for l in out.splitlines() if 'Model name' in l)
  except (OSError, StopIteration):
    return platform.processor() or 'unknown'


def load_masks(folder: str, count: int):
  paths = sorted(p for p in glob.glob(os.path.join(folder, '**', '*.png'), recursive=True)
                 if not p.endswith('_color.png'))[:count]
  if not paths:
    raise SystemExit(f'no class-map PNGs (NAME.png) under {folder}')
  masks = []
  for path in paths:
    image = Image.open(path)
    if image.mode != 'P':
      raise SystemExit(f'{path}: mode {image.mode}, expected a palette PNG')
    masks.append(np.asarray(image))
  return paths, masks


def ours(rows: np.ndarray, palette, level: int, strategy: int) -> bytes:
  """One PNG as predict writes it (palette rows with `palette`, else RGB) at zlib `level`
  with `strategy`."""
  buffer = io.BytesIO()
  writer = PngWriter(buffer, rows.shape[1], rows.shape[0], palette=palette, level=level,
                     strategy=strategy)
  for r in range(0, rows.shape[0], outputs.STRIP_ROWS):
    writer.write(rows[r:r + outputs.STRIP_ROWS])
  writer.close()
  return buffer.getvalue()


def kernel(mask: np.ndarray, cmap, colour: bool) -> bytes:
  """One PNG as predict writes it where the kernel library runs (`png.MaskPngWriter`)."""
  buffer = io.BytesIO()
  writer = png.MaskPngWriter(buffer, mask.shape[1], mask.shape[0], cmap, colour)
  for r in range(0, mask.shape[0], outputs.STRIP_ROWS):
    writer.write(mask[r:r + outputs.STRIP_ROWS])
  writer.close()
  return buffer.getvalue()


def pillow(rows: np.ndarray, palette, level: int = 6) -> bytes:
  image = Image.fromarray(rows)
  if palette is not None:
    image = Image.fromarray(rows, 'P')
    image.putpalette(palette.reshape(-1).tolist())
  buffer = io.BytesIO()
  image.save(buffer, format='PNG', compress_level=level)
  return buffer.getvalue()


def best_of(repeat: int, function):
  best, result = float('inf'), None
  for _ in range(repeat):
    start = time.perf_counter()
    result = function()
    best = min(best, time.perf_counter() - start)
  return best, result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--masks', required=True, help="a folder of predict's outputs")
  parser.add_argument('--count', type=int, default=8, help='masks to use (sorted by name)')
  parser.add_argument('--levels', default='1,2,3,6,9')
  parser.add_argument('--strategies', default='default,rle', help='of: default, rle')
  parser.add_argument('--repeat', type=int, default=3, help='runs per method (best taken)')
  args = parser.parse_args()
  paths, masks = load_masks(args.masks, args.count)
  sizes = sorted({m.shape for m in masks})
  print(json.dumps({'cpu': cpu_name(), 'date': time.strftime('%Y-%m-%d'), 'masks': len(masks),
                    'shapes': [list(s) for s in sizes]}), flush=True)
  n = len(masks)
  colour_seconds, rgbs = best_of(args.repeat, lambda: [outputs.colours(m) for m in masks])
  for mask, rgb in zip(masks, rgbs):
    assert (rgb == outputs._colormap()[mask]).all(), 'colours() differs from the colormap'
  rows = [{'method': 'colour lookup (outputs.colours)', 'ms_per_image': 1000 * colour_seconds / n}]
  # Each method: (mask, its colours, the palette for the palette PNG or None for the colour
  # PNG) -> the file's bytes; the kernel's writer takes the mask for both.
  methods = [(f'PngWriter, Up filter, zlib {lvl}, {name} strategy',
              lambda m, rgb, p, l=int(lvl), s=STRATEGIES[name]: ours(
                  m if p is not None else rgb, p, l, s))
             for name in args.strategies.split(',') for lvl in args.levels.split(',')]
  methods.append(('Pillow Image.save (level 6, adaptive filters)',
                  lambda m, rgb, p: pillow(m if p is not None else rgb, p)))
  cmap = outputs._colormap()
  if png.kernel():
    methods.append(('MaskPngWriter, the kernel library (from the indices, colours included)',
                    lambda m, rgb, p: kernel(m, cmap, p is None)))
  for name, method in methods:
    row = {'method': name}
    for kind, arrays, palette, mode in (('palette', masks, cmap, 'P'),
                                        ('colour_png', rgbs, None, 'RGB')):
      seconds, files = best_of(args.repeat, lambda: [
          method(m, rgb, palette) for m, rgb in zip(masks, rgbs)])
      for data, array in zip(files, arrays):   # every file decodes to what it encodes
        decoded = Image.open(io.BytesIO(data))
        assert decoded.mode == mode and (np.asarray(decoded) == array).all(), name
      row[f'{kind}_ms'] = 1000 * seconds / n
      row[f'{kind}_kib'] = sum(len(f) for f in files) / n / 1024
    rows.append(row)
  for row in rows:
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}))
  print(f'\n{n} masks {", ".join("x".join(map(str, s[::-1])) for s in sizes)}, '
        f'ms and KiB per image, one thread')
  print(f'| method | palette PNG ms | colour PNG ms | palette KiB | colour KiB |')
  print('|---|---:|---:|---:|---:|')
  print(f'| {rows[0]["method"]} | | {rows[0]["ms_per_image"]:.1f} | | |')
  for row in rows[1:]:
    print(f'| {row["method"]} | {row["palette_ms"]:.1f} | {row["colour_png_ms"]:.1f} | '
          f'{row["palette_kib"]:.0f} | {row["colour_png_kib"]:.0f} |')


if __name__ == '__main__':
  main()
