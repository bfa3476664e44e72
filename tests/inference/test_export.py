"""The exported prediction function, loaded with jax and numpy only, gives the engine's masks."""

import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import random_variables, tiny_engine_config
from seg import preprocessing
from seg.inference import engine, export

# The loader of seg/inference/export.py's docstring, run in a process that cannot import this project.
LOADER = r'''
import sys

class NoProject:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('seg', 'experiments', 'tests', 'tensorflow', 'flax'):
      raise ImportError(f'{name} must not be needed by the loader')

sys.meta_path.insert(0, NoProject())
import numpy as np
images = np.load('images.npy')
outputs = []
for image in images:
  LOADER_SNIPPET
  outputs.append(mask)
with open('predict.platforms', 'w') as f:
  f.write(','.join(predict.platforms))
np.save('masks.npy', np.stack(outputs))
batch = np.zeros((3, H, W, 3), np.uint8)
batch[:, :images.shape[1], :images.shape[2]] = images[:3]
sizes = np.array([images.shape[1:3]] * 3, np.int32)
np.save('batch_masks.npy', np.asarray(predict.call(batch, sizes)))
'''


def _docstring_loader() -> str:
  """The code block of seg/inference/export.py's docstring after 'Loading needs only'."""
  text = export.__doc__.split('Loading needs only', 1)[1]
  lines = [l[4:] for l in text.splitlines() if l.startswith('    ')]
  return '\n'.join(lines)


def test_exported_model_loads_without_the_project_and_gives_the_engines_masks(tmp_path):
  config = tiny_engine_config(width=0.35)
  _, variables = random_variables(config.model, seed=5)
  # XLA's float32 products, which the export carries (a CPU's kernel formulation gives the
  # same classes but for near-ties: tests/inference/test_float_kernel.py).
  eng = engine.Engine(config, variables, batch_size=1, f32_formulation='xla')
  exported = export.export_engine(eng, ('cpu', 'cuda'))
  (tmp_path / 'model.jax').write_bytes(exported.serialize())
  rng = np.random.default_rng(5)
  images = rng.integers(0, 256, (4, 50, 61, 3), np.uint8)
  np.save(tmp_path / 'images.npy', images)
  snippet = _docstring_loader().replace('\n', '\n  ')
  script = LOADER.replace('LOADER_SNIPPET', snippet)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', PYTHONPATH='')
  result = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / 'predict.platforms').read_text() == 'cpu,cuda'
  expected = eng.predict(images)
  np.testing.assert_array_equal(np.load(tmp_path / 'masks.npy'), expected)
  # The batch dimension is symbolic: three images in one call give the same masks.
  batch_masks = np.load(tmp_path / 'batch_masks.npy')
  np.testing.assert_array_equal(batch_masks[:, :50, :61], expected[:3])


def test_unknown_platform_is_a_clear_error():
  config = tiny_engine_config()
  _, variables = random_variables(config.model)
  with pytest.raises(ValueError, match='platforms'):
    export.export_engine(engine.Engine(config, variables), ('cpu', 'gpu0'))


def test_a_folder_models_export_takes_evals_larger_canvas_by_default():
  # `train` sets data.predict_max_side to a folder's largest eval image side (100 here) when
  # it is above the eval size (65): eval pads such images to padded_size(100) = 129 square,
  # predict too, and the export's canvas defaults to it; without it, the eval size.
  config = tiny_engine_config()
  _, variables = random_variables(config.model)
  shapes = []
  for predict_max_side in (0, 65, 100):
    config.data.predict_max_side = predict_max_side
    assert preprocessing.large_canvas(config.data) == (129 if predict_max_side > 65 else 0)
    exported = export.export_engine(engine.Engine(config, variables), ('cpu',))
    shapes.append(exported.in_avals[0].shape[1:3])
  assert shapes == [(65, 65), (65, 65), (129, 129)]
