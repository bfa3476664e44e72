"""Model, training step, metrics, evaluation and prediction import no TensorFlow.

The GPU machines have JAX but not TensorFlow: every module outside `seg/data` must import
and the training step must run there.
"""

import os
import subprocess
import sys

from helpers import ROOT

SCRIPT = r'''
import sys

class NoTensorFlow:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets'):
      raise ImportError(f'{name} is not installed here')

sys.meta_path.insert(0, NoTensorFlow())
import jax, jax.numpy as jnp
import importlib, pkgutil
import seg
modules = [m.name for m in pkgutil.walk_packages(seg.__path__, 'seg.')
           if not m.name.startswith('seg.data')]
assert len(modules) > 30, modules
for name in modules:  # every module outside the data layer imports without TensorFlow
  importlib.import_module(name)
from seg import model
from seg.train import step as step_lib
from experiments import tiny
config = tiny.get_config()
m = model.create_model(config.model)
lr = step_lib.create_learning_rate_fn(config.train)
state = step_lib.create_train_state(jax.random.key(0), config, m, lr)
p_step = step_lib.make_p_train_step(config, lr)
from flax import jax_utils
batch = {'image': jnp.zeros((1, 2, 33, 33, 3)), 'label': jnp.zeros((1, 2, 33, 33), jnp.uint8)}
state, out = p_step(jax_utils.replicate(state), batch, jax_utils.replicate(jax.random.key(1)))
assert jnp.isfinite(out['loss']).all()
assert not any(k.startswith('tensorflow') for k in sys.modules)
print('ok')
'''


def test_jax_side_runs_without_tensorflow():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  result = subprocess.run([sys.executable, '-c', SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith('ok')
