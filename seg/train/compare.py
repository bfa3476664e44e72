"""`main.py compare`: several runs side by side, from what their workdirs hold.

What differs in their configs, then their evaluations (`eval.json`: mIoU, pixel accuracy,
per-class IoU), their best evaluations (`best/best.json`) and training times; each run a
column (A, B, ...), and with two runs their difference. Nothing is computed again: the
figures are those `train` wrote.
"""

import json
import os
import string
from typing import Dict, List, Sequence

import ml_collections

from seg import config as config_lib
from seg.train import best as best_lib
from seg.train import changes as changes_lib

# Fields that say what the evaluation measured: runs that differ in one are listed with a
# warning that their figures are not comparable.
SAME_EVALUATION = ('data.dataset', 'data.folder', 'data.eval_split', 'data.eval_size',
                   'eval.scales', 'eval.flip')


def read_run(workdir: str) -> Dict:
  """{'workdir', 'config' (flat, with today's defaults), 'eval' (eval.json or None),
  'best' (best/best.json or None), 'resumed_with_changes' (config_changes.jsonl's records)};
  FileNotFoundError if `workdir` holds no run."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: is {workdir} a training workdir?')
  with open(path) as f:
    config = config_lib.with_defaults(ml_collections.ConfigDict(json.load(f)))

  def optional(*parts):
    name = os.path.join(workdir, *parts)
    if not os.path.exists(name):
      return None
    with open(name) as f:
      return json.load(f)
  return {'workdir': workdir, 'config': changes_lib.flat(config.to_dict()),
          'eval': optional('eval.json'),
          'best': optional(best_lib.FOLDER, best_lib.RECORD),
          'resumed_with_changes': changes_lib.read(workdir)}


def _text(value) -> str:
  if isinstance(value, float):
    return f'{value:g}'
  return str(value) if value != '' else "''"


def _percent(value) -> str:
  return '-' if value is None else f'{100 * value:.2f}%'


def format_comparison(runs: Sequence[Dict]) -> str:
  """The one-screen table of `read_run`s."""
  labels = list(string.ascii_uppercase[:len(runs)])
  width = 12
  lines = [f'{label}  {run["workdir"]}' + ('' if run['eval'] else '   (not evaluated: no '
                                              'eval.json)') for label, run in zip(labels, runs)]
  two = len(runs) == 2
  head = lambda title, extra='': (f'{title:<30}' + ''.join(f'{l:>{width}}' for l in labels)
                                  + extra)
  fields = sorted(set().union(*(run['config'] for run in runs)))
  differ = [f for f in fields if len({repr(r['config'].get(f)) for r in runs}) > 1]
  lines += ['', head('config fields that differ')]
  for field in differ:
    values = [_text(run['config'].get(field, '-')) for run in runs]
    if max(map(len, values)) < width:
      lines.append(f'  {field:<28}' + ''.join(f'{v:>{width}}' for v in values))
    else:   # long values (class names, label weights) one per line
      lines.append(f'  {field}')
      lines += [f'    {label}: {value}' for label, value in zip(labels, values)]
  if not differ:
    lines.append('  (none)')
  apart = [f for f in differ if f in SAME_EVALUATION]
  if apart:
    lines.append(f'  evaluated differently ({", ".join(apart)}): their figures are not '
                 'comparable')
  for label, run in zip(labels, runs):  # config.json holds a resumed run's last values
    for entry in run.get('resumed_with_changes', []):
      changed = ', '.join(f'{k} {_text(v[0])} -> {_text(v[1])}'
                          for k, v in entry['changes'].items())
      lines.append(f'  {label} resumed at step {entry["step"]} with {changed}')

  def row(title, values, delta=True):
    text = f'  {title:<28}' + ''.join(f'{_percent(v):>{width}}' for v in values)
    if two and delta and None not in values:
      text += f'{100 * (values[1] - values[0]):>+{width}.2f}'
    return text

  evals = [run['eval'] or {} for run in runs]
  lines += ['', head('evaluation (eval.json)', f'{"B-A":>{width}}' if two else '')]
  lines.append(f'  {"step":<28}' + ''.join(f'{str(e.get("step", "-")):>{width}}'
                                           for e in evals))
  lines.append(row('val mIoU', [e.get('miou') for e in evals]))
  lines.append(row('pixel accuracy', [e.get('pixel_accuracy') for e in evals]))
  bests = [run['best'] or {} for run in runs]
  lines.append(row('best mIoU (best/)', [b.get('miou') for b in bests]))
  lines.append(f'  {"  at step":<28}' + ''.join(f'{str(b.get("step", "-")):>{width}}'
                                                for b in bests))
  seconds = [e.get('train_seconds_this_run') for e in evals]
  lines.append(f'  {"training (last run), min":<28}' + ''.join(
      f'{"-" if s is None else f"{s / 60:.1f}":>{width}}' for s in seconds))
  names: List[str] = []
  for e in evals:
    names += [n for n in e.get('per_class_iou', {}) if n not in names]
  if names:
    lines += ['', head('per-class IoU', f'{"B-A":>{width}}' if two else '')]
    for name in names:
      lines.append(row(name[:28], [e.get('per_class_iou', {}).get(name) for e in evals]))
  return '\n'.join(lines)


def compare(workdirs: Sequence[str], log=print) -> List[Dict]:
  """Reads the runs and prints their table; returns the `read_run`s."""
  runs = [read_run(w) for w in workdirs]
  log(format_comparison(runs))
  return runs
