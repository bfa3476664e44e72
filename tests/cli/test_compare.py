"""`main.py compare`: runs side by side from hand-written workdirs (no training)."""

import json
import os
import subprocess
import sys

from helpers import ROOT
from seg.cli import commands, parser
from seg.config import default_config


def cli_main(argv):
  """The command as main.py runs it, minus main's process-wide settings (which would change
  this test process's JAX configuration)."""
  return commands.run(parser.parse(parser.build_parser(), argv))


def _workdir(root, name, changes, report=None, best=None):
  """A workdir with config.json (the defaults with `changes`, {'train.steps': 10, ...}), and
  eval.json / best/best.json when given."""
  config = default_config()
  for field, value in changes.items():
    section, key = field.split('.')
    config[section][key] = value
  path = root / name
  os.makedirs(path / 'best')
  (path / 'config.json').write_text(config.to_json())
  if report is not None:
    (path / 'eval.json').write_text(json.dumps(report))
  if best is not None:
    (path / 'best' / 'best.json').write_text(json.dumps(best))
  return str(path)


def _report(miou, per_class, step, seconds=600.0):
  return {'miou': miou, 'pixel_accuracy': 0.9, 'num_images': 5, 'step': step,
          'per_class_iou': per_class, 'train_seconds_this_run': seconds}


def _row(lines, title):
  [line] = [line for line in lines if line.strip().startswith(title)]
  return line.split()[len(title.split()):]


def test_compare_lists_what_differs_and_the_differences_of_the_figures(tmp_path, capsys):
  a = _workdir(tmp_path, 'plain', {'train.steps': 2000},
               _report(0.6553, {'bg': 0.9, 'blob': 0.7, 'speck': 0.0934}, 2000))
  b = _workdir(tmp_path, 'weights', {'train.steps': 2000, 'train.label_weights': (1, 1, 5),
                                     'train.seed': 3},
               _report(0.7010, {'bg': 0.88, 'blob': 0.69, 'speck': 0.246}, 2000, 540.0),
               best={'step': 1500, 'miou': 0.7125})
  assert cli_main(['compare', a, b]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[:2] == [f'A  {a}', f'B  {b}']
  # Only the fields that differ, each with both values.
  start = lines.index(next(line for line in lines if line.startswith('config fields')))
  listed = lines[start + 1:lines.index('', start)]
  assert [line.split()[0] for line in listed] == ['train.label_weights', 'train.seed']
  assert listed[0].split()[1:] == ['()', '(1,', '1,', '5)']
  assert listed[1].split()[1:] == ['0', '3']
  # Figures and their differences, B - A, in points.
  assert _row(lines, 'val mIoU') == ['65.53%', '70.10%', f'{100 * (0.7010 - 0.6553):+.2f}']
  assert _row(lines, 'speck') == ['9.34%', '24.60%', '+15.26']
  assert _row(lines, 'bg') == ['90.00%', '88.00%', '-2.00']
  assert _row(lines, 'best mIoU (best/)') == ['-', '71.25%']
  assert _row(lines, 'at step') == ['-', '1500']
  assert _row(lines, 'training (last run), min') == ['10.0', '9.0']
  assert not any('not comparable' in line for line in lines)


def test_compare_warns_of_other_evaluations_and_names_runs_without_one(tmp_path, capsys):
  a = _workdir(tmp_path, 'a', {}, _report(0.5, {'bg': 0.5}, 10))
  b = _workdir(tmp_path, 'b', {'data.eval_split': 'val[:10]'}, _report(0.7, {'bg': 0.7}, 10))
  c = _workdir(tmp_path, 'c', {})
  assert cli_main(['compare', a, b, c]) == 0
  out = capsys.readouterr().out
  assert f'C  {c}   (not evaluated: no eval.json)' in out
  assert 'evaluated differently (data.eval_split): their figures are not comparable' in out
  assert 'B-A' not in out                     # differences only between two runs
  assert _row(out.splitlines(), 'val mIoU') == ['50.00%', '70.00%', '-']


def test_compare_refuses_a_folder_that_holds_no_run(tmp_path):
  a = _workdir(tmp_path, 'a', {}, _report(0.5, {'bg': 0.5}, 10))
  result = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), 'compare', a,
                           str(tmp_path / 'nothing')], capture_output=True, text=True)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f'main.py compare: error: {tmp_path / "nothing" / "config.json"} not found: is '
      f'{tmp_path / "nothing"} a training workdir?')
