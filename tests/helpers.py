"""What several test modules share: the repository root, models with non-trivial weights
(and a workdir of one), generated scenes, a poisoned input stream, VOC's colour map, NumPy's
aligned-corner resize and multi-scale average. (Fixtures live in conftest.py.)"""

import os

import flax
import jax
import jax.numpy as jnp
import numpy as np

from experiments import tiny
from seg.model import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
EVAL_SIZE = 65  # the canvas of the engine tests: small, of the form k * 16 + 1


def voc_colormap():
  """The VOC palette written out independently of seg.classes (bit interleaving of the id)."""
  cmap = np.zeros((256, 3), np.uint8)
  for i in range(256):
    for bit in range(8):
      for channel in range(3):
        cmap[i, channel] |= ((i >> (3 * bit + channel)) & 1) << (7 - bit)
  return cmap


def random_variables(model_config, seed=0):
  """(model, variables) with BatchNorm statistics and affine terms far from identity.

  Freshly initialised BatchNorm (mean 0, var 1, scale 1, bias 0) would make folding it
  trivially right; these make every term of it matter.
  """
  model = create_model(model_config)
  variables = model.init(jax.random.key(seed), jnp.zeros((1, 33, 33, 3)), train=False)
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(variables)
  draw = {'mean': lambda s: rng.normal(0, 0.2, s), 'var': lambda s: rng.uniform(0.3, 3, s),
          'scale': lambda s: rng.uniform(0.5, 1.5, s), 'bias': lambda s: rng.normal(0, 0.2, s)}
  for key, value in flat.items():
    if key[-1] in draw and 'logits' not in key:
      flat[key] = jnp.asarray(draw[key[-1]](value.shape), jnp.float32)
  return model, flax.traverse_util.unflatten_dict(flat)


def scene(height, width, seed):
  """[height, width, 3] uint8: a smooth background with a few bright discs, varied content
  for a varied mask."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:height, :width]
  image = np.stack([(yy * 255 // max(height - 1, 1)), (xx * 255 // max(width - 1, 1)),
                    np.full_like(yy, rng.integers(0, 255))], -1).astype(np.float32)
  for _ in range(3):
    cy, cx, r = rng.integers(0, height), rng.integers(0, width), rng.integers(8, 30)
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
    image[inside] = rng.integers(0, 255, 3)
  return image.astype(np.uint8)


def write_random_workdir(workdir, config, seed=0):
  """A workdir of `config`'s model at step 0 with random weights and BatchNorm statistics
  (model.init itself takes ~25 s to compile here): He-scaled kernels keep activations in
  range, so the argmax varies over an image. Returns (model, variables)."""
  from seg import checkpoint
  model = create_model(config.model)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == 'kernel':
      fan_in = int(np.prod(shape[:-1])) if shape[-2] > 1 else int(np.prod(shape[:2]))
      return rng.normal(0, np.sqrt(2 / fan_in), shape).astype(np.float32)
    if name in ('scale', 'var'):
      return rng.uniform(0.8, 1.2, shape).astype(np.float32)
    return rng.normal(0, 0.1, shape).astype(np.float32)  # biases, means
  variables = jax.tree_util.tree_map_with_path(fill, checkpoint.abstract_variables(model))
  checkpoint.save_config(workdir, config)
  manager = checkpoint.create_manager(workdir)
  checkpoint.save(manager, 0, variables, {'step': np.int32(0)})
  manager.wait_until_finished()
  return model, variables


def tiny_engine_config(**model_overrides):
  """experiments/tiny.py on an EVAL_SIZE canvas, with `model_overrides`."""
  config = tiny.get_config()
  config.data.eval_size = EVAL_SIZE
  for name, value in model_overrides.items():
    config.model[name] = value
  return config


def poisoned(real_train_batches, poison_step):
  """train_batches whose batch number `poison_step` (1-based) carries a NaN pixel."""
  def batches(*args, **kwargs):
    start = kwargs.get('start_step', args[5] if len(args) > 5 else 0)
    for step, batch in enumerate(real_train_batches(*args, **kwargs), start + 1):
      if step == poison_step:
        batch = dict(batch, image=batch['image'].copy())
        batch['image'][0, 0, 0, 0] = np.nan
      yield batch
  return batches


def optimizer_updates(train_config, paths, seed=0, steps=2):
  """Random float32 parameters at `paths` ({key: flax path}), `steps` random gradients, and
  the parameters after the project's optimiser applied them one by one (seg.train.step):
  (values, grads, got), each keyed as `paths`, for tests that redo the arithmetic in NumPy."""
  from flax.training import train_state
  from seg.train import step as step_lib
  rng = np.random.default_rng(seed)
  values = {k: rng.normal(size=(3, 2)).astype(np.float32) for k in paths}
  grads = [{k: rng.normal(size=(3, 2)).astype(np.float32) for k in paths}
           for _ in range(steps)]
  nest = lambda flat: flax.traverse_util.unflatten_dict({paths[k]: jnp.asarray(v)
                                                         for k, v in flat.items()})
  state = train_state.TrainState.create(
      apply_fn=None, params=nest(values), tx=step_lib.create_optimizer(
          train_config, step_lib.create_learning_rate_fn(train_config)))
  for g in grads:
    state = state.apply_gradients(grads=nest(g))
  flat = flax.traverse_util.flatten_dict(state.params)
  return values, grads, {k: np.asarray(flat[paths[k]]) for k in paths}


def numpy_resize_aligned(x, size):
  """Aligned-corner bilinear resize of [n, h, w, c], written out with explicit indices."""
  def axis(values, out, ax):
    n_in = values.shape[ax]
    if out == 1 or n_in == 1:
      return np.take(values, [0] * out, axis=ax)
    src = np.arange(out) * (n_in - 1) / (out - 1)
    lo = np.clip(np.floor(src).astype(int), 0, n_in - 2)
    frac = (src - lo).reshape([-1 if a == ax else 1 for a in range(values.ndim)])
    return np.take(values, lo, axis=ax) * (1 - frac) + np.take(values, lo + 1, axis=ax) * frac
  return axis(axis(np.asarray(x, np.float64), size[0], 1), size[1], 2)


def numpy_multi_scale(features, image, canvas_size, sizes):
  """DeepLab's multi-scale + flipped softmax written out in NumPy: `image` [h, w, 3] uint8 in
  [-1, 1] on a canvas_size square (padding 0 at the bottom and right), the canvas resized with
  aligned corners to each of `sizes` and mirrored, `features` (x [1, s, s, 3] float32 -> the
  model's logits at its output stride) on each, every pass's logits resized back to the
  canvas, softmax, the mirror undone, the mean: [canvas_size, canvas_size, classes] float64."""
  canvas = np.zeros((1, canvas_size, canvas_size, 3))
  canvas[0, :image.shape[0], :image.shape[1]] = image / 127.5 - 1.0
  total = 0.0
  for size in sizes:
    scaled = numpy_resize_aligned(canvas, (size, size)).astype(np.float32)
    for flip in (False, True):
      logits = np.asarray(features(scaled[:, :, ::-1] if flip else scaled))
      logits = numpy_resize_aligned(logits, (canvas_size, canvas_size))[0]
      p = np.exp(logits - logits.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      total = total + (p[:, ::-1] if flip else p)
  return total / (2 * len(sizes))
