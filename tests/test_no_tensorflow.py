"""Model, training step, metrics, evaluation and prediction import no TensorFlow.

The GPU machines have JAX but not TensorFlow: every module outside `seg/data` must import,
and the training step, `Segmenter` and `eval --images` (masks and scores of files) must
run there.
"""

import os
import subprocess
import sys

from helpers import ROOT

SCRIPT = r'''
import sys

# As where they are not installed: importing them fails, importlib.util.find_spec gives None
# (etils, under orbax, asks it).
for absent in ('tensorflow', 'tensorflow_datasets'):
  sys.modules[absent] = None
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
import tempfile, numpy as np
from PIL import Image
sys.path.insert(0, 'tests')
from helpers import scene, write_random_workdir
import os
folder = tempfile.mkdtemp()
write_random_workdir(folder + '/run', config)
for sub in ('images', 'labels'):
  os.makedirs(f'{folder}/{sub}')
Image.fromarray(scene(40, 50, 0)).save(folder + '/images/a.png')
Image.fromarray(np.zeros((40, 50), np.uint8)).save(folder + '/labels/a.png')
from seg.predict import scoring  # eval --images --labels: Segmenter's masks and scores
report = scoring.evaluate_files(folder + '/run', [folder + '/images'], folder + '/labels',
                                output=folder + '/report/r.json', log=lambda line: None)
assert report['num_images'] == 1 and 0 <= report['miou'] <= 1
assert os.path.exists(folder + '/report/r_images.csv')
assert not any(k.startswith('tensorflow') and m is not None for k, m in sys.modules.items())
print('ok')
'''


def test_jax_side_runs_without_tensorflow():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  result = subprocess.run([sys.executable, '-c', SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith('ok')
