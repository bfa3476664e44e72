"""Where the int8 engine's time goes: one network call profiled, time per kind of operation.

    python benchmarks/int8_profile.py [--config experiments/base.py] [--size 513] [--iters 10]

Random weights and fixed int8 scales (speed does not depend on values), batch 1, the
'kernel' formulation unless SEG_INT8_FORMULATION says otherwise (SEG_INT8_DEPTHWISE=xla:
XLA's depthwise taps). Runs the compiled network `--iters` times under `jax.profiler`
(a Perfetto trace in a temporary folder) and prints, per call, the wall milliseconds of the
project's kernels (by FFI target), of XLA's fusions (by kind, e.g. `clamp_convert_fusion`)
and the ten slowest XLA operations with their shapes; the sum of those against the wall time
of a call (the rest is the runtime's own work between operations).
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='experiments/base.py')
  parser.add_argument('--size', type=int, default=513)
  parser.add_argument('--iters', type=int, default=10)
  args = parser.parse_args()
  from seg.cli import process
  process.reexec_with_mimalloc()  # as main.py runs

  import jax

  from seg.config import load_experiment
  from seg.inference import benchmark

  config = load_experiment(args.config)
  compile_network, eng, images = benchmark.random_network(config, 1, args.size)
  compiled, params = compile_network(), eng.folded
  for _ in range(3):
    compiled(params, images).block_until_ready()
  calls = []
  with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder, create_perfetto_trace=True):
      for _ in range(args.iters):
        start = time.perf_counter()
        compiled(params, images).block_until_ready()
        calls.append(time.perf_counter() - start)
    path, = glob.glob(os.path.join(folder, '**', '*.trace.json.gz'), recursive=True)
    with gzip.open(path) as f:
      events = [e for e in json.load(f)['traceEvents'] if e.get('ph') == 'X']

  # event name -> ms per call: the union of its events' intervals, since XLA's parallel
  # loops run one operation on several threads at once (one event each).
  intervals = collections.defaultdict(list)
  for event in events:
    intervals[event['name']].append((event['ts'], event['ts'] + event['dur']))
  ms = {}
  for name, spans in intervals.items():
    total, end = 0.0, float('-inf')
    for start, stop in sorted(spans):
      total += max(0.0, stop - max(start, end))
      end = max(end, stop)
    ms[name] = total / 1000 / args.iters
  hlo = compiled.as_text()
  lines, targets = {}, {}  # HLO instruction name -> its line, FFI target
  for line in hlo.splitlines():
    found = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = ', line)
    if found:
      lines[found.group(1)] = line.strip()
      target = re.search(r'custom_call_target="(\w+)"', line)
      if target:
        targets[found.group(1)] = target.group(1)
  kinds = collections.defaultdict(float)
  for name, value in ms.items():
    if name in lines:
      kinds[targets.get(name) or 'xla ' + re.sub(r'[.\d]+$', '', name)] += value
  wall = sorted(calls)[len(calls) // 2] * 1000  # the median call, traced
  print(f'{args.config}, {args.size}x{args.size}, batch 1, int8 formulation '
        f'{eng.int8_formulation}, jax {jax.__version__}; ms per call:')
  for kind, value in sorted(kinds.items(), key=lambda kv: -kv[1]):
    print(f'  {value:7.2f}  {kind}')
  print(f'  {sum(kinds.values()):7.2f}  all operations; a call took {wall:.2f} (median, '
        f'traced)')
  print('the slowest XLA operations:')
  xla_ops = [(name, value) for name, value in ms.items() if name in lines and name not in targets]
  for name, value in sorted(xla_ops, key=lambda kv: -kv[1])[:10]:
    shape = lines[name].split(' = ', 1)[1].split(' ', 1)[0]
    print(f'  {value:7.2f}  {name} {shape}')


if __name__ == '__main__':
  main()
