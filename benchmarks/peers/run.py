"""The project's inference speed side by side with its peers (ONNX Runtime, PyTorch), in one run.

Reproduce a comparison from the repository root (Python 3.11):

    pip install -r requirements.txt -r benchmarks/requirements-peers.txt
    python benchmarks/peers/run.py --engine

(10.5 min on 2 Intel Xeon cores, 2026-11-29.)
The network is the same everywhere: DeepLabv3 + MobileNetV2 1.0, output stride 16,
21 classes, random weights (model.py), float32 [batch, 3, H, W] images in, logits at
stride 16 out (no resize, no argmax). Rows (--only picks some; default all):

  onnxruntime-float32     ONNX Runtime, CPU provider, all graph optimisations, 2 threads
  onnxruntime-int8        the same on the int8 QDQ model (calibrated on real images)
  torch-eager-float32     PyTorch eager
  torch-compile-float32   torch.compile (inductor) with freezing
  torch-compile-bfloat16  the same under CPU autocast to bfloat16 (oneDNN)
  --engine                adds the project's engine (`main.py benchmark`): float32, bfloat16, int8
  --extra 'NAME=COMMAND'  adds any command that prints one JSON line with at least "median_ms"
                          (ms per batch); {batch} {warmup} {iters} {height} {width} are filled in

Every run is a fresh process (its own peak memory, no shared caches), and the rows are
interleaved: each round runs every row at every batch size, so a slow drift of the
machine hits all rows alike. The ONNX models are exported first if missing
(export_onnx.py; the int8 one calibrates on --calibration, by default the project's
generated dataset, which `main.py prepare-data --dataset embedded` writes if absent).

Every record is appended to --output (JSONL; default
benchmarks/results/peers-DATE-CPU.jsonl) with the round, the command, the date and the CPU
(lscpu's model name and its AVX-512 / AMX flags). The table at the end gives, per row and
batch size, the median over rounds of ms per image, its spread over the rounds (min-max),
the peak resident memory, and the ratio to --baseline (lower = faster). `--report FILE`
prints the table of an existing JSONL file again.
"""

import argparse
import datetime
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
import measure  # a sibling: a script's folder is on sys.path

PEERS = {
    'onnxruntime-float32': ['bench_ort.py', '--variant', 'float32'],
    'onnxruntime-int8': ['bench_ort.py', '--variant', 'int8'],
    'torch-eager-float32': ['bench_torch.py', '--mode', 'eager'],
    'torch-compile-float32': ['bench_torch.py', '--mode', 'compile'],
    'torch-compile-bfloat16': ['bench_torch.py', '--mode', 'compile', '--dtype', 'bfloat16'],
}
ENGINE = ('python main.py benchmark --config experiments/base.py --batch-size {batch} '
          '--warmup {warmup} --iters {iters} --height {height} --width {width} --json')
ENGINE_EXTRAS = [f'seg-engine-float32={ENGINE}', f'seg-engine-bfloat16={ENGINE} --dtype bfloat16',
                 f'seg-engine-int8={ENGINE} --dtype int8']
EMBEDDED_JPEGS = '~/tensorflow_datasets/downloads/embedded-1.2.0/VOCdevkit/VOC2012/JPEGImages'


def log(message):
  print(message, file=sys.stderr, flush=True)


def last_json_line(text):
  """The last line of `text` that parses as a JSON object, or None."""
  for line in reversed(text.splitlines()):
    if line.strip().startswith('{'):
      try:
        return json.loads(line)
      except ValueError:
        pass
  return None


def run_command(command, timeout):
  """Runs a shell command from the repository root: (its JSON record or None, error text, seconds)."""
  start = time.perf_counter()
  try:
    done = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
  except subprocess.TimeoutExpired:
    return None, f'timed out after {timeout}s', time.perf_counter() - start
  rec = last_json_line(done.stdout)
  error = None
  if done.returncode != 0 or rec is None or 'median_ms' not in rec:
    error = f'exit {done.returncode}, no JSON line with "median_ms"; output ends:\n' + (
        done.stderr.strip() + '\n' + done.stdout.strip()).strip()[-2000:]
  return rec, error, time.perf_counter() - start


def parse_extras(specs, taken):
  """['NAME=COMMAND', ...] -> [(name, command)]; names must be new."""
  extras = []
  for spec in specs:
    name, sep, command = spec.partition('=')
    name = name.strip()
    if not sep or not name or not command.strip():
      raise SystemExit(f"--extra {spec!r}: expected 'NAME=COMMAND'")
    if name in taken:
      raise SystemExit(f'--extra {spec!r}: the name {name!r} is already used')
    taken.add(name)
    extras.append((name, command.strip()))
  return extras


def ensure_onnx(args, out, run_id):
  """Exports the ONNX models for this size unless present; the export's JSON line goes to `out`."""
  from export_onnx import DEFAULT_MODEL_DIR, onnx_paths
  if all(os.path.exists(p) for p in onnx_paths(DEFAULT_MODEL_DIR, args.height, args.width)):
    return
  calibration = os.path.expanduser(args.calibration)
  if args.calibration == EMBEDDED_JPEGS and not os.path.isdir(calibration):
    log('[run] calibration images missing: python main.py prepare-data --dataset embedded')
    subprocess.run([sys.executable, 'main.py', 'prepare-data', '--dataset', 'embedded'],
                   cwd=ROOT, check=True)
  command = (f'{shlex.quote(sys.executable)} benchmarks/peers/export_onnx.py --height {args.height}'
             f' --width {args.width} --calibration {shlex.quote(calibration)}')
  log(f'[run] exporting the ONNX models: {command}')
  done = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True)
  rec = last_json_line(done.stdout)
  if done.returncode != 0 or rec is None:
    raise SystemExit(f'ONNX export failed:\n{done.stderr[-3000:]}')
  out.write(json.dumps(dict(rec, run_id=run_id, command=command)) + '\n')


def load_records(path):
  """The timing records of a JSONL file (errors and export lines left out)."""
  with open(path) as f:
    return [r for r in map(json.loads, filter(str.strip, f)) if 'median_ms' in r and 'name' in r]


def table(records, baseline):
  """Markdown table: per (row, size) and batch, the median over rounds of ms/image, spread, RSS, ratio."""
  cells = {}   # (name, height, width) -> batch -> [records]
  for r in records:
    cells.setdefault((r['name'], r['height'], r['width']), {}).setdefault(r['batch'], []).append(r)
  batches = sorted({r['batch'] for r in records})

  def ms_per_image(rs):
    per_round = [r['median_ms'] / r['batch'] for r in rs]
    return statistics.median(per_round), min(per_round), max(per_round)

  head = ['row', 'variant', 'input']
  for b in batches:
    head += [f'batch {b} ms/image', 'spread', 'peak RSS MiB']
  head += [f'vs {baseline} at batch {b}' for b in batches]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * 3 + '---:|' * (4 * len(batches))]
  for (name, height, width), by_batch in cells.items():
    base = cells.get((baseline, height, width), {})
    first = next(iter(by_batch.values()))[-1]
    row = [name, str(first.get('variant', '')), f'{height}x{width}']
    ratios = []
    for b in batches:
      rs = by_batch.get(b)
      if not rs:
        row += ['-', '', '']
        ratios.append('')
        continue
      median, low, high = ms_per_image(rs)
      rss = [r.get('peak_rss_mib', r.get('peak_rss_mb')) for r in rs]
      rss = [x for x in rss if x is not None]
      row += [f'{median:.1f}', f'{low:.1f}-{high:.1f}', f'{max(rss):.0f}' if rss else '']
      ratios.append(f'{median / ms_per_image(base[b])[0]:.2f}' if base.get(b) else '')
    lines.append('| ' + ' | '.join(row + ratios) + ' |')
  return '\n'.join(lines)


def cpu_slug(cpu):
  words = re.sub(r'\((r|tm)\)|\bcpu\b|@.*', ' ', cpu['model'].lower())
  return '-'.join(re.findall(r'[a-z0-9]+', words)) or 'cpu'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n\n', 1)[1])
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--batches', default='1,8', help='comma list of batch sizes')
  parser.add_argument('--height', type=int, default=513)
  parser.add_argument('--width', type=int, default=513)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--iters', type=int, default=20, help='timed runs per process (median)')
  parser.add_argument('--only', default='all',
                      help=f'comma list of {", ".join(PEERS)}; "none" for --engine/--extra only')
  parser.add_argument('--engine', action='store_true', help="add the project's engine rows")
  parser.add_argument('--extra', action='append', default=[], help="'NAME=COMMAND', see above")
  parser.add_argument('--baseline', default='onnxruntime-float32', help='row the ratios divide by')
  parser.add_argument('--calibration', default=EMBEDDED_JPEGS,
                      help='JPEG folder or glob for the int8 calibration (export_onnx.py)')
  parser.add_argument('--timeout', type=int, default=900, help='seconds per run')
  parser.add_argument('--output', default='', help='JSONL file to append to')
  parser.add_argument('--report', metavar='JSONL', help='only print the table of this file')
  args = parser.parse_args()
  if args.report:
    print(table(load_records(args.report), args.baseline))
    return

  names = list(PEERS) if args.only == 'all' else [] if args.only == 'none' else [
      n.strip() for n in args.only.split(',') if n.strip()]
  unknown = [n for n in names if n not in PEERS]
  if unknown:
    parser.error(f'--only: unknown {unknown}; known: {", ".join(PEERS)} (or all, none)')
  extras = parse_extras((ENGINE_EXTRAS if args.engine else []) + args.extra, set(names))
  if not names and not extras:
    parser.error('nothing to run: --only none needs --engine or --extra')
  try:
    batches = [int(b) for b in args.batches.split(',')]
  except ValueError:
    parser.error(f'--batches {args.batches!r}: expected a comma list of integers')
  if args.rounds < 1 or min(batches) < 1:
    parser.error('--rounds and every batch size must be >= 1')

  cpu = measure.cpu_description()
  today = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d')
  output = args.output or os.path.join(ROOT, 'benchmarks', 'results',
                                       f'peers-{today}-{cpu_slug(cpu)}.jsonl')
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  run_id = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')
  python = shlex.quote(sys.executable)
  commands = {n: ' '.join([python, shlex.quote(os.path.join('benchmarks', 'peers', PEERS[n][0]))]
                          + PEERS[n][1:]) + ' --batch {batch} --warmup {warmup} --iters {iters}'
              ' --height {height} --width {width}' for n in names}
  commands.update(extras)
  log(f'[run] {len(commands)} rows x {len(batches)} batch sizes x {args.rounds} rounds at '
      f'{args.height}x{args.width} on {cpu["model"]} ({" ".join(cpu["flags"])}); -> {output}')

  records, failures = [], []
  with open(output, 'a') as out:
    if any(n.startswith('onnxruntime') for n in names):
      ensure_onnx(args, out, run_id)
    for round_ in range(1, args.rounds + 1):
      for batch in batches:
        for name, template in commands.items():
          command = template
          for key, value in (('batch', batch), ('warmup', args.warmup), ('iters', args.iters),
                             ('height', args.height), ('width', args.width)):
            command = command.replace('{%s}' % key, str(value))   # other braces stay (JSON)
          rec, error, seconds = run_command(command, args.timeout)
          facts = {'run_id': run_id, 'round': round_, 'name': name, 'command': command,
                   'cpu': cpu, 'wall_s': round(seconds, 1)}
          if error:
            failures.append(f'round {round_} batch {batch} {name}: {error}')
            log(f'[run] round {round_} batch {batch} {name}: FAILED ({error.splitlines()[-1]})')
            out.write(json.dumps(dict(facts, batch=batch, error=error)) + '\n')
            out.flush()
            continue
          for key, value in (('peer', name), ('variant', ''), ('batch', batch),
                             ('date_utc', run_id)):
            rec.setdefault(key, value)
          for key, value in (('height', args.height), ('width', args.width)):
            rec.setdefault(key, value)
          rec.update(facts)
          records.append(rec)
          out.write(json.dumps(rec) + '\n')
          out.flush()
          log(f'[run] round {round_} batch {batch} {name}: '
              f'{rec["median_ms"] / rec["batch"]:.1f} ms/image ({seconds:.0f}s)')

  print(f'\n{today}, {cpu["model"]} ({", ".join(cpu["flags"])}; {cpu["nproc"]} cores), '
        f'{args.rounds} rounds x {args.iters} timed runs, ms per image (lower is better); '
        f'records: {output}\n')
  if records:
    print(table(records, args.baseline))
  for failure in failures:
    print(f'\nFAILED {failure}')
  if failures:
    sys.exit(1)


if __name__ == '__main__':
  main()
