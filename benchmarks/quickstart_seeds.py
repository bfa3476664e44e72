"""The quickstart over several seeds (and fake CPU devices): val mIoU as a distribution.

    python benchmarks/quickstart_seeds.py --seeds 0 1 2 [--devices 1 2] [--root runs/qs_seeds]
        [--config experiments/quickstart.py] [--override train.steps=100] [--report-only]

For each seed and device count it runs the README's command,
`python main.py train --config CONFIG --workdir ROOT/seedS_devD --config.train.seed=S`,
with `XLA_FLAGS=--xla_force_host_platform_device_count=D` (the global batch is split over
the D devices: the same recipe, another order of the arithmetic), times it (wall clock of
the whole command: dataset, compilation, training and the final evaluation) and reads the
evaluation it writes (WORKDIR/eval.json). The wall time goes to WORKDIR/quickstart_seeds.json.
It then prints one row per run (seed, devices, val mIoU, pixel accuracy, wall time) and
min / mean / max of each column.

A workdir that already holds an eval.json is not trained again: its row is read back (so a
table can be made of runs started separately, e.g. two at a time). `--report-only` never
trains, only tabulates what is there.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMES_FILE = 'quickstart_seeds.json'


def workdir_of(root: str, seed: int, devices: int) -> str:
  return os.path.join(root, f'seed{seed}_dev{devices}')


def train(config: str, workdir: str, seed: int, devices: int, overrides) -> float:
  """Runs `main.py train` for one seed on `devices` fake CPU devices; returns its wall time (s)."""
  env = dict(os.environ)
  flags = ' '.join(f for f in env.get('XLA_FLAGS', '').split()
                   if not f.startswith('--xla_force_host_platform_device_count'))
  env['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={devices}'.strip()
  command = [sys.executable, os.path.join(ROOT, 'main.py'), 'train', '--config', config,
             '--workdir', workdir, f'--config.train.seed={seed}']
  command += [f'--config.{o}' for o in overrides]
  print('$ XLA_FLAGS=' + env['XLA_FLAGS'] + ' ' + ' '.join(command), flush=True)
  start = time.time()
  subprocess.run(command, env=env, cwd=ROOT, check=True)
  seconds = time.time() - start
  with open(os.path.join(workdir, TIMES_FILE), 'w') as f:
    json.dump({'seed': seed, 'devices': devices, 'wall_seconds': round(seconds, 1),
               'command': command, 'xla_flags': env['XLA_FLAGS']}, f, indent=2)
  return seconds


def read_row(workdir: str, seed: int, devices: int) -> dict:
  """The table row of a finished run: its eval.json and the recorded wall time (None if none)."""
  with open(os.path.join(workdir, 'eval.json')) as f:
    report = json.load(f)
  wall = None
  times = os.path.join(workdir, TIMES_FILE)
  if os.path.exists(times):
    with open(times) as f:
      wall = json.load(f).get('wall_seconds')
  return {'seed': seed, 'devices': devices, 'miou': 100 * report['miou'],
          'pixel_accuracy': 100 * report['pixel_accuracy'], 'wall_seconds': wall,
          'train_seconds': report.get('train_seconds_this_run'), 'workdir': workdir}


def _minutes(seconds) -> str:
  if seconds is None:
    return '-'
  minutes, seconds = divmod(int(round(seconds)), 60)
  return f'{minutes}m{seconds:02d}s'


def format_table(rows) -> str:
  """A Markdown table of the rows, then min / mean / max of mIoU, pixel accuracy and wall time."""
  lines = ['| seed | devices | val mIoU | pixel acc | wall time | training |',
           '|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    lines.append(f"| {r['seed']} | {r['devices']} | {r['miou']:.2f}% | "
                 f"{r['pixel_accuracy']:.2f}% | {_minutes(r['wall_seconds'])} | "
                 f"{_minutes(r['train_seconds'])} |")
  for name, fn in (('min', min), ('mean', statistics.fmean), ('max', max)):
    walls = [r['wall_seconds'] for r in rows if r['wall_seconds'] is not None]
    trains = [r['train_seconds'] for r in rows if r['train_seconds'] is not None]
    lines.append(f"| {name} | | {fn(r['miou'] for r in rows):.2f}% | "
                 f"{fn(r['pixel_accuracy'] for r in rows):.2f}% | "
                 f"{_minutes(fn(walls)) if walls else '-'} | "
                 f"{_minutes(fn(trains)) if trains else '-'} |")
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  parser.add_argument('--devices', type=int, nargs='+', default=[1],
                      help='fake CPU device counts; each seed runs with each')
  parser.add_argument('--config', default='experiments/quickstart.py')
  parser.add_argument('--root', default='runs/qs_seeds', help='one workdir per run under it')
  parser.add_argument('--override', action='append', default=[], metavar='FIELD=VALUE',
                      help='a config override for every run, e.g. train.steps=100')
  parser.add_argument('--report-only', action='store_true',
                      help='train nothing; tabulate the finished runs under --root')
  parser.add_argument('--json', default='', help='also write the rows to this JSON file')
  args = parser.parse_args(argv)
  root, config = os.path.abspath(args.root), os.path.abspath(args.config)

  rows = []
  for devices in args.devices:
    for seed in args.seeds:
      workdir = workdir_of(root, seed, devices)
      if not os.path.exists(os.path.join(workdir, 'eval.json')):
        if args.report_only:
          print(f'{workdir}: no eval.json, left out', file=sys.stderr)
          continue
        train(config, workdir, seed, devices, args.override)
      rows.append(read_row(workdir, seed, devices))
  if not rows:
    print('no finished run to tabulate', file=sys.stderr)
    return 1
  print(format_table(rows))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
