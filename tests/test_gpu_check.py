"""benchmarks/gpu_check.py runs end to end where the GPU machine's software is all there is:
no TensorFlow and no ml_collections (hidden here), on the CPU with --quick, so that the script
is known to work before a GPU is lent to run it."""

import json
import os
import subprocess
import sys

from helpers import ROOT

SCRIPT = r'''
import runpy, sys

# As where the packages are not installed: `import` raises ImportError, and
# importlib.util.find_spec says None.
for name in ('tensorflow', 'tensorflow_datasets', 'ml_collections'):
  sys.modules[name] = None
sys.argv = ['gpu_check.py', '--platform', 'cpu', '--quick', '--output', sys.argv[1]]
try:
  runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')
finally:
  loaded = [k for k, v in sys.modules.items()
            if v is not None and k.split('.')[0] in ('tensorflow', 'tensorflow_datasets')]
  assert not loaded, loaded
'''


def test_gpu_check_runs_without_tensorflow_or_ml_collections(tmp_path):
  output = tmp_path / 'check.json'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  result = subprocess.run([sys.executable, '-c', SCRIPT, str(output)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
  record = json.load(open(output))
  sections = ('environment', 'numerics', 'depthwise_ab', 'train_speed', 'engine', 'export',
              'predict')
  errors = {name: record[name] for name in sections
            if isinstance(record[name], dict) and 'error' in record[name]}
  assert not errors
  assert record['config_package'].startswith('stand-in')
  assert record['environment']['platform'] == 'cpu'
  # On the CPU the "device" is the CPU: the comparison is of a computation with itself.
  assert record['numerics']['highest']['forward_rel_error'] < 1e-6
  assert record['export']['platforms'] == ['cpu', 'cuda']
  assert record['export']['masks_equal_engine'] is True
  assert (record['predict']['masks_written'], record['predict']['failures']) == (6, 0)
  assert all(row['images_per_s'] > 0 for row in record['train_speed'])
  variants = [(row['dtype'], row.get('bf16_from_stride')) for row in record['engine']]
  assert variants == [('float32', None), ('bfloat16', 16), ('bfloat16', 2)]
  assert all(0.5 < row['bf16_f32_class_agreement'] <= 1.0 for row in record['engine'][1:])
  forms = {k for row in record['depthwise_ab'] for k in row if k.endswith('_ms')}
  assert forms == {f'{f}_{d}_ms' for f in ('shifted', 'grouped') for d in ('forward', 'backward')}
  assert 'total' in result.stdout and 'wrote' in result.stdout
