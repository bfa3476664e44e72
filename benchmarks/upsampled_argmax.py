"""The class map's upsampling and argmax alone: the kernel's (`float_kernel.upsampled_argmax`)
against XLA's (`resize_bilinear` then argmax, the whole batch at once and image by image in a
`lax.map`, as the engine's CPU programs run it).

    python benchmarks/upsampled_argmax.py [--size 513] [--iters 15] [--batches 1,4,8]

Random float32 logits on the feature grid of a SIZE x SIZE canvas at output stride 16 (21
classes), uint8 class maps out; each variant one compiled call, the variants alternating per
batch. Prints the median ms per image of each. Runs under mimalloc, as `main.py` does.
"""

import argparse


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', type=int, default=513)
  parser.add_argument('--iters', type=int, default=15)
  parser.add_argument('--batches', default='1,4,8')
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


if __name__ == '__main__':
  main()
