"""Speed of the LiteRT and ONNX exports against ONNX Runtime running the float32 network.

    python benchmarks/export_speed.py --workdir runs/quickstart [--sizes 513,257] [--rounds 5]
        [--iters 20] [--calibration train] [--model-dir ~/.cache/seg/exports] [--jax2tf]
    python benchmarks/export_speed.py --config experiments/base.py ...   (random weights)

`--config` times an experiment's network without training it: its variables at random init
(seed 0, BatchNorm statistics at init) saved once as a workdir under --model-dir
(`random-<experiment>`); speed does not depend on the weights' values.

Exports the workdir's model at each size (`main.py export`'s code: tflite and onnx, float32
and int8 calibrated on --calibration) unless present in --model-dir, then times, batch 1,
uint8 image in -> class map out (preprocessing, network, upsampling and argmax included):

  onnxruntime-float32   the float32 ONNX export in ONNX Runtime (CPU provider, all graph
                        optimisations, --threads intra-op threads): the baseline
  onnxruntime-int8      the int8 QDQ export, same settings
  litert-float32        the float32 LiteRT export, LiteRT interpreter with XNNPACK, --threads
  litert-int8           the int8 LiteRT export, same
  litert-float32-jax2tf (--jax2tf) the engine's function converted through jax2tf (the route
                        not taken: docs/export.md)
  ROW-network           (--network) each of the four above exported without the upsampling
                        and the argmax (`export_model(..., upsample=False)`): uint8 image in,
                        logits at the feature resolution out; ROW minus ROW-network is what
                        the upsampling of the logits to the image size and the argmax cost

Every timing is a fresh process (`--time PATH`, which prints one JSON line with "median_ms",
the format benchmarks/peers/run.py takes with --extra), and the rows are interleaved: each
round runs every row at every size, so a drift of the machine hits all alike. The table
gives the median over rounds of each process's median ms, the spread over rounds (min-max)
and the speed-up over onnxruntime-float32 (baseline / row). Run it under the CPU lock on a
shared machine.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROWS = ('onnxruntime-float32', 'onnxruntime-int8', 'litert-float32', 'litert-int8')
BASELINE = 'onnxruntime-float32'


def cpu_name() -> str:
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
    for line in out.splitlines():
      if line.startswith('Model name:'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown CPU'


def time_one(path: str, warmup: int, iters: int, threads: int, batch: int,
             latest_features: bool = False) -> dict:
  """Times one model file on random uint8 images; the record benchmarks/peers/run.py reads."""
  import numpy as np
  start = time.perf_counter()
  if path.endswith('.onnx'):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    shape = [d if isinstance(d, int) else 0 for d in session.get_inputs()[0].shape]
    height, width = shape[1], shape[2]
    images = np.random.default_rng(0).integers(0, 256, (batch, height, width, 3), np.uint8)
    output = session.get_outputs()[0].name   # classes, or logits for a network-only file
    run = lambda: session.run([output], {'images': images})
    runtime = f'onnxruntime {ort.__version__}'
  else:
    import ai_edge_litert
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_path=path, num_threads=threads,
                              experimental_default_delegate_latest_features=latest_features)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    _, height, width, _ = detail['shape']
    if batch != 1:
      raise SystemExit('the LiteRT exports take one image per call')
    images = np.random.default_rng(0).integers(0, 256, (1, height, width, 3), np.uint8)
    output = interpreter.get_output_details()[0]['index']

    def run():  # by tensor index: the jax2tf file has no signature
      interpreter.set_tensor(detail['index'], images)
      interpreter.invoke()
      return interpreter.get_tensor(output)
    runtime = f'ai-edge-litert {getattr(ai_edge_litert, "__version__", "")}'.strip()
  load_s = time.perf_counter() - start
  for _ in range(warmup):
    run()
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    run()
    times.append((time.perf_counter() - t) * 1000)
  return {'median_ms': statistics.median(times), 'min_ms': min(times), 'max_ms': max(times),
          'batch': batch, 'height': int(height), 'width': int(width), 'threads': threads,
          'runtime': runtime, 'model': path, 'load_s': round(load_s, 2)}


def export_jax2tf(workdir: str, path: str, height: int, width: int) -> None:
  """The engine's class-map function through jax2tf and the TFLite converter (float32)."""
  import jax
  import tensorflow as tf
  from jax.experimental import jax2tf
  from seg.inference.engine import Engine
  from seg.inference.forward import class_map
  eng, _ = Engine.from_workdir(workdir)
  folded = jax.device_get(eng.folded)
  fn = tf.function(jax2tf.convert(lambda x: class_map(folded, x, None, **eng.static)),
                   input_signature=[tf.TensorSpec((1, height, width, 3), tf.uint8)],
                   autograph=False)
  converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
  with open(path, 'wb') as f:
    f.write(converter.convert())


def random_workdir(config_path: str, model_dir: str) -> str:
  """A workdir holding `config_path`'s model at random init (made once under model_dir)."""
  import jax
  import jax.numpy as jnp
  from seg import checkpoint
  from seg.config import load_experiment
  from seg.model import create_model
  name = os.path.splitext(os.path.basename(config_path))[0]
  workdir = os.path.join(model_dir, f'random-{name}')
  if os.path.isdir(os.path.join(workdir, 'checkpoints')):
    return workdir
  config = load_experiment(config_path)
  model = create_model(config.model)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 65, 65, 3), jnp.float32), train=False)
  checkpoint.save_config(workdir, config)
  manager = checkpoint.create_manager(workdir)
  checkpoint.save_model_only(manager, 0, {'params': variables['params'],
                                          'batch_stats': variables['batch_stats']})
  manager.wait_until_finished()
  print(f'[random init] {config_path} -> {workdir}', file=sys.stderr)
  return workdir


def all_rows(args):
  """The rows asked for, in table order."""
  rows = ROWS + (('litert-float32-jax2tf',) if args.jax2tf else ())
  rows += tuple(f'{row}-network' for row in ROWS) if args.network else ()
  return [r for r in rows if not args.only or r in args.only.split(',')]


def ensure_models(args, sizes):
  """{(row, size): path}, exporting what is missing."""
  from seg.export import exporter
  paths = {}
  for size in sizes:
    for row in all_rows(args):
      runtime, variant = row.split('-', 1)
      ext = 'onnx' if runtime == 'onnxruntime' else 'tflite'
      path = os.path.join(args.model_dir, f'{os.path.basename(os.path.normpath(args.workdir))}'
                          f'.{size}.{variant}.{ext}')
      paths[row, size] = path
      if os.path.exists(path):
        continue
      start = time.time()
      if variant == 'float32-jax2tf':
        export_jax2tf(args.workdir, path, *map(int, size.split('x')))
      else:
        quantize = 'int8' if variant.startswith('int8') else None
        exporter.export_model(args.workdir, ext, path, size=size, quantize=quantize,
                              calibration=args.calibration if quantize else None,
                              calibration_count=args.calibration_count,
                              upsample=not variant.endswith('-network'),
                              log=lambda m: print(m, file=sys.stderr))
      print(f'[export] {row} {size}: {time.time() - start:.0f}s -> {path}', file=sys.stderr)
  return paths


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir')
  parser.add_argument('--config', help='an experiment file: its model at random init')
  parser.add_argument('--sizes', default='513x513,257x257')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--iters', type=int, default=20)
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--calibration', default='train')
  parser.add_argument('--calibration-count', type=int, default=300)
  parser.add_argument('--model-dir', default=os.path.expanduser('~/.cache/seg/exports'))
  parser.add_argument('--jax2tf', action='store_true', help='add the jax2tf route as a row')
  parser.add_argument('--network', action='store_true',
                      help='add each row without the upsampling and argmax (the network alone)')
  parser.add_argument('--output', default='', help='append every record to this JSONL file')
  parser.add_argument('--time', metavar='PATH', help='time one model file (one JSON line)')
  parser.add_argument('--table', nargs='+', metavar='JSONL',
                      help='print the table of --output files (rounds run in several holds of '
                      'the CPU lock)')
  parser.add_argument('--xnnpack-latest', action='store_true',
                      help='with --time: LiteRT\'s XNNPACK delegate with its latest features')
  parser.add_argument('--only', default='', help='comma-separated rows to time (default all)')
  args = parser.parse_args()
  if args.time:
    print(json.dumps(time_one(args.time, args.warmup, args.iters, args.threads, args.batch,
                              args.xnnpack_latest)))
    return
  if args.table:
    records = [json.loads(line) for path in args.table for line in open(path) if line.strip()]
    print_table(records)
    return
  if bool(args.workdir) == bool(args.config):
    parser.error('give --workdir or --config (or --time PATH)')
  os.makedirs(args.model_dir, exist_ok=True)
  if args.config:
    args.workdir = random_workdir(args.config, args.model_dir)
  sizes = [s.strip() for s in args.sizes.split(',') if s.strip()]
  paths = ensure_models(args, sizes)
  if args.rounds == 0:  # --rounds 0: export only
    return
  rows = all_rows(args)
  records = {}
  cpu, date = cpu_name(), time.strftime('%Y-%m-%d', time.gmtime())
  for round_ in range(args.rounds):
    for size in sizes:
      for row in rows:
        command = [sys.executable, os.path.abspath(__file__), '--time', paths[row, size],
                   '--warmup', str(args.warmup), '--iters', str(args.iters),
                   '--threads', str(args.threads), '--batch', str(args.batch)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        lines = [l for l in done.stdout.splitlines() if l.startswith('{')]
        if done.returncode or not lines:
          raise SystemExit(f'{row} {size} failed:\n{done.stderr[-3000:]}')
        record = dict(json.loads(lines[-1]), row=row, size=size, round=round_, cpu=cpu,
                      date=date, utc=time.strftime('%H:%M:%S', time.gmtime()))
        records.setdefault((row, size), []).append(record)
        print(f'[round {round_ + 1}/{args.rounds}] {row} {size}: '
              f'{record["median_ms"]:.1f} ms', file=sys.stderr)
        if args.output:
          with open(args.output, 'a') as f:
            f.write(json.dumps(record) + '\n')

  print_table([r for rs in records.values() for r in rs], args.workdir)


def print_table(records, workdir: str = ''):
  """The markdown table of timing records (one invocation's, or several --output files')."""
  rows = list(dict.fromkeys(r['row'] for r in records))
  sizes = list(dict.fromkeys(r['size'] for r in records))
  by = {}
  for r in records:
    by.setdefault((r['row'], r['size']), []).append(r['median_ms'])
  rounds = sorted({len(v) for v in by.values()})
  dates = sorted({r['date'] for r in records})
  first = records[0]
  print(f'\n{", ".join(dates)}, {first["cpu"]}, {first["threads"]} threads, batch '
        f'{first["batch"]}, uint8 image in; median over rounds of each process\'s median ms '
        f'(min-max over rounds), {"/".join(map(str, rounds))} rounds; {workdir or first["model"]}')
  median = lambda row, size: statistics.median(by[row, size])
  print('| row | ' + ' | '.join(f'{s} ms (min-max)' for s in sizes) + ' | ' +
        ' | '.join(f'{s} vs ORT float32' for s in sizes) + ' |')
  print('|---|' + '---:|' * (2 * len(sizes)))
  for row in rows:
    cells, ratios = [], []
    for size in sizes:
      ms = by.get((row, size))
      if not ms:
        cells.append('')
        ratios.append('')
        continue
      cells.append(f'{statistics.median(ms):.1f} ({min(ms):.1f}-{max(ms):.1f})')
      base = BASELINE + ('-network' if row.endswith('-network') else '')
      ratios.append(f'{median(base, size) / statistics.median(ms):.2f}x'
                    if (base, size) in by else '')
    print(f'| {row} | ' + ' | '.join(cells) + ' | ' + ' | '.join(ratios) + ' |')
  split = [row for row in rows if (f'{row}-network', sizes[0]) in by]
  if split:  # where the time goes: the network, and the upsampling + argmax (the difference)
    print('\n| row | ' + ' | '.join(f'{s}: network / upsampling + argmax ms' for s in sizes)
          + ' |')
    print('|---|' + '---:|' * len(sizes))
    for row in split:
      cells = []
      for size in sizes:
        if (row, size) in by and (f'{row}-network', size) in by:
          network = median(f'{row}-network', size)
          cells.append(f'{network:.1f} / {median(row, size) - network:.1f}')
        else:
          cells.append('')
      print(f'| {row} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  main()
