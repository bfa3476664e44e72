"""benchmarks/gpu_check.py runs end to end on a CPU (--platform cpu --quick) with TensorFlow and
ml_collections made unimportable, as on the GPU machine it is written for."""

import json
import os
import subprocess
import sys

from helpers import ROOT

RUNNER = """
import runpy, sys
sys.modules['tensorflow'] = None        # import tensorflow -> ImportError
sys.modules['ml_collections'] = None
sys.argv = ['benchmarks/gpu_check.py'] + sys.argv[1:]
runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')
"""


def test_gpu_check_quick_on_cpu(tmp_path):
  output = tmp_path / 'check.json'
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS='1')
  env.pop('XLA_FLAGS', None)    # one CPU device, as a one-GPU machine has one
  result = subprocess.run([sys.executable, '-c', RUNNER, '--platform', 'cpu', '--quick',
                           '--output', str(output)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1500)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  record = json.loads(output.read_text())
  assert record['config_package'].startswith('stand-in')
  for name in ('environment', 'numerics', 'export', 'predict'):
    assert 'error' not in record[name], record[name]
  assert record['environment']['platform'] == 'cpu'
  # CPU against CPU: the same program, so the same numbers.
  assert record['numerics']['highest']['forward_rel_error'] < 1e-6
  assert record['export']['masks_equal_engine'] and record['export']['platforms'] == ['cpu', 'cuda']
  assert record['predict']['failures'] == 0 and record['predict']['masks_written'] == 6
  forms = {k for row in record['depthwise_ab'] for k in row if k.endswith('_forward_ms')}
  assert forms == {'shifted_forward_ms', 'grouped_forward_ms'}
  assert record['train_speed'][0]['images_per_s'] > 0   # --quick: one form
  assert {row['dtype'] for row in record['engine']} == {'float32', 'bfloat16'}
  assert 'train_speed:' in result.stdout and 'wrote' in result.stdout
