"""ONNX Runtime peer: the exported network (export_onnx.py), float32 or int8 QDQ, on the CPU.

    python benchmarks/peers/bench_ort.py --variant float32|int8 --batch 1 [--height 513 --width 513]

CPUExecutionProvider, all graph optimisations (ORT_ENABLE_ALL: for the int8
model this fuses each DequantizeLinear -> Conv -> QuantizeLinear into an int8
QLinearConv), --threads intra-op threads (default 2), one inter-op thread,
sequential execution. Input: float32 [batch, 3, H, W] uniform in [-1, 1].
Prints one JSON line (measure.py).
"""

import argparse
import os
import sys
import time

import measure  # a sibling: a script's folder is on sys.path
from export_onnx import DEFAULT_MODEL_DIR, onnx_paths


def parse_args(default_variant: str, description: str = __doc__):
  """The peer flags, --variant and --model-dir; and the model's path (which must exist)."""
  parser = measure.add_common_args(argparse.ArgumentParser(
      description=description.split('\n')[0]))
  parser.add_argument('--variant', choices=['float32', 'int8'], default=default_variant)
  parser.add_argument('--model-dir', default=DEFAULT_MODEL_DIR)
  args = parser.parse_args()
  float_path, int8_path = onnx_paths(args.model_dir, args.height, args.width)
  path = float_path if args.variant == 'float32' else int8_path
  if not os.path.exists(path):
    sys.exit(f'{path} is missing: run benchmarks/peers/export_onnx.py --height {args.height} '
             f'--width {args.width} --calibration ... first (run.py does it for you)')
  return args, path


def session_options(threads: int):
  """The session options above: all graph optimisations, `threads` intra-op threads."""
  import onnxruntime as ort
  options = ort.SessionOptions()
  options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
  options.intra_op_num_threads = threads
  options.inter_op_num_threads = 1
  options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
  return options


def main():
  args, path = parse_args('float32')
  import numpy as np
  import onnxruntime as ort
  options = session_options(args.threads)
  start = time.perf_counter()
  session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
  load_s = time.perf_counter() - start
  x = np.random.default_rng(0).uniform(-1, 1, (args.batch, 3, args.height, args.width))
  feed = {'pixel_values': x.astype(np.float32)}
  output_shape = list(session.run(None, feed)[0].shape)
  times = measure.time_runs(lambda: session.run(None, feed), args.warmup, args.iters)
  measure.emit(measure.record(
      'onnxruntime', 'int8-qdq' if args.variant == 'int8' else 'float32', args.batch,
      args.height, args.width, times, args.threads, framework=f'onnxruntime {ort.__version__}',
      model=path, graph_optimization='all', session_load_s=round(load_s, 2),
      output_shape=output_shape))


if __name__ == '__main__':
  main()
