"""Where ONNX Runtime's time goes: its own profiler over the exported network, per operator
type and per convolution in the order they run, for a layer-by-layer comparison with the
engine (benchmarks/int8_kernel_layers.py, benchmarks/int8_profile.py).

    python benchmarks/peers/ort_profile.py [--variant int8|float32] [--iters 50] [--batch 1]

The session is bench_ort.py's (all graph optimisations, 2 intra-op threads, sequential) with
profiling on; times are the kernels' own (`*_kernel_time` events), the median over the
timed runs in ms (a VM whose speed drifts shifts means more than medians). The
encoder's 51 convolutions are named as the engine names its layers (the stem, block 0's
depthwise and projection, each later block's expansion, depthwise and projection); the
head's keep ONNX Runtime's node names.
"""

import collections
import json
import os
import sys

from bench_ort import parse_args, session_options  # a sibling: the script's folder is on sys.path


def layer_names():
  """The engine's names of the encoder's 51 convolutions, in the order they run."""
  names = ['stem', 'block0/depthwise', 'block0/project']
  for i in range(1, 17):
    names += [f'block{i}/expand', f'block{i}/depthwise', f'block{i}/project']
  return names


def main():
  args, path = parse_args('int8', __doc__)
  import numpy as np
  import onnxruntime as ort
  options = session_options(args.threads)
  options.enable_profiling = True
  options.profile_file_prefix = os.path.join(os.environ.get('TMPDIR', '/tmp'), 'ort_profile')
  session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
  name = session.get_inputs()[0].name
  x = np.random.default_rng(0).uniform(-1, 1, (args.batch, 3, args.height, args.width)).astype(
      np.float32)
  for _ in range(args.warmup + args.iters):
    session.run(None, {name: x})
  trace = session.end_profiling()
  with open(trace) as f:
    events = json.load(f)
  os.remove(trace)
  runs = args.warmup + args.iters
  nodes, kinds, order = collections.defaultdict(list), collections.defaultdict(list), []
  run_us = []
  for e in events:
    if e.get('cat') == 'Node' and e['name'].endswith('_kernel_time'):
      node = e['name'][:-len('_kernel_time')]
      nodes[node].append(e['dur'])
      kinds[e['args'].get('op_name', '?')].append(e['dur'])
      if node not in order:
        order.append(node)
    elif e.get('cat') == 'Session' and e['name'] == 'model_run':
      run_us.append(e['dur'])
  run_us = run_us[args.warmup:]
  per_run = lambda durations: float(np.median(np.reshape(durations, (runs, -1)).sum(1)[
      args.warmup:])) / 1000  # ms per run: a node's events (one per run) or an op type's
  print(f'ONNX Runtime {ort.__version__}, {args.variant}, batch {args.batch}, '
        f'{args.height}x{args.width}, {args.threads} threads: a run took median '
        f'{np.median(run_us) / 1000:.2f} ms (fastest {min(run_us) / 1000:.2f}); kernels, median '
        f'ms per run over {args.iters} runs:')
  for kind, ms in sorted(((k, per_run(v)) for k, v in kinds.items()), key=lambda kv: -kv[1]):
    print(f'  {ms:7.3f}  {kind}')
  convs = [n for n in order if 'Conv' in n]
  labels = layer_names() if len(convs) > len(layer_names()) else []
  labels += convs[len(labels):]
  print('convolutions in the order they ran:')
  for label, node in zip(labels, convs):
    print(f'  {per_run(nodes[node]):7.3f}  {label}' + (f'  ({node})' if label != node else ''))


if __name__ == '__main__':
  main()
