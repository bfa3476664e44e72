"""The engine's kernel calls one by one, timed inside the kernels, at full speed.

    python benchmarks/int8_timeline.py [--dtype int8|bfloat16|float32] [--config experiments/base.py]
        [--batch 1] [--iters 100]

Random weights and, for int8, fixed scales (speed does not depend on values), the 'kernel'
formulation of the dtype (int8: x86 with AVX2 and FMA; bfloat16 and float32 where
`cpu_features` chooses the float kernel). The compiled network runs `--iters` times while the
kernels record each call's start and end (`int8_kernel.record_call_times`: from the start
of its work to its last chunk done, on every thread the pool lends it); the calls are named
after the network's custom calls in the order the compiled program lists them (FFI target
and output shape). Prints, per call, the median ms over the runs and the median gap before
it (since the previous call's end, or the network call's start), then the medians summed per
FFI target and for all calls, and where the rest of a network call goes: before the first
kernel, between kernels (XLA's own operations, the runtime, each kernel's set-up) and after
the last. Unlike jax.profiler's events (`int8_profile.py`), this adds nothing to what it
times but two clock reads per call.
"""

import argparse
import collections
import re
import time


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dtype', default='int8', choices=['int8', 'bfloat16', 'float32'])
  parser.add_argument('--config', default='experiments/base.py')
  parser.add_argument('--size', type=int, default=513)
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--iters', type=int, default=100)
  args = parser.parse_args()
  from seg.cli import process
  process.reexec_with_mimalloc()  # as main.py runs

  import jax
  import numpy as np

  from seg.config import load_experiment
  from seg.inference import benchmark, float_kernel, int8_kernel

  config = load_experiment(args.config)
  compile_network, eng, images = benchmark.random_network(config, args.batch, args.size,
                                                          args.dtype)
  formulation = {'int8': eng.int8_formulation, 'bfloat16': eng.bf16_formulation,
                 'float32': eng.f32_formulation}[args.dtype]
  if formulation != 'kernel':
    raise SystemExit(f'the {args.dtype} formulation here is {formulation!r}, not the kernel\'s')
  loop = {'int8': int8_kernel.isa, 'bfloat16': float_kernel.isa,
          'float32': float_kernel.f32_isa}[args.dtype]()
  compiled, params = compile_network(), eng.folded
  calls = []  # (FFI target, output shape) in program order
  for line in compiled.as_text().splitlines():
    target = re.search(r'custom_call_target="(\w+)"', line)
    if target:
      shape = line.split(' = ', 1)[1].split(' custom-call(', 1)[0]
      calls.append((target.group(1), shape))
  for _ in range(3):
    compiled(params, images).block_until_ready()
  runs = []  # (start, end) of each network call, on the kernels' clock
  int8_kernel.record_call_times(True)
  try:
    for _ in range(args.iters):
      start = time.monotonic()
      compiled(params, images).block_until_ready()
      runs.append((start, time.monotonic()))
  finally:
    int8_kernel.record_call_times(False)
  times = int8_kernel.call_times()
  # Images one by one (the engine's default on the CPU) run the program's calls once per image.
  passes = args.batch if len(times) == args.iters * args.batch * len(calls) else 1
  if len(times) != args.iters * passes * len(calls):
    raise SystemExit(f'{len(times)} kernel calls recorded for {args.iters} runs of a program '
                     f'with {len(calls)} custom calls')
  times = times.reshape(args.iters, passes * len(calls), 2) * 1000
  runs = np.asarray(runs) * 1000
  previous_end = np.concatenate([runs[:, :1], times[:, :-1, 1]], axis=1)
  per_pass = lambda a: a.reshape(args.iters * passes, len(calls))
  ms = np.median(per_pass(times[..., 1] - times[..., 0]), axis=0)
  gaps = np.median(per_pass(times[..., 0] - previous_end), axis=0)
  # A call per image where the images run one by one (or the batch is one), else per batch.
  unit = 'per image' if passes > 1 or args.batch == 1 else f'for all {args.batch} images'
  print(f'{args.config}, {args.size}x{args.size}, batch {args.batch}, {args.dtype}, loop {loop}, '
        f'jax {jax.__version__}, {args.iters} runs'
        f'{f", {passes} images one by one" if passes > 1 else ""}; median ms per kernel call '
        f'({unit}), and of the gap before it:')
  per_target = collections.defaultdict(float)
  for i, ((target, shape), value, gap) in enumerate(zip(calls, ms, gaps)):
    per_target[target] += value
    print(f'  {i:3d}  {value:7.3f}  {gap:6.3f}  {target:28s} {shape}')
  for target, value in sorted(per_target.items(), key=lambda kv: -kv[1]):
    print(f'  {value:7.2f}  {target}')
  wall = (runs[:, 1] - runs[:, 0]) / passes
  between = np.sum(times[:, 1:, 0] - times[:, :-1, 1], axis=1) / passes
  print(f'  {ms.sum():7.2f}  all kernel calls; a network call took {np.median(wall):.2f} {unit} '
        f'(median), of which (medians) {np.median(times[:, 0, 0] - runs[:, 0]):.3f} before the '
        f'first kernel (once per call), {np.median(between):.3f} between kernels ({unit}), '
        f'{np.median(runs[:, 1] - times[:, -1, 1]):.3f} after the last (once per call)')

if __name__ == '__main__':
  main()
