"""Two settings of the engine's network (int8 unless --dtype) timed call by call in one
process: an A/B that a VM whose speed drifts (docs/performance.md) cannot tilt, since both
see the same stretches.

    python benchmarks/int8_ab.py [--dtype int8|bfloat16|float32] [--batch 1] [--iters 100] \
        [--size 513] VAR=VALUE [VAR=VALUE ...]

A is the default network; B is the one traced with the given SEG_* environment variables
(read when a function is traced, e.g. SEG_INT8_STEM=xla, SEG_INT8_DEPTHWISE=xla,
SEG_INT8_KERNEL_ISA=avx2). experiments/base.py, random weights and fixed int8 scales (speed
does not depend on values), float32 images in, logits at stride 16 out, a batch's images one
by one as the engine runs them (before 2026-12-07 a batch ran whole here). Prints per setting
the median, 25th percentile and fastest ms per image, and the median of the per-pair ratios
B / A. Runs under mimalloc, as `main.py benchmark` does.
"""

import argparse

from kernel_timing import alternate, environment, print_ab


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='experiments/base.py')
  parser.add_argument('--dtype', default='int8', choices=('int8', 'bfloat16', 'float32'))
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--size', type=int, default=513)
  parser.add_argument('--iters', type=int, default=100)
  parser.add_argument('settings', nargs='+', help='VAR=VALUE for B')
  args = parser.parse_args()
  b_env = dict(s.split('=', 1) for s in args.settings)
  from seg.cli import process
  process.reexec_with_mimalloc()  # as main.py runs

  import numpy as np

  from seg.config import load_experiment
  from seg.inference import benchmark

  config = load_experiment(args.config)
  compile_network, eng, images = benchmark.random_network(config, args.batch, args.size,
                                                          args.dtype)
  params = eng.folded

  def compiled(env):
    with environment(env):
      return compile_network()

  runs = {'A (default)': compiled({}), f'B ({" ".join(args.settings)})': compiled(b_env)}
  times = alternate({name: (lambda f=f: f(params, images).block_until_ready())
                     for name, f in runs.items()}, args.iters, args.batch)
  formulation = {'int8': eng.int8_formulation, 'bfloat16': eng.bf16_formulation,
                 'float32': eng.f32_formulation}[args.dtype]
  print(f'{args.config}, {args.size}x{args.size}, batch {args.batch}, {args.iters} calls each, '
        f'alternating; {args.dtype} formulation {formulation}; ms per image:')
  print_ab(times)

if __name__ == '__main__':
  main()
