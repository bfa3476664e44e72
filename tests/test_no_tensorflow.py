"""Model, training step, metrics, evaluation and prediction import no TensorFlow.

The GPU machines have JAX but not TensorFlow: everything outside `seg/data` must run there.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r'''
import sys

class NoTensorFlow:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets'):
      raise ImportError(f'{name} is not installed here')

sys.meta_path.insert(0, NoTensorFlow())
import jax, jax.numpy as jnp
from seg import (checkpoint, engine, evaluate, export, images, inputs, masks, metrics, model,
                 parallel, plots, predict, summaries, summary, train, train_benchmark, weights)
from experiments import tiny
config = tiny.get_config()
m = model.create_model(config.model)
lr = train.create_learning_rate_fn(config.train)
state = train.create_train_state(jax.random.key(0), config, m, lr)
p_step = train.make_p_train_step(config, lr)
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
