"""benchmarks/quickstart_seeds.py on finished runs (--report-only): the rows and min/mean/max.

Three workdirs hold hand-written eval.json and wall-time records (no training); the table's
figures are checked against arithmetic done here.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _finished_run(root, seed, devices, miou, pixel_accuracy, wall, train):
  workdir = root / f'seed{seed}_dev{devices}'
  workdir.mkdir()
  (workdir / 'eval.json').write_text(json.dumps(
      {'miou': miou, 'pixel_accuracy': pixel_accuracy, 'per_class_iou': {},
       'num_images': 150, 'step': 10, 'train_seconds_this_run': train}))
  (workdir / 'quickstart_seeds.json').write_text(json.dumps(
      {'seed': seed, 'devices': devices, 'wall_seconds': wall}))


def test_report_only_tabulates_finished_runs_with_min_mean_max(tmp_path):
  _finished_run(tmp_path, 0, 1, 0.70, 0.960, 600.0, 550.0)
  _finished_run(tmp_path, 1, 1, 0.66, 0.950, 630.0, 580.0)
  _finished_run(tmp_path, 0, 2, 0.68, 0.955, 660.0, 610.0)
  output = tmp_path / 'rows.json'
  result = subprocess.run(
      [sys.executable, 'benchmarks/quickstart_seeds.py', '--seeds', '0', '1', '2',
       '--devices', '1', '2', '--root', str(tmp_path), '--report-only', '--json', str(output)],
      cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  assert 'seed2_dev1: no eval.json' in result.stderr   # missing runs are named, not invented
  rows = {line.split('|')[1].strip() + '/' + line.split('|')[2].strip():
          [c.strip() for c in line.split('|')[3:-1]]
          for line in result.stdout.splitlines() if line.startswith('| ') and '---' not in line}
  assert rows['0/1'] == ['70.00%', '96.00%', '10m00s', '9m10s']
  assert rows['1/1'] == ['66.00%', '95.00%', '10m30s', '9m40s']
  assert rows['0/2'] == ['68.00%', '95.50%', '11m00s', '10m10s']
  assert rows['min/'] == ['66.00%', '95.00%', '10m00s', '9m10s']
  # mean of 70, 66, 68 = 68; of 96.0, 95.0, 95.5 = 95.5; of 600, 630, 660 s = 630 s.
  assert rows['mean/'] == ['68.00%', '95.50%', '10m30s', '9m40s']
  assert rows['max/'] == ['70.00%', '96.00%', '11m00s', '10m10s']
  assert [(r['seed'], r['devices']) for r in json.loads(output.read_text())] == [
      (0, 1), (1, 1), (0, 2)]


def test_report_only_without_any_finished_run_exits_1(tmp_path):
  result = subprocess.run(
      [sys.executable, 'benchmarks/quickstart_seeds.py', '--seeds', '0', '--root',
       str(tmp_path), '--report-only'], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert result.returncode == 1 and 'no finished run' in result.stderr
