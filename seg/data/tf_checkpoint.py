"""TF1 checkpoints (DeepLab, TF-slim) read with TensorFlow's own reader, for `import-weights`.

Here, behind the data layer, so that `seg.weights` imports no TensorFlow.
"""

import os
import re

from seg.data.tf_quiet import tf


def resolve_prefix(path: str) -> str:
  """A TF checkpoint prefix from a prefix, an .index/.data file or a folder holding one."""
  if os.path.isdir(path):
    prefix = tf.train.latest_checkpoint(path)
    if prefix:
      return prefix
    indexes = sorted(f[:-len('.index')] for f in os.listdir(path) if f.endswith('.index'))
    if len(indexes) != 1:
      raise FileNotFoundError(f'{path}: expected one TF checkpoint (NAME.index + NAME.data-*), '
                              f'found {len(indexes)}: {indexes}')
    return os.path.join(path, indexes[0])
  for suffix in ('.index', '.meta'):
    if path.endswith(suffix):
      path = path[:-len(suffix)]
  path = re.sub(r'\.data-\d+-of-\d+$', '', path)
  if not os.path.exists(path + '.index'):
    raise FileNotFoundError(f'{path}.index not found: give a TF checkpoint prefix '
                            f'(e.g. .../model.ckpt-30000) or its folder')
  return path


def load(prefix: str):
  """TensorFlow's reader of the checkpoint `prefix` (`get_variable_to_shape_map`, `get_tensor`)."""
  return tf.train.load_checkpoint(prefix)
