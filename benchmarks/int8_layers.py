"""Which products should be int8: the network timed with int8 from input stride S on.

    python benchmarks/int8_layers.py [--config experiments/base.py] [--size 513] [--iters 10]

Times the engine's network (float32 images in, logits at the output stride out, batch 1,
one device, random weights and scales: speed does not depend on values) in float32, and
in int8 with the 1x1 products whose input has stride >= S in int8 (S = 2: all of them;
`seg.inference.quantize.INT8_FROM_STRIDE`), in each int8 formulation (the kernel one where
it builds), interleaved over rounds in one process so that load on the machine hits every
variant alike. Prints the median ms of each variant per round and over all rounds.
"""

import argparse
import statistics
import time


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='experiments/base.py')
  parser.add_argument('--size', type=int, default=513)
  parser.add_argument('--iters', type=int, default=10)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--strides', default='2,4,8,16')
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np

  from seg.config import load_experiment
  from seg.inference import fold, quantize
  from seg.inference.benchmark import random_variables
  from seg.inference.forward import forward
  from seg.model import create_model

  config = load_experiment(args.config)
  m = config.model
  folded = fold.fold_variables(m, random_variables(create_model(m)), xp=np)
  scales = dict.fromkeys(quantize.scale_names(m), 6 / 127)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, args.size, args.size, 3)),
                  jnp.float32)
  run_f32 = jax.jit(lambda p, x: forward(p, x, width=m.width, output_stride=m.output_stride,
                                         upsample=False))
  run_int8 = jax.jit(lambda p, x: quantize.forward_int8(p, x, width=m.width,
                                                        output_stride=m.output_stride,
                                                        upsample=False))
  variants = {'float32': (run_f32, fold.cast_folded(folded, jnp.float32, xp=np))}
  from seg.inference import int8_kernel
  for formulation in quantize.FORMULATIONS:
    if formulation == 'kernel' and not int8_kernel.available():
      print(f'kernel formulation skipped: {int8_kernel.unavailable_reason()}')
      continue
    for stride in map(int, args.strides.split(',')):
      params = quantize.quantize_folded(m, folded, scales, formulation, from_stride=stride)
      variants[f'int8 ({formulation}) from stride {stride}'] = (run_int8, params)
  variants = {name: (fn.lower(params, x).compile(), jax.device_put(params))
              for name, (fn, params) in variants.items()}
  times = {name: [] for name in variants}
  print(f'{args.size}x{args.size}, batch 1, {jax.devices()[0].device_kind}, jax {jax.__version__}')
  for r in range(args.rounds):
    for name, (fn, params) in variants.items():
      for _ in range(2):
        fn(params, x).block_until_ready()
      for _ in range(args.iters):
        start = time.perf_counter()
        fn(params, x).block_until_ready()
        times[name].append((time.perf_counter() - start) * 1000)
    print(f'round {r + 1}: ' + ', '.join(
        f'{name} {statistics.median(t[-args.iters:]):.1f}' for name, t in times.items()),
        flush=True)
  for name, t in times.items():
    print(f'{name:>32}: median {statistics.median(t):6.1f} ms (rounds '
          f'{min(statistics.median(t[i:i + args.iters]) for i in range(0, len(t), args.iters)):.1f}-'
          f'{max(statistics.median(t[i:i + args.iters]) for i in range(0, len(t), args.iters)):.1f})')


if __name__ == '__main__':
  main()
