"""The class map's upsampling and argmax alone: the kernel's (`float_kernel.upsampled_argmax`)
against XLA's (`resize_bilinear` then argmax, the whole batch at once and image by image in a
`lax.map`, as the engine's CPU programs run it).

    python benchmarks/upsampled_argmax.py [--size 513] [--iters 15] [--batches 1,4,8]
    python benchmarks/upsampled_argmax.py --photos 3024x4032,6000x8000 [--size 161]

Random float32 logits on the feature grid of a SIZE x SIZE canvas at output stride 16 (21
classes), uint8 class maps out; each variant one compiled call, the variants alternating per
batch. Prints the median ms per image of each. Runs under mimalloc, as `main.py` does.

`--photos HxW,...` times `predict`'s full-size masks of large photos instead
(`seg.predict.upsampling.class_map`: the blocks in the kernel and in NumPy, and every pixel
in the kernel), on one thread, from smooth logits (a random 4 x 4 grid of classes' logits
upsampled to the feature grid, plus noise: regions of a few classes, as a network gives)
of a photo resized to SIZE on its long side.
"""

import argparse


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', type=int, default=513)
  parser.add_argument('--iters', type=int, default=15)
  parser.add_argument('--batches', default='1,4,8')
  parser.add_argument('--photos', default='', help='HxW,... : time predict\'s class maps')
  args = parser.parse_args()
  from seg.cli import process
  process.reexec_with_mimalloc()

  import jax
  import jax.numpy as jnp
  import numpy as np
  from kernel_timing import median_ms

  from seg.inference import float_kernel
  from seg.model.layers import resize_bilinear

  if not float_kernel.available(jnp.float32):
    raise SystemExit(f'no kernel here: {float_kernel.unavailable_reason(jnp.float32)}')
  size, cells = args.size, (args.size - 1) // 16 + 1
  if args.photos:
    return photos(args, size, cells)
  xla = lambda x: jnp.argmax(resize_bilinear(x, (size, size)), -1).astype(jnp.uint8)
  variants = {
      'kernel': lambda x: float_kernel.upsampled_argmax(x, size, size),
      'xla, whole batch': xla,
      'xla, image by image': lambda x: jax.lax.map(lambda y: xla(y[None])[0], x),
  }
  print(f'{size}x{size} from [{cells}, {cells}, 21] logits, median ms per image of '
        f'{args.iters} calls:')
  for batch in (int(b) for b in args.batches.split(',')):
    logits = jnp.asarray(np.random.default_rng(batch).standard_normal(
        (batch, cells, cells, 21)).astype(np.float32))
    times = {name: median_ms(fn, logits, iters=args.iters) / batch
             for name, fn in variants.items()}
    print(f'  batch {batch}: ' + ', '.join(f'{name} {ms:.2f}' for name, ms in times.items()))


def smooth_logits(seed: int, cells: int):
  """[cells, cells, 21]: a random 4 x 4 grid of logits (class 0 favoured) bilinearly
  upsampled to `cells`, plus a little noise."""
  import numpy as np
  rng = np.random.default_rng(seed)
  coarse = rng.standard_normal((4, 4, 21)) * 3
  coarse[..., 0] += 4
  at = np.linspace(0, 3, cells)
  lo = np.minimum(at.astype(int), 2)
  t = (at - lo)[:, None, None]
  rows = coarse[lo] * (1 - t) + coarse[lo + 1] * t
  t = t.transpose(1, 0, 2)
  grid = rows[:, lo] * (1 - t) + rows[:, lo + 1] * t
  return (grid + 0.3 * rng.standard_normal(grid.shape)).astype(np.float32)


def photos(args, size: int, cells: int):
  import statistics
  import time
  import numpy as np
  from seg.predict import upsampling
  logits = [smooth_logits(seed, cells) for seed in range(8)]
  print(f'class maps of photos from [{cells}, {cells}, 21] logits (canvas {size}), median ms '
        f'per photo over {args.iters} rounds of {len(logits)} logits:')
  for photo in args.photos.split(','):
    height, width = (int(v) for v in photo.split('x'))
    scale = size / max(height, width)
    resized = (max(1, round(height * scale)), max(1, round(width * scale)))
    variants = {'kernel blocks': dict(kernel=True), 'numpy blocks': dict(kernel=False),
                'kernel every pixel': dict(kernel=True, block=1)}
    times = {name: [] for name in variants}
    for _ in range(args.iters):
      for name, options in variants.items():
        start = time.perf_counter()
        for features in logits:
          upsampling.class_map(features, (height, width), resized, (size, size), **options)
        times[name].append((time.perf_counter() - start) / len(logits) * 1000)
    print(f'  {height}x{width}: ' + ', '.join(f'{name} {statistics.median(ms):.2f}'
                                               for name, ms in times.items()))


if __name__ == '__main__':
  main()
