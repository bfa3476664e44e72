"""Two settings of the engine's class maps timed call by call in one process: an A/B that a
VM whose speed drifts (docs/performance.md) cannot tilt, since both see the same stretches.

    python benchmarks/engine_ab.py [--dtype float32] [--batch 8] [--iters 30] [--size 513] \
        [--parts-a one|devices] [--parts-b one|devices] [VAR=VALUE ...]

A is the default engine; B the engine built and compiled with the given SEG_* environment
variables (e.g. SEG_UPSAMPLE_ARGMAX=xla, SEG_F32_FORMULATION=xla, SEG_FLOAT_STEM=xla).
`--parts-a`, `--parts-b`: whether that engine computes each batch whole ('one') or as one
part per device at once ('devices'; `Engine.run_padded`; a CPU is shown to XLA as two
devices, `seg.cli.process`); default the engine's own choice (`Engine.split_batches`). What is timed is `Engine.predict`'s compiled work: uint8 images in
(already on the devices), preprocessing, the network, upsampling and argmax, class maps
out, every part dispatched before any is awaited. experiments/base.py, random weights (and
fixed int8 scales; speed does not depend on values). Prints per setting the median, 25th
percentile and fastest ms per image, and the median of the per-pair ratios B / A. Runs
under mimalloc, as `main.py benchmark` does.
"""

import argparse

from kernel_timing import alternate, environment, print_ab


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='experiments/base.py')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16', 'int8'))
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--size', type=int, default=513)
  parser.add_argument('--iters', type=int, default=30)
  parser.add_argument('--parts-a', choices=('one', 'devices'), default=None)
  parser.add_argument('--parts-b', choices=('one', 'devices'), default=None)
  parser.add_argument('settings', nargs='*', help='VAR=VALUE for B')
  args = parser.parse_args()
  b_env = dict(s.split('=', 1) for s in args.settings)
  from seg.cli import process
  process.reexec_with_mimalloc()  # as main.py runs
  process.split_cpu_into_devices()  # as predict and benchmark run
  process.use_cpu_feature_flags()

  import jax
  import numpy as np

  from seg.config import load_experiment
  from seg.inference import benchmark, engine
  from seg.inference.quantize import scale_names
  from seg.model import create_model

  config = load_experiment(args.config)
  variables = benchmark.random_variables(create_model(config.model))
  scales = (dict.fromkeys(scale_names(config.model), 6 / 127) if args.dtype == 'int8'
            else None)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (args.batch, args.size, args.size, 3), np.uint8)
  sizes = np.tile(np.array([[args.size, args.size]], np.int32), (args.batch, 1))

  def build(env, parts):
    """The engine's calls for one batch: [(compiled, arguments)] per part."""
    with environment(env):
      eng = engine.Engine(config, variables, dtype=args.dtype, batch_size=args.batch,
                          devices=engine.batch_devices(), int8_scales=scales,
                          split_batches=None if parts is None else parts == 'devices')
      parts = eng.parts(args.batch)
      size = args.batch // parts
      calls = []
      for i, device in enumerate(eng.devices[:parts]):
        rows = slice(i * size, (i + 1) * size)
        fn = eng.compiled('classes', size, args.size, args.size, device=device)
        calls.append((fn, (eng.folded_on[device], jax.device_put(images[rows], device),
                           jax.device_put(sizes[rows], device))))
      return eng, parts, calls

  a_eng, a_parts, a_calls = build({}, args.parts_a)
  b_eng, b_parts, b_calls = build(b_env, args.parts_b)
  describe = lambda eng, parts: (f'{parts} part{"s" if parts > 1 else ""}, upsampling and '
                                 f'argmax: {eng.upsample_argmax}')
  runs = {f'A (default; {describe(a_eng, a_parts)})': a_calls,
          f'B ({" ".join(args.settings) or "default"}; {describe(b_eng, b_parts)})': b_calls}
  run = lambda calls: jax.block_until_ready([fn(*arguments) for fn, arguments in calls])
  times = alternate({name: (lambda calls=calls: run(calls)) for name, calls in runs.items()},
                    args.iters, args.batch)
  print(f'{args.config}, {args.dtype}, {args.size}x{args.size}, batch {args.batch}, '
        f'{args.iters} calls each, alternating; class maps, ms per image:')
  print_ab(times)

if __name__ == '__main__':
  main()
