"""Fixtures of the int8 engine's tests (test_quantize.py, test_int8_kernel.py)."""

import jax
import numpy as np
import pytest

from helpers import EVAL_SIZE, random_variables, tiny_engine_config
from seg.inference import fold, quantize


@pytest.fixture(scope='session')
def tiny_int8():
  """A tiny random model, its folded weights and int8 scales calibrated on random images
  (once per worker: the calibration compiles for ~30 s)."""
  config = tiny_engine_config()
  _, variables = random_variables(config.model, seed=4)
  folded = fold.fold_variables(config.model, jax.device_get(variables), xp=np)
  rng = np.random.default_rng(4)
  images = [rng.integers(0, 256, (EVAL_SIZE, EVAL_SIZE, 3), np.uint8) for _ in range(4)]
  scales = quantize.calibrate(config, folded, images, batch_size=4)
  return config, variables, folded, scales
